"""The two grouped expert GEMMs over expert-aligned slot blocks.

    gate_up_act:  act[s, :]  = act_fn(x[t] @ gate_up[e, :N].T + b_gate, x[t] @ gate_up[e, N:].T + b_up)
    down_proj:    y[p, s, :] = act[s, N_p] @ down[e, :, N_p].T  (+ down_bias[e] for p == 0)

s is a slot (token t = s // k', k' slots per token), e its expert, N_p the p-th of
SPLIT_K chunks of the reduction dimension N (split-K; 1 for prefill). Programs are laid
out as (BLOCK_M aligned slot rows) x (BLOCK_N output columns) [x split], with GROUP_M
row-block swizzling for L2 reuse of the activations. A block at or past `num_padded`
exits before loading anything, so experts without slots are never read; each weight
tile is read once per row block, so in decode (one block per active expert) every
active expert's weights are streamed exactly once.

Both GEMMs accumulate in fp32 (tl.dot; fp32 inputs use IEEE precision, not TF32) and
finish on the accumulator: GEMM1 adds the gate/up bias and applies the activation
(silu, gelu_tanh, swiglu_oai) before a single rounding to the activation dtype; GEMM2
adds the down bias. Routing weights and the sum over a token's slots are applied
afterwards in a fixed order by `combine.py` (deterministic; see docs/kernels.md).

Legend: T = tokens, K = hidden, N = intermediate, E' = experts (routed + shared),
k' = slots per token, BM/BN/BK = BLOCK_M/N/K. Weight tiles go through
`weight_load.load_weight_tile`, which dequantises int8 / int4 / fp8 stacks (weight-only:
the activations and tl.dot stay in the compute dtype, fp32 / fp16 / bf16); the
quantised layouts and the BLOCK_K rule are in weight_formats.py.
Assumes the canonical layout (ExpertSpec.canonical) with the last dimension contiguous.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from moecc.backends.triton.align import AlignedSlots
from moecc.backends.triton.config import KernelConfig
from moecc.backends.triton.weight_formats import format_params
from moecc.backends.triton.weight_load import load_weight_tile, scale_column
from moecc.spec import ExpertSpec

ACTIVATION_CODES = {"silu": 0, "gelu_tanh": 1, "swiglu_oai": 2}


@triton.jit
def _swizzle(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Program id -> (row block, column block), GROUP_M row blocks per column sweep."""
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def _activate(gate, up, alpha, limit, ACTIVATION: tl.constexpr):
    """act(gate) * up on fp32 tiles [BM, BN], as reference.experts.activation."""
    if ACTIVATION == 0:  # silu
        return gate * tl.sigmoid(gate) * up
    elif ACTIVATION == 1:  # gelu, tanh approximation; tanh(z) = 2 sigmoid(2z) - 1
        z = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        return 0.5 * gate * (1.0 + (2.0 * tl.sigmoid(2.0 * z) - 1.0)) * up
    else:  # swiglu_oai (GPT-OSS): clamped, alpha-scaled, (up + 1)
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
        return (up + 1.0) * (gate * tl.sigmoid(gate * alpha))


