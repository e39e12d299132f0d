"""transformers MoE models compiled with kernel_backend="tvm" (LLVM on CPU) match eager."""

from __future__ import annotations

import pytest
import torch
from model_checks import assert_logits_close, compile_with_report, moe_block_count

from moecc.models import build_model

pytestmark = pytest.mark.tvm


@pytest.mark.parametrize("name", ["qwen3-moe-tiny", "mixtral-tiny", "deepseek-v3-tiny", "gpt-oss-tiny"])
def test_model_on_tvm_kernels_matches_eager(name, quiet):
    model = build_model(name)
    compiled, report = compile_with_report(model, kernel_backend="tvm")
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_logits_close(compiled(ids).logits, model(ids).logits)
    assert report.pass_counter("lower_kernels", "tvm") == moe_block_count(model)


def test_auto_picks_tvm_on_cpu_with_inductor(quiet):
    model = build_model("qwen3-moe-tiny")
    compiled, report = compile_with_report(model, kernel_backend="auto", rest_of_graph="inductor")
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        assert_logits_close(compiled(ids).logits, model(ids).logits)
    assert report.pass_counter("lower_kernels", "tvm") == 2
