"""passes/decode_gemv.py: one-row bf16 linears on the CPU become moecc::decode_linear.

Counts what the pass rewrote on a real transformers model (every attention projection
and the LM head at batch-1 decode; nothing at two rows, nothing in fp32, nothing when the
option is off) and checks the op's numerics against F.linear at bf16 tolerance.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import moecc
from moecc.tolerances import check_close

pytest.importorskip("transformers")


def _compile_counters(dtype, rows, **options):
    from moecc.models import build_model

    model = build_model("qwen3-moe-tiny", dtype=dtype)
    report = moecc.CompileReport()
    options = {"report": report, "kernel_backend": "reference", "rest_of_graph": "eager", **options}
    compiled = torch.compile(model, backend="moecc", fullgraph=True, options=options)
    ids = torch.randint(0, 256, (rows, 1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = model(ids).logits, compiled(ids).logits
    check_close(got, expected, dtype)
    (result,) = [p for p in report.graphs[0].passes if p.name == "decode_gemv"]
    return result.counters


def test_batch1_bf16_linears_rewritten():
    # 2 layers x (q, k, v, o) + lm_head; the routers are inside the MoE ops
    assert _compile_counters(torch.bfloat16, 1) == {"rewritten": 9, "tvm": 0, "mv": 9, "skipped_fp32": 0}


def test_batch1_bf16_linears_on_tvm_gemv():
    # with TVM kernels the same nine run on the TVM GEMV; logits checked inside
    pytest.importorskip("tvm")
    counters = _compile_counters(torch.bfloat16, 1, kernel_backend="tvm")
    assert counters == {"rewritten": 9, "tvm": 9, "mv": 0, "skipped_fp32": 0}


def test_two_rows_fp32_and_option_off_left_alone():
    assert _compile_counters(torch.bfloat16, 2)["rewritten"] == 0
    assert _compile_counters(torch.float32, 1) == {"rewritten": 0, "tvm": 0, "mv": 0, "skipped_fp32": 9}
    assert _compile_counters(torch.bfloat16, 1, decode_gemv=False)["rewritten"] == 0


@pytest.mark.parametrize("kernel", ["mv", "tvm"])
@pytest.mark.parametrize("bias", [False, True])
def test_decode_linear_matches_linear(bias, kernel):
    import moecc.decode_ops  # noqa: F401

    if kernel == "tvm":
        pytest.importorskip("tvm")
    g = torch.Generator().manual_seed(1)
    # K = 100 and N = 203: not multiples of the GEMV's vector width or output tile
    x = torch.randn(1, 1, 100, generator=g).to(torch.bfloat16)
    w = (torch.randn(203, 100, generator=g) / 100 ** 0.5).to(torch.bfloat16)
    b = torch.randn(203, generator=g).to(torch.bfloat16) if bias else None
    got = torch.ops.moecc.decode_linear(x, w, b, kernel)
    assert got.shape == (1, 1, 203) and got.dtype == torch.bfloat16
    check_close(got, F.linear(x, w, b), torch.bfloat16)
    with pytest.raises(ValueError, match="one row"):
        torch.ops.moecc.decode_linear(torch.randn(2, 100).to(torch.bfloat16), w, b, kernel)


def test_decode_linear_rejects_unknown_kernel():
    import moecc.decode_ops  # noqa: F401

    w = torch.randn(8, 16).to(torch.bfloat16)
    with pytest.raises(ValueError, match="kernel must be one of"):
        torch.ops.moecc.decode_linear(torch.randn(1, 16).to(torch.bfloat16), w, None, "cublas")
