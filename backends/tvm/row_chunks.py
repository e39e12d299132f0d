"""Split each expert's block range into chunks, so a CPU task's token rows stay in cache.

The llvm kernels run one parallel task per (block range, output tile): a task reads every
token row of its range once per weight tile it owns (kernels_llvm.py). With one range per
expert, a busy expert's rows ([rows, K] activations, [rows, N] fp32 intermediates) are
re-streamed by each of its N / tile_n (gate/up) or K / tile_k (down) tasks; once they
outgrow the core's cache every task reads them from memory again. That is why a pruned
layer (the same T * k rows over fewer experts, so more rows per expert) was up to 2.3x
slower at M = 2048 than the unpruned one (docs/pruning.md).

The kernels need no change: `experts` [U] and `block_ptr` [U+1] (align.py) may name an
expert more than once, so a range of more than `max_blocks` blocks becomes several
consecutive ranges of the same expert. Tasks stay expert-major (a core still streams one
expert's weights front to back, once per chunk instead of once), each task writes only
its own rows, so the result is bit-identical.

Measured (2-core Xeon, 2026-12-03, bench/pruned_layer.py's layer E=64 -> 32, N=256,
K=1024, top-8, bf16, block_m 8, best of 3-4 calls under contention): M=2048 unpruned /
half pruned 271 / 322 ms unchunked, 249 / 251 ms with 32-row (64 KiB) chunks, 263 / 272
with 128-row and 315 / 326 with 512-row chunks; M=4096 644 / 747 vs 501 / 502 ms.
"""

from __future__ import annotations

import torch

from moecc.backends.tvm.align import AlignedRows

CHUNK_BYTES = 64 * 1024  # token rows per task: the measured best above (32-128 KiB alike)


def chunk_blocks(block_m: int, row_bytes: int) -> int:
    """Blocks per chunk: the most whose rows (row_bytes each) fit CHUNK_BYTES, at least 1."""
    return max(1, CHUNK_BYTES // max(1, block_m * row_bytes))


def split_ranges(rows: AlignedRows, max_blocks: int) -> AlignedRows:
    """rows with every expert's block range cut into ranges of at most max_blocks blocks.

    Decode-sized calls (every range one block, as after align's one-token path) return
    `rows` itself without a tensor op, so they pay nothing.
    """
    u = rows.experts.numel()
    if rows.num_blocks <= max(u, max_blocks):
        return rows  # no range can be longer than max_blocks
    ptr = rows.block_ptr.long()  # [U+1]
    pieces = (ptr[1:] - ptr[:-1] + max_blocks - 1) // max_blocks  # [U] chunks per range
    starts = torch.repeat_interleave(ptr[:-1], pieces)  # [U'] start of the chunk's range
    first = torch.cumsum(pieces, 0) - pieces  # [U] first chunk of each range
    within = torch.arange(starts.numel(), device=ptr.device) - torch.repeat_interleave(first, pieces)  # [U']
    block_ptr = torch.cat([starts + within * max_blocks, ptr[-1:]])  # [U'+1]
    return rows._replace(experts=torch.repeat_interleave(rows.experts, pieces),
                         block_ptr=block_ptr.to(torch.int32))
