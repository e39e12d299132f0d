"""fp8 (e4m3fn) block-scaled expert weights: the layout, the reference's dequantisation,
and the TVM llvm kernels that decode fp8 in their inner loop, against the reference.

Tolerances as tests/backends/test_quantized_experts.py: the kernels and the reference
compute on the same decoded weights, so fp32 is compared at 1e-4 / 1e-5; a bf16 model is
compared with the reference run in fp32 on the same bf16 inputs at bf16 tolerance.
check_close fails on NaN. Shapes include K and rows that the block does not divide
(short last blocks; a gate/up scale block straddling gate and up rows).
"""

from __future__ import annotations

import math

import layer_factory
import pytest
import torch

from moecc.backends import reference
from moecc.backends.reference.quantized import FP8_MAX, dequantize, quantize_rows, sqnr_db
from moecc.spec import RouterSpec, SpecError
from moecc.tolerances import check_close


def _e4m3fn_value(byte: int) -> float:
    """The e4m3fn value of one byte from its bit fields, independent of torch."""
    sign = -1.0 if byte & 0x80 else 1.0
    exp, mant = (byte >> 3) & 15, byte & 7
    if exp == 15 and mant == 7:
        return math.nan
    if exp == 0:
        return sign * mant * 2.0 ** -9
    return sign * (1 + mant / 8) * 2.0 ** (exp - 7)


def test_fp8_bytes_decode_as_e4m3fn():
    """The dtype the layout uses is e4m3fn bit for bit (sign, 4-bit exponent bias 7, 3-bit
    mantissa, subnormals, 0x7f / 0xff NaN): what the kernels' bit decoders assume."""
    raw = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    for byte in range(256):
        want = _e4m3fn_value(byte)
        assert (math.isnan(want) and math.isnan(raw[byte])) or raw[byte].item() == want, byte


