"""fp8 on a trained model: moecc.quantize_(model, "fp8") packs every MoE layer to e4m3fn
with block scales (eager then runs the reference op on them), and the compiled model
(TVM llvm kernels on the same packed tensors) matches that eager model."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.tvm
@pytest.mark.slow
def test_quantize_fp8_then_compile_matches_eager_fp8_model():
    import moecc
    from moecc.models import build_model

    torch.manual_seed(0)
    model = build_model("qwen3-moe-stdlib")
    ids = torch.randint(0, 200, (1, 24))
    with torch.no_grad():
        original = model(ids).logits
        report = moecc.quantize_(model, "fp8")
        assert all(r.startswith("model.layers.") and "fp8 b128: weight SQNR >=" in r
                   for r in report.format().splitlines()[:3])
        eager = model(ids).logits
        compiled = torch.compile(model, backend="moecc", options={"kernel_backend": "tvm"})(ids).logits
    assert torch.isfinite(compiled).all()
    rel = ((eager - original).norm() / original.norm()).item()
    assert 1e-4 < rel < 0.05  # really rounded, and only by fp8's ~30 dB
    assert ((compiled - eager).norm() / eager.norm()).item() < 1e-5
