"""Weighted sum of each token's slot outputs: the deterministic top-k reduction.

    out[t, :] = sum_j w[t, j] * sum_p y[p, t*k' + j, :]        (fp32, fixed order)

y holds the down projection of every slot (p = split-K partials, one when unsplit); w the
routing weights, 1 for shared-expert slots. The order of the sums is fixed (j ascending,
then p), so the result is bitwise reproducible run to run, unlike fp32 atomics into the
output. Cost: one extra read of [P, T*k', K] and a write of [T, K].

Legend: T = tokens, K = hidden, k' = slots per token, P = split-K partials.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def combine_slots_kernel(
    y_ptr,  # [P, T*k', K]
    w_ptr,  # [T, k'] fp32
    out_ptr,  # [T, K]
    T,
    K,
    stride_yp,
    stride_ys,
    stride_ot,
    SLOTS_PER_TOKEN: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_T: tl.constexpr,  # tokens per program
    BLOCK: tl.constexpr,  # hidden columns per program
):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    t_mask = offs_t < T
    mask = t_mask[:, None] & (offs < K)[None, :]  # [BT, BLOCK]
    acc = tl.zeros([BLOCK_T, BLOCK], dtype=tl.float32)  # [BT, BLOCK]
    for j in tl.static_range(SLOTS_PER_TOKEN):
        slots = offs_t.to(tl.int64) * SLOTS_PER_TOKEN + j  # [BT]
        w = tl.load(w_ptr + slots, mask=t_mask, other=0.0)  # [BT]
        part = tl.zeros([BLOCK_T, BLOCK], dtype=tl.float32)
        for p in tl.static_range(SPLIT_K):
            ptrs = y_ptr + p * stride_yp + slots[:, None] * stride_ys + offs[None, :]  # [BT, BLOCK]
            part += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        acc += w[:, None] * part
    out_ptrs = out_ptr + offs_t[:, None].to(tl.int64) * stride_ot + offs[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def combine_slots(y: torch.Tensor, weights: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """y [P, T*k', K], weights [T, k'] fp32 -> out [T, K] in out_dtype."""
    t, slots = weights.shape
    k = y.shape[2]
    out = torch.empty(t, k, dtype=out_dtype, device=y.device)  # [T, K]
    if t == 0:
        return out
    meta = combine_constexprs(t, k, slots, y.shape[0])
    weights = weights.contiguous()
    combine_slots_kernel[(triton.cdiv(t, meta["BLOCK_T"]), triton.cdiv(k, meta["BLOCK"]))](
        y, weights, out, t, k, y.stride(0), y.stride(1), out.stride(0), **meta,
    )
    return out


def combine_constexprs(num_tokens: int, hidden: int, slots_per_token: int, split_k: int) -> dict:
    """Compile-time parameters of `combine_slots_kernel` (shared with aot.py)."""
    block = min(1024, triton.next_power_of_2(hidden))
    block_t = max(1, min(4096 // block, triton.next_power_of_2(num_tokens)))  # <= 4096 elements per program
    return dict(SLOTS_PER_TOKEN=slots_per_token, SPLIT_K=split_k, BLOCK_T=block_t, BLOCK=block)