@pytest.mark.parametrize("rows,cols,block", [(256, 384, 128), (200, 300, 128), (96, 40, 32)])
def test_quantize_fp8_layout_scales_and_rounding(rows, cols, block):
    torch.manual_seed(rows)
    w = torch.randn(3, rows, cols) * torch.rand(3, rows, 1)  # rows of different magnitude
    q = quantize_rows(w, "fp8", block)
    rb, cb = -(-rows // block), -(-cols // block)
    assert q.packed.dtype == torch.float8_e4m3fn and tuple(q.packed.shape) == (3, rows, cols)
    assert q.scales.dtype == torch.float32 and tuple(q.scales.shape) == (3, rb, cb)
    # Each block's scale is its own elements' absmax / 448 (short last blocks included).
    for e, i, j in [(0, 0, 0), (1, rb - 1, cb - 1), (2, rb - 1, 0)]:
        blk = w[e, i * block:(i + 1) * block, j * block:(j + 1) * block]
        assert q.scales[e, i, j].item() == pytest.approx(blk.abs().max().item() / FP8_MAX, rel=1e-6)
    bytes_ = q.packed.view(torch.uint8)
    assert not ((bytes_ & 0x7F) == 0x7F).any()  # never a NaN byte
    deq = dequantize(q.packed, q.scales, "fp8", group_size=block)
    assert deq.shape == w.shape and torch.isfinite(deq).all()
    # Dequantisation is q * scale of the element's block, element by element.
    s = q.scales.repeat_interleave(block, 1).repeat_interleave(block, 2)[:, :rows, :cols]
    assert torch.equal(deq, q.packed.float() * s)
    # Round to nearest: relative error <= 2^-4 for normal values (3 mantissa bits), and
    # the absolute error of subnormals <= half their step (2^-10 * scale).
    err = (deq - w).abs()
    assert (err <= w.abs() * 2.0 ** -4 + s * 2.0 ** -10 + 1e-12).all()
    assert 28.0 < sqnr_db(w, deq) < 40.0


def test_fp8_zero_block_and_block_mismatch():
    q = quantize_rows(torch.zeros(4, 8), "fp8", 4)
    assert (q.scales == 0).all() and (dequantize(q.packed, q.scales, "fp8", group_size=4) == 0).all()
    with pytest.raises(ValueError, match="does not match"):
        dequantize(q.packed, q.scales, "fp8", group_size=2)  # the block is part of the format


def test_spec_fp8_needs_block_and_float_activations():
    spec, _ = layer_factory.make_layer(RouterSpec(4, 2))
    assert "fp8" in spec.replace(experts={"weight_format": "fp8", "group_size": 128}).describe()
    with pytest.raises(SpecError, match="block"):
        spec.replace(experts={"weight_format": "fp8"})
    with pytest.raises(SpecError, match="fp8"):
        spec.replace(experts={"weight_format": "fp8", "group_size": 128, "activations": "int8"})


def fp8_layer(router, block, dtype=torch.float32, **kw):
    spec, w = layer_factory.make_layer(router, dtype=dtype, **kw)
    gu, dn = quantize_rows(w.gate_up, "fp8", block), quantize_rows(w.down, "fp8", block)
    qspec = spec.replace(experts={"weight_format": "fp8", "group_size": block})
    qw = w._replace(gate_up=gu.packed, down=dn.packed, gate_up_scale=gu.scales, down_scale=dn.scales)
    dense = w._replace(gate_up=dequantize(gu.packed, gu.scales, "fp8", group_size=block),
                       down=dequantize(dn.packed, dn.scales, "fp8", group_size=block))
    return spec, qspec, qw, dense


def test_reference_op_is_the_dense_layer_on_decoded_weights():
    spec, qspec, qw, dense = fp8_layer(RouterSpec(8, 2), 32, k=96, n=48)
    x = layer_factory.tie_free_hidden(spec, dense, 9, torch.float32)
    out = reference.moe_layer(x, qw, qspec)
    check_close(out, reference.moe_layer(x, dense, spec), torch.float32)
    assert not torch.equal(out, reference.moe_layer(x, qw._replace(gate_up_scale=qw.gate_up_scale * 2), qspec))


CFG = {"block_m": 4, "tile_n": 2, "tile_k": 2, "vec": 16, "red_tile": 32}


@pytest.fixture(scope="module", autouse=True)
def _cache_dir(fresh_tvm_cache):
    """A fresh on-disk TVM module cache for this test module (tests/backends/conftest.py)."""


@pytest.mark.tvm
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k,n,block", [(96, 48, 64), (128, 64, 32), (192, 80, 128)])  # short last blocks
@pytest.mark.parametrize("tokens", [1, 7])  # one token (most experts empty); ragged
def test_tvm_fp8_matches_reference(dtype, k, n, block, tokens):
    torch.manual_seed(tokens + k)
    _, qspec, qw, _ = fp8_layer(RouterSpec(8, 2), block, dtype=dtype, k=k, n=n)
    layer_factory.check_tvm_against_reference(qspec, qw, tokens, dtype, CFG)


@pytest.mark.tvm
def test_tvm_fp8_with_shared_expert_biases_decode_config_and_subnormals():
    """Shared experts, biases, top-1 with empty experts, the default decode config, and
    weights whose blocks hold subnormal and zero fp8 values (a huge outlier per block)."""
    from moecc.backends.tvm import moe_layer

    torch.manual_seed(5)
    spec, w = layer_factory.make_layer(RouterSpec(8, 1), k=64, n=32, bias=True, num_shared=1)
    gate_up = w.gate_up.clone()
    gate_up[:, ::32, ::32] = 3e3  # one outlier per 32 x 32 block: the rest decode as tiny / subnormal values
    gate_up[:, 5, :] = 0
    w = w._replace(gate_up=gate_up)
    gu, dn = quantize_rows(w.gate_up, "fp8", 32), quantize_rows(w.down, "fp8", 32)
    assert (gu.packed.view(torch.uint8) & 0x78 == 0).float().mean() > 0.05  # subnormals present
    qspec = spec.replace(experts={"weight_format": "fp8", "group_size": 32})
    qw = w._replace(gate_up=gu.packed, down=dn.packed, gate_up_scale=gu.scales, down_scale=dn.scales)
    x = layer_factory.tie_free_hidden(qspec, qw, 1, torch.float32)
    check_close(moe_layer(x, qw, qspec), reference.moe_layer(x, qw, qspec), torch.float32)


@pytest.mark.tvm
@pytest.mark.parametrize("decode", ["f16", "bits", "lut"])
def test_every_fp8_decoder_matches_reference(decode, tmp_path):
    """Each decoder (kernels_llvm_fp8.DECODES) on a layer with short blocks, subnormals and
    negative values, against the reference."""
    from moecc.backends.tvm.kernels_llvm_fp8 import build_with_decode
    from moecc.backends.tvm.op import kernel_key, run_kernels
    from moecc.backends.tvm.key import TargetSpec
    from moecc.backends.reference.routing import route, router_logits
    from moecc.backends.tvm.align import with_shared_experts

    torch.manual_seed(11)
    spec, qspec, qw, _ = fp8_layer(RouterSpec(8, 2), 64, k=96, n=48)
    assert (qw.gate_up.view(torch.uint8) & 0x78 == 0).any()  # some subnormals
    x = layer_factory.tie_free_hidden(qspec, qw, 5, torch.float32)
    key, _ = kernel_key(qspec, torch.float32, TargetSpec("llvm"), CFG, 5, False, False)
    kernels = build_with_decode(key, decode, tmp_path)
    topk_w, topk_ids = route(router_logits(x, qw.router_weight, None, qspec.router), qspec.router, None)
    topk_w, topk_ids = with_shared_experts(topk_w, topk_ids, 8, 0)
    check_close(run_kernels(kernels, key, x, qw, topk_w, topk_ids), reference.moe_layer(x, qw, qspec), torch.float32)


@pytest.mark.tvm
def test_tvm_kernel_key_names_fp8():
    from moecc.backends.tvm.key import TargetSpec
    from moecc.backends.tvm.op import kernel_key

    _, qspec, _, _ = fp8_layer(RouterSpec(8, 2), 64, k=96, n=48)
    key, _ = kernel_key(qspec, torch.float32, TargetSpec("llvm"), CFG, 4, False, False)
    assert (key.weight_format, key.group_size) == ("fp8", 64) and "fp8g64" in key.short_name()
    assert 64 % key.config.vec == 0 and 96 % key.config.vec == 0 and 48 % key.config.vec == 0
