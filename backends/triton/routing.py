"""Fused top-k routing: router logits -> (weights, expert ids) in one Triton kernel.

Implements every variant of `moecc.backends.reference.routing.route` (the definition):
softmax / sigmoid / topk_softmax scoring, the sigmoid score-correction bias (selection
only), group-limited selection (n_group / topk_group, group score top2_sum or max),
renormalisation with eps, and the routed scaling factor. The router matmul itself stays a
torch linear (`reference.router_logits`); this kernel starts from its fp32 logits.

Shared experts (already appended to the expert stack by the expert-fusion pass) are
emitted as extra selected slots: slot j in [k, k+S) of every token names expert E + j - k
with weight 1, so the expert GEMMs treat them like any routed slot.

Legend: T = tokens, E = routed experts, k = top-k, S = shared experts, G = n_group.
Assumptions: E <= 4096 (one row of logits fits a program); all arithmetic in fp32; ties
are broken towards the smaller expert index (torch.topk leaves tie order unspecified).
No host synchronisation: shapes only depend on T, E, k, S.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from moecc.spec import RouterSpec

SCORING_CODES = {"softmax": 0, "sigmoid": 1, "topk_softmax": 2}
GROUP_SCORING_CODES = {"top2_sum": 0, "max": 1}


@triton.jit
def route_topk_kernel(
    logits_ptr,  # [T, E] float (any float dtype; computed in fp32)
    corr_bias_ptr,  # [E] float, read only when HAS_CORR
    weights_ptr,  # [T, k+S] fp32 out
    ids_ptr,  # [T, k+S] int32 out
    T,
    E,
    stride_lt,  # logits row stride
    scaling,  # routed scaling factor
    renorm_eps,
    TOP_K: tl.constexpr,
    NUM_SHARED: tl.constexpr,
    SCORING: tl.constexpr,  # 0 softmax, 1 sigmoid, 2 topk_softmax
    HAS_CORR: tl.constexpr,
    N_GROUP: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    GROUP_SCORING: tl.constexpr,  # 0 top2_sum, 1 max
    RENORM: tl.constexpr,
    BLOCK_T: tl.constexpr,  # tokens per program
    BLOCK_E: tl.constexpr,  # >= E, power of two
    BLOCK_G: tl.constexpr,  # >= N_GROUP, power of two
    BLOCK_S: tl.constexpr,  # >= k + S, power of two
):
    pid = tl.program_id(0)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    offs_e = tl.arange(0, BLOCK_E)  # [BE]
    offs_s = tl.arange(0, BLOCK_S)  # [BS] output slots
    t_mask = offs_t < T
    e_mask = offs_e < E
    neg_inf = float("-inf")

    logits = tl.load(
        logits_ptr + offs_t[:, None].to(tl.int64) * stride_lt + offs_e[None, :],
        mask=t_mask[:, None] & e_mask[None, :],
        other=0.0,
    ).to(tl.float32)  # [BT, BE]

    # scores: what the weights are made of; choice: what selection ranks.
    if SCORING == 2:  # topk_softmax: rank raw logits, softmax over the k chosen later
        scores = logits
        choice = tl.where(e_mask[None, :], logits, neg_inf)  # [BT, BE]
    elif SCORING == 0:  # softmax over all E
        masked = tl.where(e_mask[None, :], logits, neg_inf)
        row_max = tl.max(masked, axis=1)  # [BT]
        p = tl.exp(masked - row_max[:, None])  # [BT, BE], 0 in padding
        scores = p / tl.sum(p, axis=1)[:, None]
        choice = tl.where(e_mask[None, :], scores, neg_inf)
    else:  # sigmoid; the correction bias steers selection only
        scores = tl.sigmoid(logits)
        choice = scores
        if HAS_CORR:
            bias = tl.load(corr_bias_ptr + offs_e, mask=e_mask, other=0.0).to(tl.float32)  # [BE]
            choice = scores + bias[None, :]
        choice = tl.where(e_mask[None, :], choice, neg_inf)

    if N_GROUP > 1:  # group-limited: only experts of the best TOPK_GROUP groups stay eligible
        group_size = E // N_GROUP
        gid = offs_e // group_size  # [BE] group of each expert
        offs_g = tl.arange(0, BLOCK_G)  # [BG]
        gscore = tl.full([BLOCK_T, BLOCK_G], neg_inf, tl.float32)  # [BT, BG]
        for g in tl.static_range(N_GROUP):
            vals = tl.where((gid == g)[None, :] & e_mask[None, :], choice, neg_inf)  # [BT, BE]
            m1 = tl.max(vals, axis=1)  # [BT]
            if GROUP_SCORING == 0:  # sum of the two best (one best if the group has one expert)
                first = tl.min(tl.where(vals == m1[:, None], offs_e[None, :], BLOCK_E), axis=1)  # [BT]
                m2 = tl.max(tl.where(offs_e[None, :] == first[:, None], neg_inf, vals), axis=1)
                s = tl.where(group_size > 1, m1 + m2, m1)
            else:
                s = m1
            gscore = tl.where(offs_g[None, :] == g, s[:, None], gscore)
        keep = tl.zeros([BLOCK_T, BLOCK_E], tl.int32) != 0  # [BT, BE] all False
        for _ in tl.static_range(TOPK_GROUP):
            gm = tl.max(gscore, axis=1)  # [BT]
            gi = tl.min(tl.where(gscore == gm[:, None], offs_g[None, :], BLOCK_G), axis=1)  # [BT]
            keep = keep | (gid[None, :] == gi[:, None])  # [BT, BE]
            gscore = tl.where(offs_g[None, :] == gi[:, None], neg_inf, gscore)
        choice = tl.where(keep, choice, neg_inf)

    # Iterative arg-max, k times; results gathered into [BT, BS] register tiles.
    w_acc = tl.zeros([BLOCK_T, BLOCK_S], tl.float32)  # [BT, BS]
    id_acc = tl.zeros([BLOCK_T, BLOCK_S], tl.int32)  # [BT, BS]
    for j in tl.static_range(TOP_K):
        best = tl.max(choice, axis=1)  # [BT]
        idx = tl.min(tl.where(choice == best[:, None], offs_e[None, :], BLOCK_E), axis=1)  # [BT]
        idx = tl.minimum(idx, E - 1)  # NaN rows: stay in bounds (the output is NaN anyway)
        sel = offs_e[None, :] == idx[:, None]  # [BT, BE]
        w = tl.sum(tl.where(sel, scores, 0.0), axis=1)  # [BT]
        w_acc = tl.where(offs_s[None, :] == j, w[:, None], w_acc)
        id_acc = tl.where(offs_s[None, :] == j, idx[:, None], id_acc)
        choice = tl.where(sel, neg_inf, choice)

    routed = (offs_s < TOP_K)[None, :]  # [1, BS]
    if SCORING == 2:  # softmax over the k selected logits
        m = tl.max(tl.where(routed, w_acc, neg_inf), axis=1)  # [BT]
        p = tl.where(routed, tl.exp(w_acc - m[:, None]), 0.0)
        w_acc = p / tl.sum(p, axis=1)[:, None]
    if RENORM:
        w_acc = w_acc / (tl.sum(tl.where(routed, w_acc, 0.0), axis=1)[:, None] + renorm_eps)
    w_acc = w_acc * scaling

    if NUM_SHARED > 0:  # shared experts: slots k..k+S-1 -> experts E..E+S-1, weight 1
        w_acc = tl.where(routed, w_acc, 1.0)
        id_acc = tl.where(routed, id_acc, E + offs_s[None, :] - TOP_K)

    out_mask = t_mask[:, None] & (offs_s < TOP_K + NUM_SHARED)[None, :]
    out_offs = offs_t[:, None].to(tl.int64) * (TOP_K + NUM_SHARED) + offs_s[None, :]  # [BT, BS]
    tl.store(weights_ptr + out_offs, w_acc, mask=out_mask)
    tl.store(ids_ptr + out_offs, id_acc, mask=out_mask)


def routing_constexprs(spec: RouterSpec, num_shared: int, has_corr: bool) -> dict:
    """The compile-time parameters of `route_topk_kernel` for a router (shared with aot.py)."""
    block_e = triton.next_power_of_2(spec.num_experts)
    return dict(
        TOP_K=spec.top_k,
        NUM_SHARED=num_shared,
        SCORING=SCORING_CODES[spec.scoring],
        HAS_CORR=has_corr,
        N_GROUP=spec.n_group,
        TOPK_GROUP=spec.topk_group,
        GROUP_SCORING=GROUP_SCORING_CODES[spec.group_scoring],
        RENORM=spec.renormalize,
        BLOCK_T=max(1, min(16, 2048 // block_e)),
        BLOCK_E=block_e,
        BLOCK_G=triton.next_power_of_2(spec.n_group),
        BLOCK_S=triton.next_power_of_2(spec.top_k + num_shared),
    )


def route_topk(
    logits: torch.Tensor,  # [T, E] float
    router_spec: RouterSpec,
    correction_bias: Optional[torch.Tensor] = None,  # [E]
    *,
    num_shared: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Select experts like `reference.route` -> (weights fp32 [T, k+S], ids int32 [T, k+S]).

    With num_shared = S > 0, S always-active slots (experts E..E+S-1, weight 1) follow the
    k routed ones; the public default S = 0 gives exactly the reference's [T, k].
    """
    if logits.dim() != 2 or logits.shape[1] != router_spec.num_experts:
        raise ValueError(f"route_topk expects logits [T, {router_spec.num_experts}], got {tuple(logits.shape)}")
    if router_spec.num_experts > 4096:
        raise ValueError("route_topk supports at most 4096 experts (one row per program)")
    has_corr = correction_bias is not None
    if has_corr and router_spec.scoring != "sigmoid":
        raise ValueError("a correction bias is only defined for sigmoid scoring")
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    t = logits.shape[0]
    slots = router_spec.top_k + num_shared
    weights = torch.empty(t, slots, dtype=torch.float32, device=logits.device)  # [T, k+S]
    ids = torch.empty(t, slots, dtype=torch.int32, device=logits.device)  # [T, k+S]
    if t == 0:
        return weights, ids
    meta = routing_constexprs(router_spec, num_shared, has_corr)
    bias = correction_bias.float() if has_corr else logits  # dummy pointer when absent
    grid = (triton.cdiv(t, meta["BLOCK_T"]),)
    route_topk_kernel[grid](
        logits, bias, weights, ids, t, router_spec.num_experts, logits.stride(0),
        float(router_spec.routed_scaling_factor), float(router_spec.renormalize_eps),
        **meta,
    )
    return weights, ids
