"""The TVM MoE layer op: torch routing and alignment, TVM grouped GEMMs and combine.

    out[t] = sum_j w[t, j] * expert_{id[t, j]}(x[t]) + sum_s shared_s(x[t])

Split (documented in docs/backends.md):
    torch  router logits and top-k (backends/reference/routing.py: every router variant),
           sorting the assignments by expert into blocks (align.py)
    TVM    moe_gate_up_act    grouped gate/up GEMM + bias + activation (fused epilogue)
           moe_down_weighted  grouped down GEMM + bias + routing weight (fused epilogue)
           moe_combine        per-token sum of its k' rows, cast to the output dtype
Tensors cross into TVM by DLPack (tvm_ffi converts torch tensors at the call): weights
are never copied; the activations are gathered once into per-expert blocks of rows
(`index_select`, [NB, BM, K]) so the GEMM inner loops read contiguous rows. Intermediates
are fp32.
"""

from __future__ import annotations

import functools

import torch

from moecc.backends.reference.routing import route, router_logits
from moecc.backends.tvm.activation import ActivationSpec
from moecc.backends.tvm.align import align_tokens_by_expert, with_shared_experts
from moecc.backends.tvm.cache import KernelSet, load_kernels
from moecc.backends.tvm.config import resolve_config
from moecc.backends.tvm.key import KernelKey, TargetSpec
from moecc.backends.tvm.runtime import device_key, target_for, use_torch_thread_count
from moecc.spec import MoELayerSpec
from moecc.weights import MoEWeights

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def kernel_key(spec: MoELayerSpec, dtype: torch.dtype, target: TargetSpec, config: dict | None,
               num_tokens: int, has_gate_up_bias: bool, has_down_bias: bool,
               dev_key: str = "") -> tuple[KernelKey, str]:
    """The KernelKey (config resolved through the tuning database) and the config's source."""
    e_spec = spec.experts
    r_spec = spec.router
    if dtype not in _DTYPE_NAMES:
        raise TypeError(f"TVM MoE kernels take {list(_DTYPE_NAMES)}, not {dtype}")
    dtype_name = _DTYPE_NAMES[dtype]
    resolved = resolve_config(
        config, target_kind=target.kind,
        shape=(r_spec.num_experts, e_spec.intermediate_size, e_spec.hidden_size, r_spec.top_k),
        dtype=dtype_name, num_tokens=num_tokens, device_key=dev_key or f"{target.kind}",
    )
    key = KernelKey(
        num_experts=r_spec.num_experts + e_spec.num_shared,
        n=e_spec.intermediate_size,
        k=e_spec.hidden_size,
        top_k=r_spec.top_k + e_spec.num_shared,
        dtype=dtype_name,
        act=ActivationSpec(e_spec.activation, float(e_spec.swiglu_alpha), float(e_spec.swiglu_limit)),
        gate_up_bias=has_gate_up_bias,
        down_bias=has_down_bias,
        config=resolved.config.fitted(target.kind, e_spec.intermediate_size, e_spec.hidden_size),
        target=target,
    )
    return key, resolved.source


