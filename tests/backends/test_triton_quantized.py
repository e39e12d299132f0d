"""The Triton MoE op on quantised expert stacks (int8, int4, fp8 weight-only) against the reference op.

The reference op dequantises each expert it uses to the hidden states' dtype
(backends/reference/quantized.py); the Triton GEMMs dequantise in their weight load to
the same values (fp32 math, one cast), so the comparison is a kernel-accuracy one with
the compute dtype's tolerance (moecc.tolerances; check_close fails on NaN / inf).

CPU: Triton interpreter, fp32 and fp16 (its bf16 dots are wrong; the fp8 decode is done
with integer bit operations, so it runs there too). Small shapes, few programs: the
interpreter's cost grows with both. GPU (marker `gpu`): bf16 and larger shapes.
"""

from __future__ import annotations

import layer_factory
import pytest
import torch
from triton_mode import triton_mode, whole_file_test  # noqa: F401  (autouse fixture)

from moecc.backends import reference
from moecc.backends.reference.quantized import quantize_rows
from moecc.backends.triton.config import KernelConfig
from moecc.spec import RouterSpec
from moecc.tolerances import check_close

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

test_whole_file_in_interpreter_subprocess = whole_file_test(__file__)

DEEPSEEK = RouterSpec(16, 4, "sigmoid", n_group=4, topk_group=2, has_correction_bias=True, renormalize=True,
                      routed_scaling_factor=2.5)
# Few programs and loop steps (BLOCK_K 32 stays inside every group size tested).
PREFILL = KernelConfig(16, 64, 32, 1, 1, 4, 2, "prefill")
DECODE_SPLIT = KernelConfig(16, 64, 16, 1, 4, 4, 2, "decode")  # split-K tails past N


def _moe(*args, **kwargs):
    from moecc.backends.triton import moe_layer

    return moe_layer(*args, **kwargs)


def quantized_layer(router, fmt, group, k, n, dtype=torch.float32, **kw):
    """A random canonical layer with packed stacks (moecc's one layout) -> (qspec, qweights)."""
    spec, w = layer_factory.make_layer(router, k, n, dtype=dtype, device=DEVICE, **kw)
    gu, dn = quantize_rows(w.gate_up, fmt, group), quantize_rows(w.down, fmt, group)
    qspec = spec.replace(experts={"weight_format": fmt, "group_size": group})
    return qspec, w._replace(gate_up=gu.packed, down=dn.packed, gate_up_scale=gu.scales, down_scale=dn.scales)


def run_and_check(spec, weights, tokens, dtype, config):
    x = layer_factory.tie_free_hidden(spec, weights, tokens, dtype, device=DEVICE)
    out = _moe(x, weights, spec, config)
    ref = reference.moe_layer(x, weights, spec)
    assert out.shape == ref.shape and out.dtype == dtype
    check_close(out, ref, dtype)
    return x, out


# (format, group, K, N): groups 32 / 64 / 128 and per-row; K, N no multiple of BLOCK_N (64)
# where the group allows; fp8 blocks that divide neither axis (the shorter last block).
FORMATS = [
    ("int8", 0, 80, 40),
    ("int8", 32, 96, 160),
    ("int4", 32, 160, 96),
    ("int4", 64, 192, 64),
    ("int4", 128, 128, 128),
    ("fp8", 32, 80, 48),
]
FORMAT_IDS = [f"{f}_g{g}_k{k}_n{n}" for f, g, k, n in FORMATS]


# One token (most experts empty) and 19 (no multiple of BLOCK_M), each format in both
# dtypes; not the full product, to keep the interpreter run short.
RUNS = [(1, torch.float16), (19, torch.float32)]


@pytest.mark.parametrize("tokens,dtype", RUNS, ids=["t1_fp16", "t19_fp32"])
@pytest.mark.parametrize("fmt,group,k,n", FORMATS, ids=FORMAT_IDS)
def test_matches_reference(fmt, group, k, n, tokens, dtype):
    torch.manual_seed(tokens + group)
    spec, w = quantized_layer(RouterSpec(8, 2), fmt, group, k, n)
    run_and_check(spec, w, tokens, dtype, PREFILL)


@pytest.mark.parametrize("fmt,group", [("int4", 64), ("fp8", 32)])
def test_ragged_fp16(fmt, group):
    spec, w = quantized_layer(RouterSpec(8, 2), fmt, group, 192, 64)
    run_and_check(spec, w, 19, torch.float16, PREFILL)


@pytest.mark.parametrize("fmt,group", [("int4", 32), ("int8", 0), ("fp8", 32)])
def test_decode_split_k_shared_experts_and_bias(fmt, group):
    spec, w = quantized_layer(DEEPSEEK, fmt, group, 64, 96, num_shared=1, bias=True)
    run_and_check(spec, w, 5, torch.float32, DECODE_SPLIT)


@pytest.mark.parametrize("fmt,group", [("int4", 32), ("int8", 64), ("fp8", 128)])
def test_heuristic_config_keeps_block_k_inside_the_group(fmt, group):
    from moecc.backends.triton.moe import resolve_config

    spec, w = quantized_layer(RouterSpec(8, 2), fmt, group, 128, 64)
    config = resolve_config(spec, 3, torch.float16, torch.device(DEVICE))
    assert group % config.block_k == 0, config
    run_and_check(spec, w, 3, torch.float16, None)


