"""The TVM MoE layer op: torch routing and alignment, TVM grouped GEMMs and combine.

    out[t] = sum_j w[t, j] * expert_{id[t, j]}(x[t]) + sum_s shared_s(x[t])

Split (documented in docs/backends.md):
    torch  router logits and top-k (backends/reference/routing.py: every router variant),
           sorting the assignments by expert into blocks (align.py)
    TVM    moe_gate_up_act    grouped gate/up GEMM + bias + activation (fused epilogue)
           moe_down_weighted  grouped down GEMM + bias + routing weight (fused epilogue)
           moe_combine        per-token sum of its k' rows, cast to the output dtype
Quantised layers (spec.experts.weight_format int8 / int4 / fp8) pass the packed stacks
and their fp32 scales (backends/reference/quantized.py) to GEMMs that dequantise while
loading (kernels_llvm_quantized.py, kernels_llvm_fp8.py; llvm only); the output dtype is hidden's.
Tensors cross into TVM by DLPack (tvm_ffi converts torch tensors at the call): weights
are never copied; the activations are gathered once into per-expert blocks of rows
(`index_select`, [NB, BM, K]) so the GEMM inner loops read contiguous rows. Intermediates
are fp32.
"""

from __future__ import annotations

import functools

import torch

from moecc.backends.reference.routing import route, router_logits, stack_index
from moecc.backends.tvm.activation import ActivationSpec
from moecc.backends.tvm import row_chunks
from moecc.backends.tvm.align import align_tokens_by_expert, with_shared_experts
from moecc.backends.tvm.cache import KernelSet, load_kernels
from moecc.backends.tvm.config import resolve_config
from moecc.backends.tvm.key import KernelKey, TargetSpec
from moecc.backends.tvm.runtime import aligned, device_key, target_for, use_torch_thread_count
from moecc.spec import MoELayerSpec
from moecc.weights import MoEWeights

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def kernel_key(spec: MoELayerSpec, dtype: torch.dtype, target: TargetSpec, config: dict | None,
               num_tokens: int, has_gate_up_bias: bool, has_down_bias: bool,
               dev_key: str = "") -> tuple[KernelKey, str]:
    """The KernelKey (config resolved through the tuning database) and the config's source."""
    e_spec = spec.experts
    r_spec = spec.router
    e_stack = r_spec.num_experts - len(r_spec.masked_experts)  # routed stack rows: masked (pruned) have none
    if dtype not in _DTYPE_NAMES:
        raise TypeError(f"TVM MoE kernels take {list(_DTYPE_NAMES)}, not {dtype}")
    dtype_name = _DTYPE_NAMES[dtype]
    resolved = resolve_config(
        config, target_kind=target.kind,
        shape=(e_stack, e_spec.intermediate_size, e_spec.hidden_size, r_spec.top_k),
        dtype=dtype_name, num_tokens=num_tokens, device_key=dev_key or f"{target.kind}",
    )
    config = resolved.config.fitted(target.kind, e_spec.intermediate_size, e_spec.hidden_size)
    if e_spec.weight_format != "dense":
        config = fit_groups(config, e_spec)
    key = KernelKey(
        num_experts=e_stack + e_spec.num_shared,
        n=e_spec.intermediate_size,
        k=e_spec.hidden_size,
        top_k=r_spec.top_k + e_spec.num_shared,
        dtype=dtype_name,
        act=ActivationSpec(e_spec.activation, float(e_spec.swiglu_alpha), float(e_spec.swiglu_limit)),
        gate_up_bias=has_gate_up_bias,
        down_bias=has_down_bias,
        config=config,
        target=target,
        weight_format=e_spec.weight_format,
        group_size=e_spec.group_size,
        activations=e_spec.activations,
    )
    return key, resolved.source


