"""Reference routing: which k experts each token uses, and with what weight.

Plain torch, written to be obviously right; the Triton and TVM routing kernels are tested
against `route`. All score arithmetic happens in fp32 regardless of the input dtype.
"""

from __future__ import annotations

from typing import Optional

import torch

from moecc.spec import RouterSpec


def router_logits(
    hidden: torch.Tensor,  # [T, K]
    router_weight: torch.Tensor,  # [E, K]
    router_bias: Optional[torch.Tensor],  # [E]
    spec: RouterSpec,
) -> torch.Tensor:
    """The router matmul, in fp32 or in the input dtype as the model does it -> [T, E] fp32."""
    if spec.logits_in_fp32:
        hidden, router_weight = hidden.float(), router_weight.float()
        router_bias = router_bias.float() if router_bias is not None else None
    else:
        router_weight = router_weight.to(hidden.dtype)
        router_bias = router_bias.to(hidden.dtype) if router_bias is not None else None
    return torch.nn.functional.linear(hidden, router_weight, router_bias).float()


def route(
    logits: torch.Tensor,  # [T, E], any float dtype; used in fp32
    spec: RouterSpec,
    correction_bias: Optional[torch.Tensor] = None,  # [E] (ERNIE stores it as [1, E])
) -> tuple[torch.Tensor, torch.Tensor]:
    """Select experts. Returns (weights [T, k] fp32, expert ids [T, k] int64)."""
    logits = logits.float()
    k = spec.top_k
    if spec.scoring == "sparsemixer":
        weights, ids = _sparsemixer(logits, spec.sparsemixer_eps)
    elif spec.scoring == "topk_softmax":
        if spec.masked_experts:  # softmax over the selected logits only: masking = deleting the rows
            logits = logits.index_fill(-1, _ids(spec.masked_experts, logits.device), float("-inf"))
        top_logits, ids = torch.topk(logits, k, dim=-1)  # [T, k]
        weights = torch.softmax(top_logits, dim=-1)
    else:
        if spec.scoring == "softmax":
            scores = torch.softmax(logits, dim=-1)
        elif spec.scoring == "sqrt_softplus":
            scores = torch.sqrt(torch.nn.functional.softplus(logits))
        else:
            scores = torch.sigmoid(logits)
        choice = logits if spec.select_on_logits else scores
        if correction_bias is not None:
            choice = choice + correction_bias.float().reshape(-1)  # bias steers selection only
        if spec.masked_experts:  # pruned experts: scores kept for normalisation, never selected
            choice = choice.index_fill(-1, _ids(spec.masked_experts, choice.device), float("-inf"))
        if spec.n_group > 1:
            choice = _mask_to_best_groups(choice, spec)
        top, ids = torch.topk(choice, k, dim=-1)  # [T, k] x2
        # Selecting on the scores themselves: the top-k values are the gathered weights
        # (one op fewer; a decode step's router runs ~10 small ops per layer).
        weights = top if choice is scores else scores.gather(1, ids)  # [T, k]
    if spec.renormalize:
        total = weights.sum(dim=-1, keepdim=True)  # [T, 1]
        if spec.renormalize_min:
            total = total.clamp(min=spec.renormalize_min)
        weights = weights / (total + spec.renormalize_eps)
    if spec.routed_scaling_factor != 1.0:
        weights = weights * spec.routed_scaling_factor
    return weights, ids


def stack_index(ids: torch.Tensor, spec: RouterSpec) -> torch.Tensor:
    """Router expert ids [T, k] -> rows of the expert stack, which lacks the masked experts."""
    if not spec.masked_experts:
        return ids
    keep = torch.ones(spec.num_experts, dtype=torch.bool, device=ids.device)
    keep[_ids(spec.masked_experts, ids.device)] = False
    if not bool(keep[ids].all()):
        raise ValueError("a masked expert was selected: fewer than top-k unmasked experts were eligible "
                         "(group-limited routing needs enough unmasked experts in every group)")
    return (torch.cumsum(keep.long(), 0) - 1)[ids]  # [T, k]


def _ids(values, device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


def _sparsemixer(logits: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PhiMoE's sparsemixer at inference (top-2): each pick is the argmax of the logits not
    yet picked; its weight is its softmax among the logits within a relative 2*eps of that
    max (|logit| clamped below by the max is the scale)."""
    picked_ids, picked_weights = [], []
    remaining = logits  # [T, E]
    for _ in range(2):
        top, idx = remaining.max(dim=-1, keepdim=True)  # [T, 1] x2
        scale = logits.abs().clamp(min=top)  # [T, E]
        far = (top - logits) / scale > 2 * eps  # [T, E]: outside the jitter band
        gates = torch.softmax(remaining.masked_fill(far, float("-inf")), dim=-1)  # [T, E]
        picked_ids.append(idx)
        picked_weights.append(gates.gather(-1, idx))
        remaining = remaining.scatter(-1, idx, float("-inf"))
    return torch.cat(picked_weights, dim=-1), torch.cat(picked_ids, dim=-1)


def _mask_to_best_groups(choice: torch.Tensor, spec: RouterSpec) -> torch.Tensor:
    """Group-limited routing: experts outside the best `topk_group` groups get -inf."""
    t, e = choice.shape
    grouped = choice.view(t, spec.n_group, e // spec.n_group)  # [T, G, E/G]
    if spec.group_scoring == "top2_sum":
        group_scores = grouped.topk(min(2, e // spec.n_group), dim=-1).values.sum(dim=-1)  # [T, G]
    else:
        group_scores = grouped.amax(dim=-1)  # [T, G]
    best = torch.topk(group_scores, spec.topk_group, dim=-1).indices  # [T, topk_group]
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)  # [T, G]
    keep = keep.unsqueeze(-1).expand_as(grouped).reshape(t, e)  # [T, E]
    return choice.masked_fill(~keep, float("-inf"))