@triton.jit
def _dot(a, b, acc, FP32_IEEE: tl.constexpr):
    if FP32_IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def gate_up_act_kernel(
    x_ptr,  # [T, K] hidden states
    w_ptr,  # [E', 2N, K/PACK] gate rows [0, N), up rows [N, 2N)
    scale_ptr,  # quantised: fp32 [E', 2N/SCALE_ROWS, K/GROUP_K] (weight_formats.py); dense: unused
    bias_ptr,  # [E', 2N] fp32-castable, read when HAS_BIAS
    act_ptr,  # [T*k', N] out, row = slot
    sorted_ptr,  # [max_blocks*BM] int32 aligned slot ids
    block_expert_ptr,  # [max_blocks] int32
    num_padded_ptr,  # [1] int32
    N,
    K,
    num_slots,  # T*k' (padding sentinel)
    num_pid_m,  # max_blocks
    alpha,
    limit,
    stride_xt,
    stride_we,
    stride_wn,
    stride_se,
    stride_sr,
    stride_be,
    stride_at,
    SLOTS_PER_TOKEN: tl.constexpr,
    ACTIVATION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    WEIGHT_FORMAT: tl.constexpr,
    PACK: tl.constexpr,
    GROUP_K: tl.constexpr,
    SCALE_ROWS: tl.constexpr,
    FP32_IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _swizzle(tl.program_id(0), num_pid_m, tl.cdiv(N, BLOCK_N), GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return  # past the used rows: no expert, nothing loaded
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    slots = tl.load(sorted_ptr + offs_m)  # [BM]
    row_mask = slots < num_slots  # [BM] padding rows are masked
    tokens = (slots // SLOTS_PER_TOKEN).to(tl.int64)  # [BM]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] intermediate columns
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)  # [BK]

    a_ptrs = x_ptr + tokens[:, None] * stride_xt + offs_k[None, :]  # [BM, BK]
    g_ptrs = w_ptr + expert * stride_we + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None] // PACK  # [BK, BN]
    u_ptrs = g_ptrs + N * stride_wn  # [BK, BN] up rows
    # Scale rows of the gate and up columns ([1, BN]; fp8: one per SCALE_ROWS weight rows).
    gs_ptrs = scale_ptr + expert * stride_se + (offs_n // SCALE_ROWS)[None, :].to(tl.int64) * stride_sr
    us_ptrs = scale_ptr + expert * stride_se + ((offs_n + N) // SCALE_ROWS)[None, :].to(tl.int64) * stride_sr
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # [BM, BN]
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # [BM, BN]
    for kk in range(0, tl.cdiv(K, BLOCK_K)):
        k_mask = offs_k < K - kk * BLOCK_K  # [BK]
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)  # [BM, BK]
        w_mask = k_mask[:, None] & n_mask[None, :]  # [BK, BN]
        s_col = scale_column(kk * BLOCK_K, GROUP_K)  # this step's scale group
        g = load_weight_tile(g_ptrs, w_mask, gs_ptrs + s_col, n_mask[None, :], WEIGHT_FORMAT, BLOCK_K)  # [BK, BN]
        u = load_weight_tile(u_ptrs, w_mask, us_ptrs + s_col, n_mask[None, :], WEIGHT_FORMAT, BLOCK_K)  # [BK, BN]
        acc_g = _dot(a, g.to(a.dtype), acc_g, FP32_IEEE)
        acc_u = _dot(a, u.to(a.dtype), acc_u, FP32_IEEE)
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K // PACK
        u_ptrs += BLOCK_K // PACK

    if HAS_BIAS:
        b_ptrs = bias_ptr + expert * stride_be + offs_n  # [BN]
        acc_g += tl.load(b_ptrs, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        acc_u += tl.load(b_ptrs + N, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    h = _activate(acc_g, acc_u, alpha, limit, ACTIVATION)  # [BM, BN] fp32
    out_ptrs = act_ptr + slots[:, None].to(tl.int64) * stride_at + offs_n[None, :]  # [BM, BN]
    tl.store(out_ptrs, h.to(act_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


@triton.jit
def down_proj_kernel(
    act_ptr,  # [T*k', N] activated intermediate, row = slot
    w_ptr,  # [E', K, N/PACK]
    scale_ptr,  # quantised: fp32 [E', K/SCALE_ROWS, N/GROUP_K] (weight_formats.py); dense: unused
    bias_ptr,  # [E', K], read when HAS_BIAS
    y_ptr,  # [SPLIT_K, T*k', K] out (fp32 when SPLIT_K > 1, else activation dtype)
    sorted_ptr,  # [max_blocks*BM] int32
    block_expert_ptr,  # [max_blocks] int32
    num_padded_ptr,  # [1] int32
    N,
    K,
    num_slots,
    num_pid_m,
    stride_at,
    stride_we,
    stride_wk,
    stride_se,
    stride_sr,
    stride_be,
    stride_ys,
    stride_yt,
    HAS_BIAS: tl.constexpr,
    WEIGHT_FORMAT: tl.constexpr,
    PACK: tl.constexpr,
    GROUP_K: tl.constexpr,
    SCALE_ROWS: tl.constexpr,
    FP32_IEEE: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # hidden (output) columns per program
    BLOCK_K: tl.constexpr,  # reduction (N) step
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _swizzle(tl.program_id(0), num_pid_m, tl.cdiv(K, BLOCK_N), GROUP_M)
    pid_s = tl.program_id(1)  # split of the reduction dimension N
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    slots = tl.load(sorted_ptr + offs_m)  # [BM]
    row_mask = slots < num_slots
    offs_h = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] hidden columns
    h_mask = offs_h < K
    steps = tl.cdiv(tl.cdiv(N, BLOCK_K), SPLIT_K)  # reduction steps per split
    r0 = pid_s * steps * BLOCK_K  # first reduction index of this split
    offs_r = r0 + tl.arange(0, BLOCK_K)  # [BK]

    a_ptrs = act_ptr + slots[:, None].to(tl.int64) * stride_at + offs_r[None, :]  # [BM, BK]
    w_ptrs = w_ptr + expert * stride_we + offs_h[None, :].to(tl.int64) * stride_wk + offs_r[:, None] // PACK  # [BK, BN]
    s_ptrs = scale_ptr + expert * stride_se + (offs_h // SCALE_ROWS)[None, :].to(tl.int64) * stride_sr  # [1, BN]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # [BM, BN]
    for step in range(0, steps):
        r_mask = offs_r < N - step * BLOCK_K  # [BK]
        a = tl.load(a_ptrs, mask=row_mask[:, None] & r_mask[None, :], other=0.0)  # [BM, BK]
        # This step's scale group; a split's tail steps past N are fully masked (zeros),
        # so clamping keeps their scale load in bounds without changing the result.
        s_col = scale_column(tl.minimum(r0 + step * BLOCK_K, N - 1), GROUP_K)
        w = load_weight_tile(w_ptrs, r_mask[:, None] & h_mask[None, :], s_ptrs + s_col, h_mask[None, :],
                             WEIGHT_FORMAT, BLOCK_K)  # [BK, BN]
        acc = _dot(a, w.to(a.dtype), acc, FP32_IEEE)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K // PACK

    if HAS_BIAS:
        bias = tl.load(bias_ptr + expert * stride_be + offs_h, mask=h_mask, other=0.0).to(tl.float32)  # [BN]
        acc += tl.where(pid_s == 0, bias, 0.0)[None, :]
    out_ptrs = y_ptr + pid_s * stride_ys + slots[:, None].to(tl.int64) * stride_yt + offs_h[None, :]  # [BM, BN]
    tl.store(out_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_mask[:, None] & h_mask[None, :])


def _format_constexprs(experts: ExpertSpec) -> dict:
    fmt = format_params(experts)
    return dict(WEIGHT_FORMAT=fmt.code, PACK=fmt.pack, GROUP_K=fmt.group_k, SCALE_ROWS=fmt.scale_rows)


def gate_up_constexprs(config: KernelConfig, experts: ExpertSpec, slots_per_token: int, dtype: torch.dtype) -> dict:
    """Compile-time parameters of `gate_up_act_kernel` (shared with aot.py); dtype: the compute dtype."""
    return dict(
        SLOTS_PER_TOKEN=slots_per_token,
        ACTIVATION=ACTIVATION_CODES[experts.activation],
        HAS_BIAS=experts.has_bias,
        **_format_constexprs(experts),
        FP32_IEEE=dtype == torch.float32,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        GROUP_M=config.group_m,
    )


def down_constexprs(config: KernelConfig, experts: ExpertSpec, dtype: torch.dtype) -> dict:
    """Compile-time parameters of `down_proj_kernel` (shared with aot.py); dtype: the compute dtype."""
    return dict(
        HAS_BIAS=experts.has_bias,
        **_format_constexprs(experts),
        FP32_IEEE=dtype == torch.float32,
        SPLIT_K=config.split_k,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        GROUP_M=config.group_m,
    )


def _as_stored(weight: torch.Tensor) -> torch.Tensor:
    """fp8 stacks as their bytes: the weight load decodes e4m3fn itself (weight_load.py)."""
    return weight.view(torch.uint8) if weight.dtype == torch.float8_e4m3fn else weight


def _scale_args(weight: torch.Tensor, scales: Optional[torch.Tensor]) -> tuple:
    """(pointer, expert stride, row stride) of a stack's scales; the weight as a dummy when dense."""
    if scales is None:
        return weight, 0, 0
    return scales, scales.stride(0), scales.stride(1)


def gate_up_act(
    x: torch.Tensor,  # [T, K] in the compute dtype
    gate_up: torch.Tensor,  # [E', 2N, K] (quantised: packed, weight_formats.py)
    gate_up_bias: Optional[torch.Tensor],  # [E', 2N]
    aligned: AlignedSlots,
    slots_per_token: int,
    experts: ExpertSpec,
    config: KernelConfig,
    gate_up_scale: Optional[torch.Tensor] = None,  # fp32 scales of a quantised stack
) -> torch.Tensor:
    """GEMM1 with the activation epilogue -> act [T*k', N] in x's dtype, row = slot."""
    n, k = experts.intermediate_size, experts.hidden_size
    act = torch.empty(aligned.num_slots, n, dtype=x.dtype, device=x.device)  # [T*k', N]
    bias = gate_up_bias if gate_up_bias is not None else gate_up  # dummy pointer when absent
    scale, stride_se, stride_sr = _scale_args(gate_up, gate_up_scale)
    gate_up = _as_stored(gate_up)
    grid = (aligned.max_blocks * triton.cdiv(n, config.block_n),)
    gate_up_act_kernel[grid](
        x, gate_up, scale, bias, act, aligned.sorted_slot_ids, aligned.block_expert_ids, aligned.num_padded,
        n, k, aligned.num_slots, aligned.max_blocks, float(experts.swiglu_alpha), float(experts.swiglu_limit),
        x.stride(0), gate_up.stride(0), gate_up.stride(1), stride_se, stride_sr,
        bias.stride(0) if gate_up_bias is not None else 0, act.stride(0),
        **gate_up_constexprs(config, experts, slots_per_token, x.dtype),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return act


def down_proj(
    act: torch.Tensor,  # [T*k', N]
    down: torch.Tensor,  # [E', K, N] (quantised: packed, weight_formats.py)
    down_bias: Optional[torch.Tensor],  # [E', K]
    aligned: AlignedSlots,
    experts: ExpertSpec,
    config: KernelConfig,
    down_scale: Optional[torch.Tensor] = None,  # fp32 scales of a quantised stack
) -> torch.Tensor:
    """GEMM2 -> y [split_k, T*k', K]: fp32 partial sums when split_k > 1, else act's dtype."""
    n, k = experts.intermediate_size, experts.hidden_size
    out_dtype = torch.float32 if config.split_k > 1 else act.dtype
    y = torch.empty(config.split_k, aligned.num_slots, k, dtype=out_dtype, device=act.device)  # [P, T*k', K]
    bias = down_bias if down_bias is not None else down
    scale, stride_se, stride_sr = _scale_args(down, down_scale)
    down = _as_stored(down)
    grid = (aligned.max_blocks * triton.cdiv(k, config.block_n), config.split_k)
    down_proj_kernel[grid](
        act, down, scale, bias, y, aligned.sorted_slot_ids, aligned.block_expert_ids, aligned.num_padded,
        n, k, aligned.num_slots, aligned.max_blocks,
        act.stride(0), down.stride(0), down.stride(1), stride_se, stride_sr,
        bias.stride(0) if down_bias is not None else 0, y.stride(0), y.stride(1),
        **down_constexprs(config, experts, act.dtype),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return y