def moe_layer(hidden: torch.Tensor, weights: MoEWeights, spec: MoELayerSpec,
              config: dict | None = None) -> torch.Tensor:
    """hidden [T, K] -> [T, K] in hidden's dtype; weights in the canonical layout."""
    e_spec = spec.experts
    if not e_spec.canonical:
        raise ValueError("moecc.backends.tvm.moe_layer needs spec.experts.canonical weights "
                         "(concat gate_up [E', 2N, K], down [E', K, N], shared experts fused); "
                         "convert with reference.experts.canonical_expert_weights first")
    if hidden.dim() != 2 or hidden.shape[1] != e_spec.hidden_size:
        raise ValueError(f"moe_layer expects hidden states [T, {e_spec.hidden_size}], got {tuple(hidden.shape)}")
    n, k = e_spec.intermediate_size, e_spec.hidden_size
    e_total = spec.router.num_experts + e_spec.num_shared
    gate_up, down = weights.gate_up, weights.down
    if tuple(gate_up.shape) != (e_total, 2 * n, k) or tuple(down.shape) != (e_total, k, n):
        raise ValueError(f"expected gate_up [{e_total}, {2 * n}, {k}] and down [{e_total}, {k}, {n}], "
                         f"got {tuple(gate_up.shape)} and {tuple(down.shape)}")
    t = hidden.shape[0]
    if t == 0:
        return hidden.new_empty(0, k)

    logits = router_logits(hidden, weights.router_weight, weights.router_bias, spec.router)  # [T, E]
    topk_w, topk_ids = route(logits, spec.router, weights.correction_bias)  # [T, k] x2
    topk_w, topk_ids = with_shared_experts(topk_w, topk_ids, spec.router.num_experts,
                                           e_spec.num_shared)  # [T, k'] x2

    target = target_for(hidden.device.type, hidden.device.index or 0)
    dev_key = device_key(target, hidden.device.index or 0)
    has_biases = (weights.gate_up_bias is not None, weights.down_bias is not None)
    if config is None:
        # Per-call lookups stat the tuning folders (~0.3 ms, 4-6% of a decode-sized call on
        # CPU): resolve once per (layer, dtype, T, device), as the Triton op does. A table
        # written while the process runs is picked up by the next process.
        key = _cached_kernel_key(spec.to_json(), gate_up.dtype, target, t, *has_biases, dev_key)
    else:
        key, _ = kernel_key(spec, gate_up.dtype, target, config, t, *has_biases, dev_key)
    if target.kind == "llvm":
        use_torch_thread_count()
    kernels = load_kernels(key)
    return run_kernels(kernels, key, hidden, weights, topk_w, topk_ids)


@functools.lru_cache(maxsize=4096)
def _cached_kernel_key(spec_json: str, dtype: torch.dtype, target: TargetSpec, num_tokens: int,
                       has_gate_up_bias: bool, has_down_bias: bool, dev_key: str) -> KernelKey:
    key, _ = kernel_key(MoELayerSpec.from_json(spec_json), dtype, target, None, num_tokens,
                        has_gate_up_bias, has_down_bias, dev_key)
    return key


def run_kernels(kernels: KernelSet, key: KernelKey, hidden: torch.Tensor, weights: MoEWeights,
                topk_w: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """Align, then the three TVM kernels on torch tensors (DLPack, no copies)."""
    n, k, bm = key.n, key.k, key.config.block_m
    dt = weights.gate_up.dtype
    dev = hidden.device
    rows = align_tokens_by_expert(topk_w, topk_ids, key.num_experts, bm)
    x = hidden.to(dt)  # [T, K]
    xg = x.index_select(0, rows.tok.flatten()).view(rows.num_blocks, bm, k)  # [NB, BM, K] rows by expert
    gate_up = weights.gate_up.contiguous().view(key.num_experts, 2, n, k)  # [E', 2, N, K]
    down = weights.down.contiguous()  # [E', K, N]
    gu_bias = (weights.gate_up_bias.to(dt).contiguous().view(key.num_experts, 2, n)
               if key.gate_up_bias else torch.zeros(1, 2, n, dtype=dt, device=dev))  # [E', 2, N]
    d_bias = (weights.down_bias.to(dt).contiguous() if key.down_bias
              else torch.zeros(1, k, dtype=dt, device=dev))  # [E', K]

    act = torch.empty(rows.num_blocks, bm, n, dtype=torch.float32, device=dev)  # [NB, BM, N]
    y = torch.empty(rows.num_blocks, bm, k, dtype=torch.float32, device=dev)  # [NB, BM, K]
    out = torch.empty(hidden.shape[0], k, dtype=dt, device=dev)  # [T, K]
    kernels.gate_up_act(xg, rows.experts, rows.block_ptr, gate_up, gu_bias, act)
    kernels.down_weighted(act, rows.row_weight, rows.experts, rows.block_ptr, down, d_bias, y)
    kernels.combine(y, rows.rows, out)
    return out.to(hidden.dtype)
