"""Routing and token alignment for the TVM kernels: the torch half of the split.

The TVM backend computes routing with the reference router (backends/reference/routing.py,
one definition of every router variant) and sorts the (token, expert) assignments by
expert here, in torch; the expert GEMMs, activation and combine run in TVM. The kernels
then see each expert's rows as whole blocks of `block_m` rows:

    rows are (token, slot) assignments; A = T * k' of them (k' = top_k + shared)
    tok        [NB, BM] int32   token of each row; pad rows point at token 0
    row_weight [NB, BM] fp32    routing weight of each row; 0 on pad rows
    experts    [U] int32        expert of each block range (U = experts with tokens)
    block_ptr  [U+1] int32      blocks of experts[u] are block_ptr[u] .. block_ptr[u+1]-1
    rows       [T, k'] int32    row of each (token, slot): the combine gathers these

Shared experts are appended as always-active experts E .. E+S-1 with weight 1. Pad rows
are computed by the kernels but never gathered, so they cannot leak into the output.
This step reads the block count back to the host (one `int(...)`): free on CPU, one
synchronisation on CUDA (so the op is not CUDA-graph capturable yet).
"""

from __future__ import annotations

import functools

from typing import NamedTuple

import torch


class AlignedRows(NamedTuple):
    tok: torch.Tensor  # [NB, BM] int32
    row_weight: torch.Tensor  # [NB, BM] fp32
    experts: torch.Tensor  # [U] int32
    block_ptr: torch.Tensor  # [U+1] int32
    rows: torch.Tensor  # [T, k'] int32
    num_blocks: int  # NB


def with_shared_experts(
    topk_weights: torch.Tensor,  # [T, k] fp32
    topk_ids: torch.Tensor,  # [T, k] int64
    num_routed: int,  # E
    num_shared: int,  # S
) -> tuple[torch.Tensor, torch.Tensor]:
    """Append the S always-active experts (ids E .. E+S-1, weight 1) -> [T, k+S] x2."""
    if num_shared == 0:
        return topk_weights, topk_ids
    t = topk_ids.shape[0]
    shared_ids = torch.arange(num_routed, num_routed + num_shared, device=topk_ids.device)
    shared_ids = shared_ids.expand(t, num_shared)  # [T, S]
    ones = torch.ones(t, num_shared, dtype=topk_weights.dtype, device=topk_weights.device)
    return torch.cat([topk_weights, ones], dim=1), torch.cat([topk_ids, shared_ids], dim=1)


def align_tokens_by_expert(
    topk_weights: torch.Tensor,  # [T, k'] fp32
    topk_ids: torch.Tensor,  # [T, k'] int64
    num_experts: int,  # E' (routed + shared)
    block_m: int,  # BM
) -> AlignedRows:
    """Sort assignments by expert into blocks of `block_m` rows (stable: token order kept)."""
    t, kp = topk_ids.shape
    dev = topk_ids.device
    if t == 1 and dev.type == "cpu":
        one = _align_one_token(topk_weights, topk_ids, block_m)
        if one is not None:
            return one
    return _align_general(topk_weights, topk_ids, num_experts, block_m)


def _align_general(topk_weights: torch.Tensor, topk_ids: torch.Tensor, num_experts: int,
                   block_m: int) -> AlignedRows:
    """Any token count (see align_tokens_by_expert for the arguments)."""
    t, kp = topk_ids.shape
    dev = topk_ids.device
    flat_ids = topk_ids.reshape(-1)  # [A]
    flat_w = topk_weights.reshape(-1).float()  # [A]
    counts = torch.bincount(flat_ids, minlength=num_experts)  # [E']
    blocks = (counts + block_m - 1) // block_m  # [E']
    block_end = torch.cumsum(blocks, 0)  # [E']
    block_start = block_end - blocks  # [E']
    num_blocks = int(block_end[-1]) if num_experts else 0  # host read (see module doc)

    order = torch.argsort(flat_ids, stable=True)  # [A] assignment index, sorted by expert
    sorted_ids = flat_ids[order]  # [A]
    first = torch.cumsum(counts, 0) - counts  # [E'] first sorted position of each expert
    rank = torch.arange(order.numel(), device=dev) - first[sorted_ids]  # [A] rank within expert
    row = block_start[sorted_ids] * block_m + rank  # [A] row of each sorted assignment

    rows = torch.empty(t * kp, dtype=torch.int64, device=dev)
    rows[order] = row
    tok = torch.zeros(num_blocks * block_m, dtype=torch.int32, device=dev)
    tok[row] = (order // kp).to(torch.int32)
    row_weight = torch.zeros(num_blocks * block_m, dtype=torch.float32, device=dev)
    row_weight[row] = flat_w[order]

    active = torch.nonzero(counts).flatten()  # [U] experts with tokens, ascending
    block_ptr = torch.cat([block_start[active], block_end[-1:]])  # [U+1]
    return AlignedRows(
        tok=tok.view(num_blocks, block_m),
        row_weight=row_weight.view(num_blocks, block_m),
        experts=active.to(torch.int32),
        block_ptr=block_ptr.to(torch.int32),
        rows=rows.view(t, kp).to(torch.int32),
        num_blocks=num_blocks,
    )


def _align_one_token(
    topk_weights: torch.Tensor,  # [1, k'] fp32
    topk_ids: torch.Tensor,  # [1, k'] int64
    block_m: int,  # BM
) -> AlignedRows | None:
    """The same rows for one token (batch-1 decode), built from Python lists.

    With one token its k' experts are distinct, so each gets exactly one block whose first
    row is the token. Returns None when the ids repeat (then the general path handles it).
    Why lists: k' is ~8, and each small torch op costs 5-10 us right after the streaming
    kernels (their weights evict the interpreter's working set), so the dozen ops this
    took cost ~80 us per layer call; two tolist() and three tensors from lists cost a
    fraction of that. The rows that never change with the routing (tok, block_ptr) are
    made once per (k', BM); no kernel writes them.
    """
    kp = topk_ids.shape[1]
    ids = topk_ids[0].tolist()
    order = sorted(range(kp), key=ids.__getitem__)  # slots by ascending expert (stable)
    experts = [ids[i] for i in order]
    if any(a == b for a, b in zip(experts, experts[1:])):
        return None
    weights = topk_weights[0].tolist()
    row_weight = [[weights[i]] + [0.0] * (block_m - 1) for i in order]  # [k', BM]
    rows = [0] * kp
    for block, slot in enumerate(order):
        rows[slot] = block * block_m  # block b starts at row b * BM
    tok, block_ptr = _one_token_constants(kp, block_m)
    return AlignedRows(
        tok=tok,
        row_weight=torch.tensor(row_weight, dtype=torch.float32),
        experts=torch.tensor(experts, dtype=torch.int32),
        block_ptr=block_ptr,
        rows=torch.tensor([rows], dtype=torch.int32),
        num_blocks=kp,
    )


@functools.lru_cache(maxsize=64)
def _one_token_constants(kp: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """tok [k', BM] zeros and block_ptr [k'+1] = 0..k' for one token (read-only)."""
    return torch.zeros(kp, block_m, dtype=torch.int32), torch.arange(kp + 1, dtype=torch.int32)
