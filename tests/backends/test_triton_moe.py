"""The Triton MoE op against the reference op, on fresh random inputs.

CPU: Triton interpreter, fp32 and fp16 (the interpreter's bf16 dot is wrong), small
shapes with large blocks. GPU (marker `gpu`): bf16 as well, CUDA-graph capture, no host
synchronisation, bitwise determinism. Tolerances come from moecc.tolerances (one table);
`check_close` fails on NaN/inf.
"""

from __future__ import annotations

import layer_factory
import pytest
import torch
from triton_mode import triton_mode, whole_file_test  # noqa: F401  (autouse fixture)

from moecc.backends import reference
from moecc.backends.triton.config import KernelConfig
from moecc.spec import ExpertSpec, MoELayerSpec, RouterSpec
from moecc.tolerances import check_close
from moecc.weights import make_weights

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


test_whole_file_in_interpreter_subprocess = whole_file_test(__file__)


def _moe(*args, **kwargs):
    from moecc.backends.triton import moe_layer

    return moe_layer(*args, **kwargs)


DEEPSEEK = RouterSpec(16, 4, "sigmoid", n_group=4, topk_group=2, has_correction_bias=True, renormalize=True,
                      renormalize_eps=1e-20, routed_scaling_factor=2.5)
GPT_OSS = RouterSpec(8, 2, "topk_softmax", has_router_bias=True)


def make_layer(router: RouterSpec, k: int = 64, n: int = 32, **kwargs):
    """A random canonical layer on this file's device (tests/backends/layer_factory.py)."""
    return layer_factory.make_layer(router, k, n, device=DEVICE, **kwargs)


def run_and_check(spec, weights, t, config=None, dtype=None):
    dtype = dtype or weights.gate_up.dtype
    x = layer_factory.tie_free_hidden(spec, weights, t, dtype, device=DEVICE)
    out = _moe(x, weights, spec, config)
    ref = reference.moe_layer(x, weights, spec)
    assert out.shape == ref.shape and out.dtype == x.dtype
    check_close(out, ref, dtype)
    return out


PREFILL16 = KernelConfig(block_m=16, block_n=32, block_k=32, group_m=1, split_k=1, num_warps=4, num_stages=2,
                         strategy="prefill")
PREFILL32 = KernelConfig(32, 32, 32, 8, 1, 4, 2, "prefill")
DECODE = KernelConfig(16, 64, 16, 1, 2, 4, 2, "decode")
DECODE_SPLIT4 = KernelConfig(16, 64, 16, 1, 4, 4, 2, "decode")
# Few programs and loop steps: the interpreter's cost grows with both.
FAST = KernelConfig(16, 64, 64, 1, 1, 4, 2, "prefill")


@pytest.mark.parametrize("t", [1, 37])  # one token; a count that is no multiple of the block
@pytest.mark.parametrize("config", [None, PREFILL16, PREFILL32, DECODE, DECODE_SPLIT4],
                         ids=["heuristic", "prefill16", "prefill32_group8", "decode_split2", "decode_split4"])
def test_configs_fp32(t, config):
    spec, w = make_layer(RouterSpec(8, 2))
    run_and_check(spec, w, t, config)


@pytest.mark.parametrize("router", [RouterSpec(8, 1), RouterSpec(1, 1)], ids=["top1", "single_expert"])
def test_top1_and_single_expert(router):
    spec, w = make_layer(router)
    run_and_check(spec, w, 21, FAST)


@pytest.mark.parametrize("router", [
    RouterSpec(8, 2, renormalize=True),
    RouterSpec(16, 3, "sigmoid"),
    DEEPSEEK,
    RouterSpec(16, 3, "sigmoid", n_group=4, topk_group=2, group_scoring="max", routed_scaling_factor=2.0),
    GPT_OSS,
], ids=["softmax_renorm", "sigmoid", "deepseek_v3", "group_max", "gpt_oss"])
def test_router_variants(router):
    spec, w = make_layer(router)
    run_and_check(spec, w, 19, FAST)


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh", "swiglu_oai"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_activations_and_biases(activation, bias, dtype):
    # swiglu_limit 1.0 makes the clamps bite on O(1) pre-activations.
    spec, w = make_layer(GPT_OSS if activation == "swiglu_oai" else RouterSpec(8, 2), activation=activation,
                         bias=bias, dtype=dtype, swiglu_limit=1.0 if activation == "swiglu_oai" else 7.0)
    run_and_check(spec, w, 13, FAST)


@pytest.mark.parametrize("num_shared", [1, 2])
@pytest.mark.parametrize("config", [FAST, DECODE], ids=["prefill", "decode"])
def test_shared_experts(num_shared, config):
    spec, w = make_layer(DEEPSEEK, num_shared=num_shared)
    run_and_check(spec, w, 11, config)


