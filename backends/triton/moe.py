"""The moecc MoE op on Triton kernels: routing, alignment, two grouped GEMMs, combine.

    logits = router_logits(x)                      torch linear         [T, E] fp32
    w, ids = route_topk(logits, +S shared slots)   1 kernel             [T, k'] x2
    aligned = align_tokens_by_expert(ids)          2 kernels            slot blocks by expert
    act = gate_up_act(x, gate_up)                  GEMM1 + activation   [T*k', N]
    y = down_proj(act, down)                       GEMM2 (+ split-K)    [P, T*k', K]
    out = combine_slots(y, w)                      weighted top-k sum   [T, K]

Legend: T = tokens, K = hidden, N = intermediate, E = routed experts, S = shared experts
(fused: the last S of the stack, always active with weight 1), k' = k + S slots per token.
Quantised expert stacks (spec.experts.weight_format int8 / int4 / fp8, weight-only) are
dequantised in the GEMMs' weight load to the hidden states' dtype, which is then the
compute dtype (as the reference op does); the layouts are in weight_formats.py.
Every buffer is sized from shapes alone; nothing reads a device value on the host, so
the op can be captured in a CUDA graph. Requires the canonical expert layout
(ExpertSpec.canonical), which the expert-fusion pass produces.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from moecc.backends.reference.routing import router_logits
from moecc.backends.triton.align import align_tokens_by_expert
from moecc.backends.triton.combine import combine_slots
from moecc.backends.triton.config import KernelConfig
from moecc.backends.triton.grouped_gemm import down_proj, gate_up_act
from moecc.backends.triton.heuristics import heuristic_config
from moecc.backends.triton.routing import route_topk
from moecc.backends.triton.weight_formats import block_k_reason, format_params, max_block_k, unfit_reason
from moecc.spec import ExpertSpec, MoELayerSpec
from moecc.weights import MoEWeights

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def moe_layer(
    hidden: torch.Tensor,  # [T, K]
    weights: MoEWeights,
    spec: MoELayerSpec,
    config: Optional[KernelConfig] = None,
) -> torch.Tensor:
    """hidden [T, K] -> [T, K] in hidden's dtype; semantics of reference.moe_layer."""
    e, r = spec.experts, spec.router
    if not e.canonical:
        raise ValueError(
            f"the Triton MoE kernels need the canonical expert layout (concat gate/up, not "
            f"transposed, shared experts fused); got {spec.describe()}: run the expert-fusion pass first"
        )
    why = unfit_reason(e)
    if why:
        raise ValueError(f"the Triton MoE kernels cannot run {spec.describe()}: {why}; use the reference op "
                         "(kernel_backend='reference') or another precision")
    num_stack = r.num_experts + e.num_shared  # E' = E + S
    n, k = e.intermediate_size, e.hidden_size
    _check_shapes(hidden, weights, num_stack, n, k, e)
    t = hidden.shape[0]
    if t == 0:
        return hidden.new_empty(0, k)
    # Quantised stacks are dequantised to the hidden states' dtype (the reference's semantics).
    dtype = weights.gate_up.dtype if e.weight_format == "dense" else hidden.dtype
    if config is None:
        config = resolve_config(spec, t, dtype, hidden.device)
    _check_config(config, spec)

    x = hidden.to(dtype)  # [T, K] (no copy when dtypes match)
    x = x if x.stride(1) == 1 else x.contiguous()
    logits = router_logits(hidden, weights.router_weight, weights.router_bias, r)  # [T, E] fp32
    topk_w, topk_ids = route_topk(logits, r, weights.correction_bias, num_shared=e.num_shared)  # [T, k'] x2
    aligned = align_tokens_by_expert(topk_ids, num_stack, config.block_m)
    act = gate_up_act(x, weights.gate_up, weights.gate_up_bias, aligned, r.top_k + e.num_shared, e, config,
                      weights.gate_up_scale)  # [T*k', N]
    y = down_proj(act, weights.down, weights.down_bias, aligned, e, config, weights.down_scale)  # [P, T*k', K]
    return combine_slots(y, topk_w, hidden.dtype)  # [T, K]


