"""moecc::quantized_linear: packed int8 / int4 linear layers, TVM (llvm) kernels against
the reference definition (moecc/quantized_linear.reference_linear).

Tolerances (moecc.tolerances): fp32 outputs at fp32 tolerance, bf16 outputs at bf16 (the
kernels accumulate in fp32 and round once; only the summation order differs). With int8
activations both sides quantise the same rows the same way, so they agree as closely.
"""

from __future__ import annotations

import pytest
import torch

from moecc.backends.reference.quantized import quantize_rows
from moecc.tolerances import check_close


def _layer(n, k, fmt, group, dtype, bias, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * k ** -0.5
    q = quantize_rows(w, fmt, group)
    b = (torch.randn(n, generator=gen) * 0.1).to(dtype) if bias else None
    return q.packed, q.scales, b


@pytest.mark.tvm
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt,group,activations", [("int8", 0, "float"), ("int4", 32, "float"),
                                                   ("int8", 0, "int8"), ("int4", 64, "int8")])
@pytest.mark.parametrize("rows", [1, 3])
def test_tvm_quantized_linear_matches_reference(dtype, fmt, group, activations, rows):
    import moecc.quantized_linear as ql
    from moecc.backends.tvm.linear import tvm_linear_unfit

    n, k = 96, 128
    if tvm_linear_unfit(dtype, n, k, fmt, group, activations):
        pytest.skip(tvm_linear_unfit(dtype, n, k, fmt, group, activations))
    packed, scales, bias = _layer(n, k, fmt, group, dtype, bias=rows == 3)
    x = torch.randn(2, rows, k).to(dtype)
    out = torch.ops.moecc.quantized_linear(x, packed, scales, bias, fmt, group, activations)
    ref = ql.reference_linear(x, packed, scales, bias, fmt, group, activations)
    assert out.shape == (2, rows, n) and out.dtype == dtype
    check_close(out, ref, dtype)


def test_reference_linear_is_the_dequantised_linear():
    import moecc.quantized_linear as ql
    from moecc.backends.reference.quantized import dequantize

    packed, scales, bias = _layer(32, 64, "int4", 16, torch.float32, bias=True)
    x = torch.randn(5, 64)
    expected = torch.nn.functional.linear(x, dequantize(packed, scales, "int4"), bias)
    check_close(ql.reference_linear(x, packed, scales, bias, "int4", 16, "float"), expected, torch.float32)
    # int8 activations change the result by the rows' rounding, visibly
    a8 = ql.reference_linear(x, packed, scales, bias, "int4", 16, "int8")
    assert 0 < (a8 - expected).abs().max() < 0.05


def test_shapes_the_kernels_cannot_fit_fall_back_to_the_reference():
    import moecc.quantized_linear as ql

    packed, scales, _ = _layer(8, 24, "int8", 8, torch.float32, bias=False)  # 8-column groups: no VNNI step
    x = torch.randn(1, 24)
    out = torch.ops.moecc.quantized_linear(x, packed, scales, None, "int8", 8, "int8")
    check_close(out, ql.reference_linear(x, packed, scales, None, "int8", 8, "int8"), torch.float32)


@pytest.mark.tvm
def test_unaligned_packed_weights_and_inputs_run():
    """A view at an odd offset is copied for the TVM kernels (they assume 64-byte
    alignment), not a crash."""
    import moecc.quantized_linear as ql

    packed, scales, _ = _layer(96, 128, "int8", 0, torch.float32, bias=False)
    buf = torch.empty(packed.numel() + 1, dtype=torch.uint8)
    odd = buf[1:].view(packed.shape)
    odd.copy_(packed)
    xbuf = torch.randn(129)
    x = xbuf[1:].view(1, 128)
    assert odd.data_ptr() % 64 and x.data_ptr() % 64
    out = torch.ops.moecc.quantized_linear(x, odd, scales, None, "int8", 0, "float")
    check_close(out, ql.reference_linear(x, packed, scales, None, "int8", 0, "float"), torch.float32)


@pytest.mark.tvm
@pytest.mark.parametrize("w_dtype,x_dtype,in_fp32", [(torch.bfloat16, torch.bfloat16, False),
                                                     (torch.bfloat16, torch.bfloat16, True),
                                                     (torch.float16, torch.float16, False),
                                                     (torch.float32, torch.float32, False),
                                                     (torch.float32, torch.bfloat16, True)])
@pytest.mark.parametrize("tokens", [1, 2])
def test_tvm_router_gemv_matches_reference_logits(w_dtype, x_dtype, in_fp32, tokens):
    """The TVM op's decode router (linear.dense_gemv) against reference router_logits: the
    logits agree to fp32 tolerance (in_fp32) or to one rounding of the model's dtype, and
    an odd E (a pruned router) works."""
    from moecc.backends.reference.routing import router_logits
    from moecc.backends.tvm.op import _router_logits
    from moecc.spec import RouterSpec
    from moecc.weights import make_weights

    gen = torch.Generator().manual_seed(tokens)
    e, k = 69, 256
    w = (torch.randn(e, k, generator=gen) * k ** -0.5).to(w_dtype)
    x = torch.randn(tokens, k, generator=gen).to(x_dtype)
    spec = RouterSpec(e, 4, logits_in_fp32=in_fp32)
    weights = make_weights(router_weight=w, gate_up=torch.zeros(e, 2, k), down=torch.zeros(e, k, 1))
    got = _router_logits(x, weights, spec)
    expected = router_logits(x, w, None, spec)
    assert got.dtype == torch.float32 and got.shape == (tokens, e)
    check_close(got, expected, torch.float32 if in_fp32 or x_dtype == torch.float32 else x_dtype)
    if not in_fp32 and x_dtype != torch.float32:  # rounded to the model's dtype like the model
        assert torch.equal(got, got.to(x_dtype).float())
