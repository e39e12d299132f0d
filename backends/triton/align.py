"""Token-slot alignment by expert (moe_align_block_size style), fully on device.

A *slot* is one (token, selected expert) pair: slot = t * k' + j for token t and its j-th
selection (k' = k + S: routed plus shared slots). The grouped GEMMs want the slots of
each expert contiguous and padded to a multiple of BLOCK_M, so that every BLOCK_M-row
block belongs to one expert. This module produces, from the ids [T, k'] alone:

    sorted_slot_ids   [max_blocks * BLOCK_M] int32  slots grouped by expert, ascending
                      within an expert; padding rows hold the sentinel T * k'
    block_expert_ids  [max_blocks] int32            expert of each block (valid for
                      blocks < num_padded / BLOCK_M; later entries are never read)
    num_padded        [1] int32                     rows actually used (a multiple of BLOCK_M)
    expert_counts     [E'] int32                    slots per expert (for statistics)

Buffers are sized from shapes only, for the worst case
    max_slots = T*k' + min(E', T*k') * (BLOCK_M - 1)
(each non-empty expert wastes at most BLOCK_M - 1 rows, and at most T*k' experts are
non-empty), so nothing synchronises with the host and the op is CUDA-graph capturable.

Two kernels, one program per expert each: `count` scans all slots and counts its own;
`scatter` recomputes the padded offsets from all counts (a cumsum over E' values),
writes its block ids, then rescans the slots and writes their positions with a running
prefix count. No atomics, so the order (ascending slot id within an expert) is
deterministic. Cost is O(E' * T * k') comparisons, tiny for decode and acceptable for
prefill (each program streams T*k' int32 ids from L2); a histogram/radix variant is the
upgrade path if it ever shows in a profile. Experts without slots get zero blocks, so
no GEMM program ever reads their weights.

Legend: T = tokens, k' = slots per token, E' = experts in the stack (routed + shared).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl


class AlignedSlots(NamedTuple):
    sorted_slot_ids: torch.Tensor  # [max_blocks * BLOCK_M] int32
    block_expert_ids: torch.Tensor  # [max_blocks] int32
    num_padded: torch.Tensor  # [1] int32
    expert_counts: torch.Tensor  # [E'] int32
    block_m: int
    num_slots: int  # T * k' (also the padding sentinel)

    @property
    def max_blocks(self) -> int:
        return self.block_expert_ids.shape[0]


def max_padded_slots(num_slots: int, num_experts: int, block_m: int) -> int:
    """Worst-case padded rows for `num_slots` slots over `num_experts` experts."""
    return num_slots + min(num_experts, num_slots) * (block_m - 1)


@triton.jit
def count_slots_kernel(
    ids_ptr,  # [num_slots] int32 expert id of each slot
    counts_ptr,  # [E'] int32 out
    num_slots,
    BLOCK: tl.constexpr,
):
    e = tl.program_id(0)  # this program's expert
    count = 0
    for start in range(0, num_slots, BLOCK):
        offs = start + tl.arange(0, BLOCK)  # [BLOCK]
        ids = tl.load(ids_ptr + offs, mask=offs < num_slots, other=-1)
        count += tl.sum((ids == e).to(tl.int32), axis=0)
    tl.store(counts_ptr + e, count)


@triton.jit
def scatter_slots_kernel(
    ids_ptr,  # [num_slots] int32
    counts_ptr,  # [E'] int32 (from count_slots_kernel)
    sorted_ptr,  # [max_blocks * BLOCK_M] int32 out
    block_expert_ptr,  # [max_blocks] int32 out
    num_padded_ptr,  # [1] int32 out
    num_slots,
    num_experts,
    BLOCK_M: tl.constexpr,
    BLOCK_E: tl.constexpr,  # >= E', power of two
    BLOCK: tl.constexpr,  # slots scanned per step
):
    e = tl.program_id(0)
    offs_e = tl.arange(0, BLOCK_E)  # [BE]
    counts = tl.load(counts_ptr + offs_e, mask=offs_e < num_experts, other=0)  # [BE]
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M  # [BE]
    ends = tl.cumsum(padded, axis=0)  # [BE] inclusive prefix sums
    start = tl.sum(tl.where(offs_e == e, ends - padded, 0), axis=0)  # this expert's first row
    my_count = tl.sum(tl.where(offs_e == e, counts, 0), axis=0)
    my_padded = tl.sum(tl.where(offs_e == e, padded, 0), axis=0)
    if e == 0:
        tl.store(num_padded_ptr, tl.sum(padded, axis=0))

    # Block ids of this expert's row range [start, start + my_padded).
    offs_b = tl.arange(0, BLOCK)  # [BLOCK]
    for b0 in range(0, my_padded // BLOCK_M, BLOCK):
        blk = start // BLOCK_M + b0 + offs_b
        tl.store(block_expert_ptr + blk, tl.zeros([BLOCK], tl.int32) + e, mask=b0 + offs_b < my_padded // BLOCK_M)

    # Positions of this expert's slots: running prefix count, ascending slot order.
    seen = 0
    for s0 in range(0, num_slots, BLOCK):
        offs = s0 + tl.arange(0, BLOCK)  # [BLOCK] slot ids
        ids = tl.load(ids_ptr + offs, mask=offs < num_slots, other=-1)
        match = (ids == e).to(tl.int32)
        pos = start + seen + tl.cumsum(match, axis=0) - 1  # [BLOCK]
        tl.store(sorted_ptr + pos, offs, mask=match != 0)
        seen += tl.sum(match, axis=0)

    # Padding rows at the tail of this expert's range get the sentinel (never loaded).
    offs_p = tl.arange(0, BLOCK_M)  # [BM]
    tail = start + my_count + offs_p
    tl.store(sorted_ptr + tail, tl.zeros([BLOCK_M], tl.int32) + num_slots, mask=my_count + offs_p < my_padded)


def align_tokens_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> AlignedSlots:
    """Group the slots of `topk_ids` [T, k'] (int32, values < num_experts) by expert.

    `num_experts` is E' (routed + shared). Returns `AlignedSlots`; see the module docstring.
    """
    if topk_ids.dim() != 2:
        raise ValueError(f"align_tokens_by_expert expects ids [T, k'], got {tuple(topk_ids.shape)}")
    if block_m < 1 or block_m & (block_m - 1):
        raise ValueError(f"block_m={block_m} must be a power of two")
    ids = topk_ids.to(torch.int32).contiguous().view(-1)  # [T*k']
    num_slots = ids.numel()
    max_blocks = triton.cdiv(max_padded_slots(num_slots, num_experts, block_m), block_m)
    dev = topk_ids.device
    sorted_ids = torch.empty(max_blocks * block_m, dtype=torch.int32, device=dev)  # [max_blocks*BM]
    block_expert = torch.empty(max_blocks, dtype=torch.int32, device=dev)  # [max_blocks]
    num_padded = torch.zeros(1, dtype=torch.int32, device=dev)  # [1]
    counts = torch.empty(num_experts, dtype=torch.int32, device=dev)  # [E']
    if num_slots == 0:
        return AlignedSlots(sorted_ids, block_expert, num_padded, counts.zero_(), block_m, 0)
    meta = align_constexprs(num_slots, num_experts, block_m)
    count_slots_kernel[(num_experts,)](ids, counts, num_slots, BLOCK=meta["BLOCK"])
    scatter_slots_kernel[(num_experts,)](
        ids, counts, sorted_ids, block_expert, num_padded, num_slots, num_experts, **meta,
    )
    return AlignedSlots(sorted_ids, block_expert, num_padded, counts, block_m, num_slots)


def align_constexprs(num_slots: int, num_experts: int, block_m: int) -> dict:
    """Compile-time parameters of `scatter_slots_kernel` (BLOCK also for the count kernel)."""
    return dict(BLOCK_M=block_m, BLOCK_E=triton.next_power_of_2(num_experts),
                BLOCK=min(1024, triton.next_power_of_2(max(num_slots, 1))))