def test_empty_experts_are_never_read():
    """Experts no token selects hold NaN weights; the output must stay finite and right."""
    router = RouterSpec(16, 1)
    spec, w = make_layer(router)
    x = torch.randn(3, 64, device=DEVICE)
    logits = reference.router_logits(x, w.router_weight, None, router)
    _, ids = reference.route(logits, router)
    unused = torch.ones(16, dtype=torch.bool, device=DEVICE)
    unused[ids.view(-1)] = False
    assert unused.sum() >= 13
    w.gate_up[unused] = float("nan")
    w.down[unused] = float("nan")
    out = _moe(x, w, spec, FAST)
    check_close(out, reference.moe_layer(x, w, spec))


def test_nan_in_output_fails_the_check():
    spec, w = make_layer(RouterSpec(4, 4))  # every expert is used by every token
    w.down[0, 0, 0] = float("nan")
    x = torch.randn(2, 64, device=DEVICE)
    out = _moe(x, w, spec, FAST)
    with pytest.raises(AssertionError):
        check_close(out, reference.moe_layer(x, w, spec).nan_to_num())


def test_hidden_dtype_is_kept():
    spec, w = make_layer(RouterSpec(8, 2), dtype=torch.float16)
    x = torch.randn(5, 64, device=DEVICE)  # fp32 activations, fp16 experts
    out = _moe(x, w, spec, FAST)
    assert out.dtype == torch.float32
    check_close(out, reference.moe_layer(x, w, spec), torch.float16)


def test_zero_tokens():
    spec, w = make_layer(RouterSpec(8, 2))
    assert _moe(torch.empty(0, 64, device=DEVICE), w, spec).shape == (0, 64)


def test_requires_canonical_layout():
    spec, w = make_layer(RouterSpec(8, 2))
    spec = spec.replace(experts={"down_transposed": True})
    with pytest.raises(ValueError, match="expert-fusion pass"):
        _moe(torch.randn(2, 64, device=DEVICE), w, spec)


def test_prefill_rejects_split_k():
    spec, w = make_layer(RouterSpec(8, 2))
    bad = KernelConfig(16, 32, 32, 1, 2, 4, 2, "prefill")
    with pytest.raises(ValueError, match="split_k"):
        _moe(torch.randn(2, 64, device=DEVICE), w, spec, bad)


def test_rejects_tiles_below_16():
    spec, w = make_layer(RouterSpec(8, 2))
    with pytest.raises(ValueError, match="at least 16"):
        _moe(torch.randn(2, 64, device=DEVICE), w, spec, KernelConfig(8, 32, 32, 1, 1, 4, 2, "decode"))


def test_is_available():
    from moecc.backends.triton import is_available

    assert is_available(DEVICE)
    assert is_available(torch.zeros(1, device=DEVICE))


def test_wrong_weight_shape_is_reported():
    spec, w = make_layer(DEEPSEEK, num_shared=1)
    w = w._replace(down=w.down[:-1])  # shared expert missing from the stack
    with pytest.raises(ValueError, match="down"):
        _moe(torch.randn(2, 64, device=DEVICE), w, spec)


# ---- GPU only: bf16, larger shapes, CUDA graphs, determinism --------------------------

@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("t", [1, 7, 64, 300])
@pytest.mark.parametrize("layer", ["mixtral_like", "deepseek_shared", "gpt_oss_bias"])
def test_bf16_gpu(t, layer):
    if layer == "mixtral_like":
        spec, w = make_layer(RouterSpec(8, 2), k=256, n=512, dtype=torch.bfloat16)
    elif layer == "deepseek_shared":
        spec, w = make_layer(RouterSpec(64, 6, "sigmoid", n_group=8, topk_group=3, has_correction_bias=True,
                                        renormalize=True, routed_scaling_factor=2.5),
                             k=256, n=128, num_shared=2, dtype=torch.bfloat16)
    else:
        spec, w = make_layer(GPT_OSS, k=256, n=256, activation="swiglu_oai", bias=True, dtype=torch.bfloat16)
    run_and_check(spec, w, t)  # heuristic config (or the tuning table)
    for cfg in (PREFILL32, KernelConfig(64, 128, 64, 8, 1, 4, 3, "prefill"), DECODE_SPLIT4):
        run_and_check(spec, w, t, cfg)


@pytest.mark.gpu
@gpu_only
def test_cuda_graph_capture_and_no_host_sync():
    spec, w = make_layer(DEEPSEEK, k=128, n=64, num_shared=1, dtype=torch.bfloat16)
    x = torch.randn(33, 128, device=DEVICE, dtype=torch.bfloat16)
    _moe(x, w, spec)  # compile outside the capture
    torch.cuda.set_sync_debug_mode("error")  # any host synchronisation raises
    try:
        _moe(x, w, spec)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _moe(x, w, spec)
    for _ in range(2):  # replay on fresh inputs written into the captured buffer
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        check_close(out, reference.moe_layer(x, w, spec), torch.bfloat16)


@pytest.mark.gpu
@gpu_only
def test_bitwise_deterministic():
    spec, w = make_layer(RouterSpec(8, 2), k=256, n=256, dtype=torch.bfloat16)
    x = torch.randn(200, 256, device=DEVICE, dtype=torch.bfloat16)
    for cfg in (None, DECODE_SPLIT4):
        first = _moe(x, w, spec, cfg)
        assert all(torch.equal(first, _moe(x, w, spec, cfg)) for _ in range(3))
