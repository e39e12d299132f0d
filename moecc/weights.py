"""The tensors of one MoE layer, in the order the moecc custom op takes them.

`MoEWeights` is the single source of truth for that order: capture fills it from the
graph's parameter nodes, the op schema is generated from `MOE_WEIGHT_FIELDS`, and every
backend receives it. Which fields are present depends on the layer's `MoELayerSpec`.

Shapes (legend in moecc/spec.py), for the canonical layout:
    router_weight      [E, K]
    router_bias        [E]          GPT-OSS
    correction_bias    [E]          DeepSeek-V3 score-correction bias (selection only)
    gate_up            [E, 2N, K]   (source layouts: see ExpertSpec)
    up                 [E, N, K]    only for gate_up_layout == "separate"
    down               [E, K, N]
    gate_up_bias       [E, 2N]      GPT-OSS
    down_bias          [E, K]
    shared_gate        [S*N, K]     DeepSeek shared experts (nn.Linear weights)
    shared_up          [S*N, K]
    shared_down        [K, S*N]
    shared_expert_gate [1, K]       Qwen2-MoE-style gate: shared output *= sigmoid(x @ g^T)
    gate_up_scale      [E, 2N, K/G] fp32   only when spec.experts.weight_format != "dense":
    down_scale         [E, K, N/G]  fp32   gate_up / down are then packed uint8
                                           [E, 2N, K/P] / [E, K, N/P] (P = 1 int8, 2 int4;
                                           G = group size; moecc/backends/reference/quantized.py)
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class MoEWeights(NamedTuple):
    router_weight: torch.Tensor
    router_bias: Optional[torch.Tensor]
    correction_bias: Optional[torch.Tensor]
    gate_up: torch.Tensor
    up: Optional[torch.Tensor]
    down: torch.Tensor
    gate_up_bias: Optional[torch.Tensor]
    down_bias: Optional[torch.Tensor]
    shared_gate: Optional[torch.Tensor]
    shared_up: Optional[torch.Tensor]
    shared_down: Optional[torch.Tensor]
    # Last and defaulted, so code that builds MoEWeights from the first 11 fields still works.
    shared_expert_gate: Optional[torch.Tensor] = None
    # Quantised expert stacks (precision lowering): per-group fp32 scales; also last and defaulted.
    gate_up_scale: Optional[torch.Tensor] = None
    down_scale: Optional[torch.Tensor] = None


MOE_WEIGHT_FIELDS: tuple[str, ...] = MoEWeights._fields
REQUIRED_WEIGHT_FIELDS = frozenset({"router_weight", "gate_up", "down"})


def make_weights(**tensors: Optional[torch.Tensor]) -> MoEWeights:
    """Build MoEWeights by name; absent optional fields are None."""
    unknown = set(tensors) - set(MOE_WEIGHT_FIELDS)
    if unknown:
        raise TypeError(f"unknown MoE weight field(s) {sorted(unknown)}; valid: {MOE_WEIGHT_FIELDS}")
    return MoEWeights(**{name: tensors.get(name) for name in MOE_WEIGHT_FIELDS})