def fit_groups(config, e_spec):
    """Quantised GEMMs: a step must stay inside one scale group.

    Dequantising kernels (kernels_llvm_quantized.py): a step reads vec bytes, vec columns
    for int8 and 2*vec for int4. Integer dot products (kernels_llvm_vnni.py): vec is the
    int32 lanes of one VNNI instruction (16, 8 or 4), a step reads 4*vec bytes, and the
    tiles are set as measured below (the four accumulator arrays of the gate/up kernel
    must also fit the 32 vector registers).
    """
    import dataclasses
    import math

    n, k = e_spec.intermediate_size, e_spec.hidden_size
    span = math.gcd(e_spec.group_size or k, e_spec.group_size or n, n, k)
    per_byte = 2 if e_spec.weight_format == "int4" else 1
    if e_spec.activations == "int8":
        lanes = max((d for d in (16, 8, 4) if span % (4 * d * per_byte) == 0), default=0)
        if not lanes:
            raise ValueError(f"{e_spec.weight_format} weights with int8 activations need groups of a multiple "
                             f"of {16 * per_byte} columns dividing N={n}, K={k} (group size {e_spec.group_size})")
        # Measured (2-core Xeon, 2026-12-03, E=128 N=768 K=2048 top-8, bf16 hidden, fresh
        # routing every call, a sweep of (tile_n, tile_k, prefetch)): for block_m <= 2,
        # one gate/up column pair and two down rows per task with prefetch 4 KiB ahead beat
        # the previous (2, 4, 2 KiB): w4a8 M=1 0.93-0.96 vs 1.03-1.11 ms, M=4 3.14 vs 3.62,
        # M=16 (block_m 2) 10.1 vs 15.0 (tile_k 1, no prefetch); w8a8 M=1 1.46 vs 1.60-1.64.
        # One-row linears (backends/tvm/linear.py, E=1) likewise: int4 g128 [2048 -> 4096]
        # 171-183 us (~25 GB/s) vs 296 (tile_k 4, 2 KiB). More rows per task or a shorter
        # prefetch leave too few independent streams in flight for this memory system.
        if config.block_m <= 2:
            return dataclasses.replace(config, vec=lanes, tile_n=1, tile_k=2 if k % 2 == 0 else 1,
                                       prefetch=max(config.prefetch, 4096))
        return dataclasses.replace(config, vec=lanes, tile_n=max(1, min(config.tile_n, 2 // config.block_m)))
    vec = max((d for d in range(1, config.vec + 1) if span % (d * per_byte) == 0), default=0)
    if not vec:
        raise ValueError(f"{e_spec.weight_format} weights with group size {e_spec.group_size} do not fit "
                         f"N={n}, K={k}; the precision pass should have kept this layer dense")
    return dataclasses.replace(config, vec=vec)


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
    e_routed = spec.router.num_experts - len(spec.router.masked_experts)  # stack rows of routed experts
    e_total = e_routed + e_spec.num_shared
    gate_up, down = weights.gate_up, weights.down
    p = 2 if e_spec.weight_format == "int4" else 1  # values per stored element
    if tuple(gate_up.shape) != (e_total, 2 * n, k // p) or tuple(down.shape) != (e_total, k, n // p):
        raise ValueError(f"expected gate_up [{e_total}, {2 * n}, {k // p}] and down [{e_total}, {k}, {n // p}], "
                         f"got {tuple(gate_up.shape)} and {tuple(down.shape)}")
    if e_spec.weight_format != "dense" and (weights.gate_up_scale is None or weights.down_scale is None):
        raise ValueError(f"{e_spec.weight_format} expert weights need gate_up_scale and down_scale")
    kernel_dtype = hidden.dtype if e_spec.weight_format != "dense" else gate_up.dtype
    t = hidden.shape[0]
    if t == 0:
        return hidden.new_empty(0, k)

    logits = _router_logits(hidden, weights, spec.router)  # [T, E] fp32
    topk_w, topk_ids = route(logits, spec.router, weights.correction_bias)  # [T, k] x2, router ids
    topk_ids = stack_index(topk_ids, spec.router)  # stack rows (masked experts have none)
    topk_w, topk_ids = with_shared_experts(topk_w, topk_ids, e_routed, e_spec.num_shared)  # [T, k'] x2

    target = target_for(hidden.device.type, hidden.device.index or 0)
    dev_key = device_key(target, hidden.device.index or 0)
    has_biases = (weights.gate_up_bias is not None, weights.down_bias is not None)
    if config is None:
        # Per-call lookups stat the tuning folders (~0.3 ms, 4-6% of a decode-sized call on
        # CPU): resolve once per (layer, dtype, T, device), as the Triton op does. A table
        # written while the process runs is picked up by the next process.
        key = _cached_kernel_key(spec.to_json(), kernel_dtype, target, t, *has_biases, dev_key)
    else:
        key, _ = kernel_key(spec, kernel_dtype, target, config, t, *has_biases, dev_key)
    if key.weight_format != "dense" and target.kind != "llvm":
        raise ValueError(f"the TVM {target.kind} kernels do not read {key.weight_format} weights yet; "
                         "run this layer on the reference op (kernel_backend='reference')")
    if target.kind == "llvm":
        use_torch_thread_count()
    kernels = load_kernels(key)
    return run_kernels(kernels, key, hidden, weights, topk_w, topk_ids)


def _router_logits(hidden: torch.Tensor, weights: MoEWeights, r_spec) -> torch.Tensor:
    """Router logits [T, E] fp32 with reference.routing.router_logits' semantics.

    One- and two-token calls on the CPU take the TVM GEMV (linear.dense_gemv: the weight
    read once at bandwidth, 23 us for [128 x 2048] bf16 against 38 for torch's F.linear
    alone, and ~130 us for F.linear right after the expert kernels in a decode loop);
    the result is rounded to the model's dtype where the model computes logits in it.
    Routers with a bias, or whose weight dtype differs from the hidden states' where the
    model casts it, stay on the reference (the cast rounds the weight)."""
    w = weights.router_weight
    if (hidden.device.type == "cpu" and hidden.shape[0] <= 2 and weights.router_bias is None
            and w.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and (r_spec.logits_in_fp32 or w.dtype == hidden.dtype)):
        from moecc.backends.tvm.linear import dense_gemv

        logits = dense_gemv(hidden, w)  # [T, E] fp32 sums of exact products
        return logits if r_spec.logits_in_fp32 else logits.to(hidden.dtype).float()
    return router_logits(hidden, w, weights.router_bias, r_spec)


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
    quantized = key.weight_format != "dense"
    dt = hidden.dtype if quantized else weights.gate_up.dtype
    dev = hidden.device
    rows = align_tokens_by_expert(topk_w, topk_ids, key.num_experts, bm)
    if key.target.kind == "llvm":  # each task's token rows stay in cache (row_chunks.py says why)
        x_bytes = 1 if key.activations == "int8" else (4 if quantized else dt.itemsize)
        rows = row_chunks.split_ranges(rows, row_chunks.chunk_blocks(bm, max(k * x_bytes, n * 4)))
    if key.activations != "int8":
        # Quantised GEMMs read fp32 token rows in the order their weight bytes hold columns.
        x = int4_ordered(hidden.float(), key.config.vec) if key.weight_format == "int4" else hidden.to(
            torch.float32 if quantized else dt)  # [T, K]
        xg = x.index_select(0, rows.tok.flatten()).view(rows.num_blocks, bm, k)  # [NB, BM, K] rows by expert
    gate_up, down = weights.gate_up, weights.down
    if key.weight_format == "fp8":  # e4m3fn bytes as int8 (DLPack has no fp8; kernels_llvm_fp8.py decodes)
        gate_up, down = gate_up.view(torch.int8), down.view(torch.int8)
    gate_up = aligned(gate_up.contiguous()).view(key.num_experts, 2, n, -1)  # [E', 2, N, K/P]
    down = aligned(down.contiguous())  # [E', K, N/P]
    gu_bias = (aligned(weights.gate_up_bias.to(dt).contiguous()).view(key.num_experts, 2, n)
               if key.gate_up_bias else _zeros((1, 2, n), dt, dev))  # [E', 2, N]
    d_bias = (aligned(weights.down_bias.to(dt).contiguous()) if key.down_bias
              else _zeros((1, k), dt, dev))  # [E', K]

    act = torch.empty(rows.num_blocks, bm, n, dtype=torch.float32, device=dev)  # [NB, BM, N]
    y = torch.empty(rows.num_blocks, bm, k, dtype=torch.float32, device=dev)  # [NB, BM, K]
    out = torch.empty(hidden.shape[0], k, dtype=dt, device=dev)  # [T, K]
    if quantized:
        gu_scale = aligned(weights.gate_up_scale.float().contiguous())  # [E', 2N, K/G]; fp8: [E', 2N/B, K/B]
        if key.weight_format != "fp8":
            gu_scale = gu_scale.view(key.num_experts, 2, n, -1)  # [E', 2, N, K/G]
        d_scale = aligned(weights.down_scale.float().contiguous())  # [E', K, N/G]
    if key.activations == "int8":
        t = hidden.shape[0]
        xq, xs, xz = int8_buffers(t, k, key, dev)
        kernels.quantize_x(aligned(hidden.contiguous()), xq, xs, xz)  # [T, K] int8 (int4: nibble order), scales, Z sums
        kernels.gate_up_act(xq, xs, xz, rows.tok, rows.experts, rows.block_ptr, gate_up, gu_scale, gu_bias, act)
        aq, a_s, az = int8_buffers(rows.num_blocks * bm, n, key, dev)
        kernels.quantize_act(act.view(-1, n), aq, a_s, az)  # act is already in the order down reads
        shape = (rows.num_blocks, bm)
        kernels.down_weighted(aq.view(*shape, n), a_s.view(*shape, -1), az.view(*shape, *az.shape[1:]),
                              rows.row_weight, rows.experts, rows.block_ptr, down, d_scale, d_bias, y)
    elif quantized:
        kernels.gate_up_act(xg, rows.experts, rows.block_ptr, gate_up, gu_scale, gu_bias, act)
        kernels.down_weighted(act, rows.row_weight, rows.experts, rows.block_ptr, down, d_scale, d_bias, y)
    else:
        kernels.gate_up_act(xg, rows.experts, rows.block_ptr, gate_up, gu_bias, act)
        kernels.down_weighted(act, rows.row_weight, rows.experts, rows.block_ptr, down, d_bias, y)
    kernels.combine(y, rows.rows, out)
    return out.to(hidden.dtype)


@functools.lru_cache(maxsize=64)
def _zeros(shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero bias the kernels only read, made once per shape (two fresh tensors per call
    cost ~10-20 us of a decode-sized layer call)."""
    return torch.zeros(shape, dtype=dtype, device=device)


def int4_ordered(x: torch.Tensor, vec: int) -> torch.Tensor:
    """x [T, C] with each chunk of 2*vec columns reordered evens first, then odds
    (tir_scalars.nibble_order)."""
    t, c = x.shape
    return x.view(t, c // (2 * vec), vec, 2).transpose(-1, -2).reshape(t, c)


def int8_buffers(rows: int, columns: int, key: KernelKey, device):
    """Empty xq int8 [R, C], scales fp32 [R, C/G], Z lane sums int32 [R, C/G, L] for the
    quantising kernels (kernels_llvm_vnni.vnni_quantizers)."""
    groups = columns // (key.group_size or columns)
    return (torch.empty(rows, columns, dtype=torch.int8, device=device),
            torch.empty(rows, groups, dtype=torch.float32, device=device),
            torch.empty(rows, groups, key.config.vec, dtype=torch.int32, device=device))
