"""Packed int8 / int4 expert weights: the layout, the reference's dequantisation, and
the TVM llvm kernels that dequantise in their inner loop, against the reference.

Tolerances: the kernels and the reference compute on the same dequantised weights, so
the comparison is a kernel-accuracy one (moecc.tolerances): fp32 1e-4 / 1e-5. bf16 model
dtype: the kernels keep fp32 intermediates, so (as tests/backends/test_tvm_moe.py does
for fp16) they are compared with the reference run in fp32 on the same bf16 inputs at
bf16 tolerance. check_close fails on NaN.
"""

from __future__ import annotations

import layer_factory
import pytest
import torch

from moecc.backends import reference
from moecc.backends.reference.quantized import dequantize, group_fits, quantize_rows, sqnr_db
from moecc.spec import RouterSpec, SpecError
from moecc.tolerances import check_close


def _plain_dequant(packed, scales, fmt, cols):
    """Element by element, independent of the vectorised code: (nibble or byte - Z) * scale."""
    rows = packed.shape[0]
    out = torch.empty(rows, cols, dtype=torch.float64)
    group = cols // scales.shape[1]
    for r in range(rows):
        for c in range(cols):
            if fmt == "int4":
                byte = int(packed[r, c // 2])
                q = (byte % 16 if c % 2 == 0 else byte // 16) - 8
            else:
                q = int(packed[r, c]) - 128
            out[r, c] = q * float(scales[r, c // group])
    return out


@pytest.mark.parametrize("fmt,group", [("int8", 0), ("int8", 8), ("int4", 8), ("int4", 32)])
def test_dequantize_matches_plain_computation_and_error_bound(fmt, group):
    torch.manual_seed(0)
    w = torch.randn(6, 32)
    q = quantize_rows(w, fmt, group)
    per = 2 if fmt == "int4" else 1
    assert q.packed.dtype == torch.uint8 and tuple(q.packed.shape) == (6, 32 // per)
    assert q.scales.dtype == torch.float32 and tuple(q.scales.shape) == (6, 32 // (group or 32))
    deq = dequantize(q.packed, q.scales, fmt)
    torch.testing.assert_close(deq.double(), _plain_dequant(q.packed, q.scales, fmt, 32), rtol=0, atol=1e-6)
    # Rounding to the nearest level: every value within half a step of its original.
    step = q.scales.repeat_interleave(group or 32, dim=1)
    assert ((deq - w).abs() <= step / 2 + 1e-6).all()


def test_int4_layout_low_nibble_first_with_implied_zero_point():
    w = torch.tensor([[7.0, -7.0, 0.0, 1.0]])  # absmax 7 -> scale 1, q = w
    q = quantize_rows(w, "int4", 4)
    assert q.packed.tolist() == [[(7 + 8) | ((-7 + 8) << 4), (0 + 8) | ((1 + 8) << 4)]]
    assert q.scales.tolist() == [[1.0]]
    q8 = quantize_rows(torch.tensor([[127.0, -127.0]]), "int8", 0)
    assert q8.packed.tolist() == [[255, 1]]


def test_zero_group_and_nan_handling():
    q = quantize_rows(torch.zeros(2, 8), "int4", 4)
    assert (dequantize(q.packed, q.scales, "int4") == 0).all()
    assert sqnr_db(torch.ones(4), torch.tensor([1.0, float("nan"), 1.0, 1.0])) == float("-inf")
    assert group_fits("int4", 96, 64) and group_fits("int4", 64, 3) and not group_fits("int8", 64, 0)


def test_spec_accepts_quantised_formats_only_in_canonical_layout():
    spec, _ = layer_factory.make_layer(RouterSpec(4, 2))
    spec.replace(experts={"weight_format": "int4", "group_size": 16})
    with pytest.raises(SpecError, match="weight format"):
        spec.replace(experts={"weight_format": "fp4"})
    with pytest.raises(SpecError, match="canonical"):
        spec.replace(experts={"weight_format": "int8", "down_transposed": True})


def quantized_layer(router, fmt, group, dtype=torch.float32, **kw):
    spec, w = layer_factory.make_layer(router, dtype=dtype, **kw)
    gu, dn = quantize_rows(w.gate_up, fmt, group), quantize_rows(w.down, fmt, group)
    qspec = spec.replace(experts={"weight_format": fmt, "group_size": group})
    qw = w._replace(gate_up=gu.packed, down=dn.packed, gate_up_scale=gu.scales, down_scale=dn.scales)
    dense = w._replace(gate_up=dequantize(gu.packed, gu.scales, fmt), down=dequantize(dn.packed, dn.scales, fmt))
    return spec, qspec, qw, dense


def test_reference_op_is_the_dense_layer_on_dequantised_weights():
    spec, qspec, qw, dense = quantized_layer(RouterSpec(8, 2), "int4", 16)
    x = layer_factory.tie_free_hidden(spec, dense, 9, torch.float32)
    check_close(reference.moe_layer(x, qw, qspec), reference.moe_layer(x, dense, spec), torch.float32)


CFG = {"block_m": 4, "tile_n": 2, "tile_k": 2, "vec": 16, "red_tile": 32}


@pytest.fixture(scope="module", autouse=True)
def _cache_dir(fresh_tvm_cache):
    """A fresh on-disk TVM module cache for this test module (tests/backends/conftest.py)."""


@pytest.mark.tvm
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt,group", [("int8", 0), ("int8", 16), ("int4", 16), ("int4", 32)])
@pytest.mark.parametrize("tokens", [1, 7])  # one token (most experts empty); ragged
def test_tvm_quantized_matches_reference(dtype, fmt, group, tokens):
    torch.manual_seed(tokens)
    _, qspec, qw, _ = quantized_layer(RouterSpec(8, 2), fmt, group, dtype=dtype)
    layer_factory.check_tvm_against_reference(qspec, qw, tokens, dtype, CFG)


@pytest.mark.tvm
def test_tvm_quantized_with_shared_expert_biases_and_decode_config():
    """Shared (always-active) experts, biases, top-1 with experts left empty, and the
    default decode config (block_m 1, prefetch) instead of the test config."""
    from moecc.backends.tvm import moe_layer

    torch.manual_seed(3)
    _, qspec, qw, _ = quantized_layer(RouterSpec(8, 1), "int4", 8, bias=True, num_shared=1)
    x = layer_factory.tie_free_hidden(qspec, qw, 1, torch.float32)
    check_close(moe_layer(x, qw, qspec), reference.moe_layer(x, qw, qspec), torch.float32)


@pytest.mark.tvm
def test_tvm_kernel_key_names_format_and_group():
    from moecc.backends.tvm.op import kernel_key
    from moecc.backends.tvm.key import TargetSpec

    _, qspec, _, _ = quantized_layer(RouterSpec(8, 2), "int4", 16)
    dense, _ = kernel_key(qspec.replace(experts={"weight_format": "dense", "group_size": 0}), torch.float32,
                          TargetSpec("llvm"), CFG, 4, False, False)
    packed, _ = kernel_key(qspec, torch.float32, TargetSpec("llvm"), CFG, 4, False, False)
    assert (packed.weight_format, packed.group_size) == ("int4", 16) and dense.weight_format == "dense"
    assert packed.digest("x") != dense.digest("x") and "int4g16" in packed.short_name()
    assert packed.config.vec % 2 == 0 and 16 % packed.config.vec == 0


# --- int8 activations (w8a8 / w4a8): kernels_llvm_vnni.py -------------------------------

def _needs_vnni():
    from moecc.backends.tvm.build import host_has_vnni

    if not host_has_vnni():
        pytest.skip("this CPU has no AVX512-VNNI")


def test_fake_quantized_activations_are_int8_times_row_group_scale():
    from moecc.backends.reference.quantized import fake_quantize_activations, quantize_activations

    x = torch.randn(5, 64)
    x[2] = 0  # an all-zero row keeps scale 0 and quantises to exactly 0
    q, s = quantize_activations(x, 16)
    assert q.dtype == torch.int8 and s.shape == (5, 4) and q.abs().max() <= 127
    assert torch.equal(q[2], torch.zeros(64, dtype=torch.int8)) and not torch.isnan(s).any()
    for r in (0, 4):  # each group's absmax maps to +-127, the rest rounds to the nearest step
        for g in range(4):
            chunk = x[r, 16 * g:16 * g + 16]
            assert torch.equal(q[r, 16 * g:16 * g + 16], torch.round(chunk / (chunk.abs().max() / 127)).to(torch.int8))
    fq = fake_quantize_activations(x, 16)
    assert (fq - x).abs().max() <= s.max() / 2 + 1e-6 and torch.equal(fq[2], x[2])
    with pytest.raises(ValueError, match="does not divide"):
        quantize_activations(x, 48)


def test_spec_accepts_int8_activations_only_with_quantised_weights():
    spec, qspec, _, _ = quantized_layer(RouterSpec(8, 2), "int8", 32)
    assert "a8" in qspec.replace(experts={"activations": "int8"}).describe()
    with pytest.raises(SpecError, match="activations"):
        spec.replace(experts={"activations": "int8"})
    with pytest.raises(SpecError, match="activations"):
        qspec.replace(experts={"activations": "fp8"})


@pytest.mark.tvm
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt,group,k,n", [("int8", 0, 64, 32), ("int8", 16, 64, 32), ("int4", 32, 64, 32),
                                           ("int4", 128, 256, 128)])  # 16-, 4- and 8-lane dot products
@pytest.mark.parametrize("tokens", [1, 7])  # one token (most experts empty); ragged
def test_tvm_int8_activation_kernels_match_reference(dtype, fmt, group, k, n, tokens):
    """The integer dot products equal the reference's fake-quantised fp32 math: the kernel
    and the reference quantise the same rows the same way (exact integers), so only the
    fp32 summation order differs."""
    _needs_vnni()
    torch.manual_seed(tokens)
    spec, w = layer_factory.make_layer(RouterSpec(8, 2), k=k, n=n, dtype=dtype,
                                       bias=fmt == "int4" and dtype == torch.float32)
    gu, dn = quantize_rows(w.gate_up, fmt, group), quantize_rows(w.down, fmt, group)
    qspec = spec.replace(experts={"weight_format": fmt, "group_size": group, "activations": "int8"})
    qw = w._replace(gate_up=gu.packed, down=dn.packed, gate_up_scale=gu.scales, down_scale=dn.scales)
    x, ref = layer_factory.check_tvm_against_reference(
        qspec, qw, tokens, dtype, {"block_m": 2, "tile_n": 2, "tile_k": 2, "vec": 16, "red_tile": 32})
    # The quantisation is visible: the weight-only result differs by more than the tolerance.
    weight_only = reference.moe_layer(x.float(), qw, qspec.replace(experts={"activations": "float"}))
    assert (weight_only - ref).abs().max() > 1e-4