def test_custom_op_runs_quantised_layers():
    """moecc::moe_layer_triton (what lower_kernels binds) passes the scales through."""
    from moecc.ops import moe_layer as op

    spec, w = quantized_layer(RouterSpec(8, 2), "int4", 32, 64, 64)
    x = layer_factory.tie_free_hidden(spec, w, 6, torch.float32, device=DEVICE)
    check_close(op(x, w, spec, "triton"), reference.moe_layer(x, w, spec))


def test_fp8_decode_of_every_finite_byte():
    """Every finite e4m3fn byte (subnormals, both zeros, +-448) in the stacks, decoded by bits."""
    spec, w = quantized_layer(RouterSpec(4, 4), "fp8", 32, 64, 32)  # every token uses every expert
    finite = torch.tensor([b for b in range(256) if b & 0x7F != 0x7F], dtype=torch.uint8, device=DEVICE)  # 254
    for stack in (w.gate_up, w.down):
        flat = stack.view(torch.uint8).view(-1)
        flat.copy_(finite[torch.randperm(flat.numel(), device=DEVICE) % finite.numel()])
    w.gate_up_scale.fill_(1.0 / 448 / 8)  # keeps O(1) pre-activations
    w.down_scale.fill_(1.0 / 448 / 8)
    run_and_check(spec, w, 4, torch.float32, PREFILL)


def test_empty_experts_are_never_read():
    """Experts no token selects hold NaN scales and garbage bytes: output finite and right."""
    router = RouterSpec(16, 1)
    spec, w = quantized_layer(router, "int4", 32, 64, 64)
    x = layer_factory.tie_free_hidden(spec, w, 3, torch.float32, device=DEVICE)
    _, ids = reference.route(reference.router_logits(x, w.router_weight, None, router), router)
    unused = torch.ones(16, dtype=torch.bool, device=DEVICE)
    unused[ids.view(-1)] = False
    assert unused.sum() >= 13
    for scales in (w.gate_up_scale, w.down_scale):
        scales[unused] = float("nan")
    out = _moe(x, w, spec, PREFILL)
    check_close(out, reference.moe_layer(x, w, spec))


def test_nan_scale_of_a_used_expert_fails_the_check():
    spec, w = quantized_layer(RouterSpec(4, 4), "int8", 32, 64, 32)  # every token uses every expert
    w.down_scale[0, 0, 0] = float("nan")
    x = torch.randn(2, 64, device=DEVICE)
    out = _moe(x, w, spec, PREFILL)
    assert not torch.isfinite(out).all()
    with pytest.raises(AssertionError):
        check_close(out, reference.moe_layer(x, w, spec).nan_to_num())


def test_block_k_crossing_a_group_is_refused():
    spec, w = quantized_layer(RouterSpec(8, 2), "int4", 32, 64, 64)
    bad = KernelConfig(16, 64, 64, 1, 1, 4, 2, "prefill")
    with pytest.raises(ValueError, match="crosses a int4 scale group of 32"):
        _moe(torch.randn(2, 64, device=DEVICE), w, spec, bad)


def test_unfit_formats_are_refused_with_a_reason():
    spec, w = quantized_layer(RouterSpec(8, 2), "int4", 8, 64, 32)
    with pytest.raises(ValueError, match="multiple of 16"):
        _moe(torch.randn(2, 64, device=DEVICE), w, spec, PREFILL)
    spec, w = quantized_layer(RouterSpec(8, 2), "int8", 32, 64, 32)
    with pytest.raises(ValueError, match="weight-only"):
        _moe(torch.randn(2, 64, device=DEVICE), w, spec.replace(experts={"activations": "int8"}), PREFILL)


def test_missing_or_misshapen_scales_are_reported():
    spec, w = quantized_layer(RouterSpec(8, 2), "int4", 32, 64, 32)
    with pytest.raises(ValueError, match="down_scale"):
        _moe(torch.randn(2, 64, device=DEVICE), w._replace(down_scale=None), spec, PREFILL)
    with pytest.raises(ValueError, match="gate_up_scale must be"):
        _moe(torch.randn(2, 64, device=DEVICE), w._replace(gate_up_scale=w.gate_up_scale[:, :, :1]), spec, PREFILL)


# ---- GPU only: bf16, larger shapes ------------------------------------------------------

@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("tokens", [1, 7, 64, 300])
@pytest.mark.parametrize("fmt,group", [("int8", 0), ("int4", 32), ("int4", 128), ("fp8", 128)])
def test_bf16_gpu(fmt, group, tokens):
    spec, w = quantized_layer(RouterSpec(64, 6, "sigmoid", n_group=8, topk_group=3, has_correction_bias=True,
                                         renormalize=True, routed_scaling_factor=2.5),
                              fmt, group, 512, 384, num_shared=1, dtype=torch.bfloat16)
    run_and_check(spec, w, tokens, torch.bfloat16, None)  # heuristic config
    for cfg in (KernelConfig(64, 128, 32, 8, 1, 4, 3, "prefill"), KernelConfig(16, 64, 32, 1, 4, 4, 3, "decode")):
        run_and_check(spec, w, tokens, torch.bfloat16, cfg)
