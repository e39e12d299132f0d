"""The reference MoE layer: the definition every kernel is compared with.

out[t] = sum_j w[t, j] * expert_{id[t, j]}(x[t]) + g(x[t]) * sum_s shared_s(x[t])

g = 1, or sigmoid(x[t] @ shared_expert_gate^T) for gated shared experts (Qwen2-MoE).

Routing in fp32 (backends/reference/routing.py); each expert's MLP in the weights'
dtype, as the models' eager code does; the weighted sum accumulates in fp32 and is cast
to the input dtype once. A loop over the experts that received tokens: slow, simple, and
it reads no weight of an expert without tokens. Masked experts (RouterSpec.masked_experts,
left by pruning) are never selected and have no rows in the expert stacks.

Quantised experts (spec.experts.weight_format "int8" / "int4" / "fp8"): each expert's packed
weights are dequantised (backends/reference/quantized.py) to the hidden states' dtype
when it is used, one expert at a time; that dequantised weight is the semantics.
"""

from __future__ import annotations

import torch

from moecc.backends.reference.experts import canonical_expert_weights, expert_mlp
from moecc.backends.reference.quantized import dequantize
from moecc.backends.reference.routing import route, router_logits, stack_index
from moecc.spec import MoELayerSpec
from moecc.weights import MoEWeights


def moe_layer(hidden: torch.Tensor, weights: MoEWeights, spec: MoELayerSpec) -> torch.Tensor:
    """hidden [T, K] -> [T, K] in hidden's dtype."""
    if hidden.dim() != 2 or hidden.shape[1] != spec.experts.hidden_size:
        raise ValueError(
            f"moe_layer expects hidden states [T, {spec.experts.hidden_size}], got {tuple(hidden.shape)}"
        )
    logits = router_logits(hidden, weights.router_weight, weights.router_bias, spec.router)  # [T, E]
    topk_weights, topk_ids = route(logits, spec.router, weights.correction_bias)  # [T, k] x2
    topk_ids = stack_index(topk_ids, spec.router)  # stack rows: masked (pruned) experts have none
    experts = canonical_expert_weights(weights, spec.experts)
    if spec.experts.weight_format != "dense":
        experts = experts._replace(gate_up=_DequantizedStack(experts.gate_up, weights.gate_up_scale, spec, hidden.dtype),
                                   down=_DequantizedStack(experts.down, weights.down_scale, spec, hidden.dtype))
    return combine_experts(hidden, topk_weights, topk_ids, experts, spec, weights.shared_expert_gate)


class _DequantizedStack:
    """A packed stack indexed like a dense one: stack[e] is expert e dequantised ([R, C])."""

    def __init__(self, packed, scales, spec: MoELayerSpec, dtype):
        if scales is None:
            raise ValueError(f"the layer spec says {spec.experts.weight_format} weights but no scales were given")
        self.packed, self.scales, self.fmt, self.dtype = packed, scales, spec.experts.weight_format, dtype
        self.group_size = spec.experts.group_size  # fp8: the block edge

    def __getitem__(self, e):
        return dequantize(self.packed[e], self.scales[e], self.fmt, self.dtype, self.group_size)


def combine_experts(
    hidden: torch.Tensor,  # [T, K]
    topk_weights: torch.Tensor,  # [T, k] fp32
    topk_ids: torch.Tensor,  # [T, k]
    experts,  # CanonicalExperts
    spec: MoELayerSpec,
    shared_expert_gate=None,  # [1, K] when spec.experts.shared_gated
) -> torch.Tensor:
    """Weighted sum of the selected experts' outputs plus the shared experts -> [T, K]."""
    t = hidden.shape[0]
    num_routed = spec.router.num_experts - len(spec.router.masked_experts)  # routed rows of the stack
    out = torch.zeros(t, hidden.shape[1], dtype=torch.float32, device=hidden.device)  # [T, K]
    for e in torch.unique(topk_ids).tolist():
        tok, slot = torch.nonzero(topk_ids == e, as_tuple=True)  # tokens routed to e
        y = expert_mlp(hidden[tok], experts.gate_up[e], experts.down[e], _row(experts.gate_up_bias, e),
                       _row(experts.down_bias, e), spec.experts)  # [t_e, K]
        out.index_add_(0, tok, y.float() * topk_weights[tok, slot, None].float())
    if experts.num_shared:
        shared = torch.zeros_like(out)  # [T, K]
        for s in range(experts.num_shared):
            e = num_routed + s
            shared += expert_mlp(hidden, experts.gate_up[e], experts.down[e], _row(experts.gate_up_bias, e),
                                 _row(experts.down_bias, e), spec.experts).float()
        if spec.experts.shared_gated:
            if shared_expert_gate is None:
                raise ValueError("the layer spec says shared_gated but no shared_expert_gate weight was given")
            # The gate runs in the model's dtype, as the models' own nn.Linear does.
            gate = torch.sigmoid(torch.nn.functional.linear(hidden, shared_expert_gate.to(hidden.dtype)))  # [T, 1]
            shared = shared * gate.float()
        out += shared
    return out.to(hidden.dtype)


def _row(t, i):
    return None if t is None else t[i]