def _check_shapes(hidden: torch.Tensor, w: MoEWeights, num_stack: int, n: int, k: int, e: ExpertSpec) -> None:
    if hidden.dim() != 2 or hidden.shape[1] != k:
        raise ValueError(f"moe_layer expects hidden states [T, {k}], got {tuple(hidden.shape)}")
    fmt = format_params(e)
    expected = {
        "gate_up": (num_stack, 2 * n, k // fmt.pack), "down": (num_stack, k, n // fmt.pack),
        "gate_up_bias": (num_stack, 2 * n), "down_bias": (num_stack, k),
    }
    if e.weight_format != "dense":
        expected.update(gate_up_scale=_scale_shape(e, num_stack, 2 * n, k), down_scale=_scale_shape(e, num_stack, k, n))
    for name, shape in expected.items():
        tensor = getattr(w, name)
        if tensor is None and name.endswith("_scale"):
            raise ValueError(f"{e.weight_format} expert weights need {name} {list(shape)} (fp32)")
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must be {list(shape)} (canonical, E' = E + S), got {list(tensor.shape)}")
        if tensor is not None and tensor.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension")
    if e.weight_format == "dense":
        if w.down.dtype != w.gate_up.dtype:
            raise ValueError(f"gate_up ({w.gate_up.dtype}) and down ({w.down.dtype}) must share a dtype")
        return
    stored = torch.float8_e4m3fn if e.weight_format == "fp8" else torch.uint8
    for name in ("gate_up", "down"):
        if getattr(w, name).dtype != stored:
            raise ValueError(f"{e.weight_format} {name} must be {stored}, got {getattr(w, name).dtype}")
    for name in ("gate_up_scale", "down_scale"):
        if getattr(w, name).dtype != torch.float32:
            raise ValueError(f"{name} must be fp32, got {getattr(w, name).dtype}")
    if hidden.dtype not in DTYPE_NAMES:
        raise ValueError(f"quantised layers compute in the hidden states' dtype: one of {list(DTYPE_NAMES)}, "
                         f"got {hidden.dtype}")


def _scale_shape(e: ExpertSpec, stack: int, rows: int, cols: int) -> tuple:
    """The scales of a quantised [stack, rows, cols] (reduction axis cols) stack."""
    g = e.group_size
    if e.weight_format == "fp8":
        return (stack, -(-rows // g), -(-cols // g))
    return (stack, rows, cols // (g or cols))


def _check_config(config: KernelConfig, spec: MoELayerSpec) -> None:
    if min(config.block_m, config.block_n, config.block_k) < 16:
        raise ValueError(f"block_m/n/k must be at least 16 (tl.dot's smallest tile), got {config}")
    if config.strategy == "prefill" and config.split_k != 1:
        raise ValueError(f"split_k={config.split_k} is a decode-strategy parameter; prefill uses split_k=1")
    why = block_k_reason(config.block_k, spec.experts)
    if why:
        raise ValueError(f"{config} cannot run {spec.describe()}: {why}")


def resolve_config(spec: MoELayerSpec, num_tokens: int, dtype: torch.dtype, device: torch.device) -> KernelConfig:
    """The launch configuration for this layer: tuning database, else the heuristic (cached).

    dtype: the compute dtype. Quantised layers: the tuning tables hold dense layers only, so
    they take the heuristic with BLOCK_K limited to the format's scale group.
    """
    device_key = _device_key(device.type, device.index)
    shape = (spec.router.num_experts, spec.experts.intermediate_size, spec.experts.hidden_size, spec.router.top_k)
    if spec.experts.weight_format != "dense":
        return _quantized_cached(shape, DTYPE_NAMES.get(dtype, str(dtype)), num_tokens, device_key,
                                 max_block_k(spec.experts))
    return _resolve_cached(shape, DTYPE_NAMES.get(dtype, str(dtype)), num_tokens, device_key)


@functools.lru_cache(maxsize=4096)
def _quantized_cached(shape: tuple, dtype: str, num_tokens: int, device_key: str, block_k_limit: int) -> KernelConfig:
    return heuristic_config(*shape, num_tokens, dtype, _profile(device_key), max_block_k=block_k_limit)


def _profile(device_key: str):
    from moecc import devices

    try:
        return devices.profile(device_key)
    except devices.UnknownDeviceError:
        return None


@functools.lru_cache(maxsize=16)
def _device_key(device_type: str, index: Optional[int]) -> str:
    if device_type != "cuda":
        return device_type
    from moecc.devices import current_device_key

    return current_device_key(index if index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=4096)
def _resolve_cached(shape: tuple, dtype: str, num_tokens: int, device_key: str) -> KernelConfig:
    profile = _profile(device_key)

    def default() -> dict:
        return heuristic_config(*shape, num_tokens, dtype, profile).to_dict()

    try:
        from moecc.tuning import lookup_config
    except ImportError:  # the tuning package predates lookup_config: heuristic only
        return KernelConfig.from_dict(default())
    res = lookup_config("triton.moe", shape, dtype, num_tokens, device_key, default=default)
    return KernelConfig.from_dict(res.config)
