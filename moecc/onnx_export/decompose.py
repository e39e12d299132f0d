"""A moecc layer in plain tensor ops that trace to standard ONNX: the export fallback.

Used for layers onnxruntime's MoE operator cannot express (DeepSeek's grouped sigmoid
routing with a score-correction bias, shared experts, other activations). Routing is the
reference's own `route` (backends/reference/routing.py, the definition); the experts are
computed densely: every expert on every token, combined with a [T, E'] weight matrix that
is zero outside each token's top-k. Same result as the reference (up to fp32 summation
order), with no data-dependent shapes, at E'/k times the expert FLOPs: correct
everywhere, fast nowhere. Quantised stacks are dequantised in the graph
(backends/reference/quantized.py's formula).

Legend: T tokens, K hidden, N expert width, E routed experts, S shared, E' = E + S, k top-k.
"""

from __future__ import annotations

import torch

from moecc.spec import MoELayerSpec
from moecc.weights import MOE_WEIGHT_FIELDS, MoEWeights


def dense_moe_layer(hidden: torch.Tensor, w: MoEWeights, spec: MoELayerSpec) -> torch.Tensor:
    """hidden [T, K] -> [T, K]; canonical layout only (ExpertSpec.canonical)."""
    from moecc.backends.reference.experts import activation
    from moecc.backends.reference.routing import route, router_logits

    if not spec.experts.canonical:
        raise ValueError("dense_moe_layer takes the canonical layout; convert with canonical_layer first")
    e_routed, n = spec.router.num_experts, spec.experts.intermediate_size
    logits = router_logits(hidden, w.router_weight, w.router_bias, spec.router)  # [T, E] fp32
    topk_weights, topk_ids = route(logits, spec.router, w.correction_bias)  # [T, k] x2
    combine = torch.zeros_like(logits).scatter(1, topk_ids, topk_weights)  # [T, E]
    gate_up, down = _expert_stacks(w, spec, hidden.dtype)  # [E', 2N, K], [E', K, N]
    x = hidden.to(gate_up.dtype)
    h = torch.einsum("tk,enk->etn", x, gate_up)  # [E', T, 2N] ([E', T, N] if not gated)
    if w.gate_up_bias is not None:
        h = h + w.gate_up_bias[:, None, :]
    a = activation(h[..., :n], h[..., n:] if spec.experts.gated else None, spec.experts)  # [E', T, N]
    y = torch.einsum("etn,ekn->etk", a, down)  # [E', T, K]
    if w.down_bias is not None:
        y = y + w.down_bias[:, None, :]
    out = torch.einsum("te,etk->tk", combine, y[:e_routed].float())  # [T, K] fp32
    if spec.experts.num_shared:
        shared = y[e_routed:].float().sum(dim=0)  # [T, K]
        if spec.experts.shared_gated:
            gate = torch.sigmoid(torch.nn.functional.linear(hidden, w.shared_expert_gate.to(hidden.dtype)))  # [T, 1]
            shared = shared * gate.float()
        out = out + shared
    return out.to(hidden.dtype)


def _expert_stacks(w: MoEWeights, spec: MoELayerSpec, dtype: torch.dtype):
    """(gate_up, down) as float stacks; packed int8 / int4 stacks dequantised in `dtype`."""
    fmt = spec.experts.weight_format
    if fmt == "dense":
        return w.gate_up, w.down
    return _dequantize(w.gate_up, w.gate_up_scale, fmt, dtype), _dequantize(w.down, w.down_scale, fmt, dtype)


def _dequantize(packed: torch.Tensor, scales: torch.Tensor, fmt: str, dtype: torch.dtype) -> torch.Tensor:
    """backends/reference/quantized.dequantize, written with ops that export (no uint8 shifts)."""
    from moecc.backends.reference.quantized import ZERO_POINT

    if fmt == "fp8":
        raise NotImplementedError("ONNX export does not write fp8 experts yet; export with precision "
                                  "'int8' or 'int4', or without precision")
    q = packed.to(torch.int32)  # [E', R, C/P]
    if fmt == "int4":
        lo, hi = torch.remainder(q, 16), torch.div(q, 16, rounding_mode="floor")
        q = torch.stack([lo, hi], dim=-1).flatten(-2)  # [E', R, C]
    values = q.float() - ZERO_POINT[fmt]
    e, r, c = values.shape
    groups = scales.shape[-1]
    deq = values.reshape(e, r, groups, c // groups) * scales.float().unsqueeze(-1)  # [E', R, C/G, G]
    return deq.reshape(e, r, c).to(dtype)


class DenseMoE(torch.nn.Module):
    """dense_moe_layer as a module taking (hidden, *present weights): what gets exported as
    the body of a fallback layer's ONNX function."""

    def __init__(self, spec: MoELayerSpec, fields: tuple[str, ...]):
        super().__init__()
        self.spec, self.fields = spec, fields

    def forward(self, hidden, t0, t1=None, t2=None, t3=None, t4=None, t5=None, t6=None, t7=None, t8=None,
                t9=None, t10=None, t11=None, t12=None, t13=None):
        # Named parameters, not *tensors: torch.export's dynamic_shapes cannot name varargs.
        tensors = (t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10, t11, t12, t13)
        given = dict(zip(self.fields, tensors))
        return dense_moe_layer(hidden, MoEWeights(**{f: given.get(f) for f in MOE_WEIGHT_FIELDS}), self.spec)


ROUTING_FIELDS = ("router_weight", "router_bias", "correction_bias", "shared_expert_gate")


def moe_router_logits(hidden: torch.Tensor, w: MoEWeights, spec: MoELayerSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Any moecc routing as inputs for onnxruntime's MoE: (router_probs [T, E'], z [T, 1]).

    onnxruntime's MoE (normalize_routing_weights=0, k = top_k + S) takes softmax over its
    router input, then the top k. Feeding log(weight) for each token's selected routed
    experts and for the S shared experts (log 1, or log sigmoid(x g) when gated), -inf
    elsewhere, makes that softmax weight / z with z = sum of those weights; the MoE output
    times z is then exactly this layer's output, whatever the scoring, grouping, bias,
    renormalisation or scaling that chose the weights (all of them give weights >= 0).
    """
    from moecc.backends.reference.routing import route, router_logits

    logits = router_logits(hidden, w.router_weight, w.router_bias, spec.router)  # [T, E] fp32
    topk_weights, topk_ids = route(logits, spec.router, w.correction_bias)  # [T, k] x2
    chosen = torch.full_like(logits, float("-inf")).scatter(1, topk_ids, torch.log(topk_weights))  # [T, E]
    z = topk_weights.sum(dim=-1, keepdim=True)  # [T, 1]
    s = spec.experts.num_shared
    if s:
        if spec.experts.shared_gated:
            gate = torch.sigmoid(torch.nn.functional.linear(hidden, w.shared_expert_gate.to(hidden.dtype))).float()
        else:
            gate = torch.ones_like(z)  # [T, 1]
        chosen = torch.cat([chosen, torch.log(gate).expand(-1, s)], dim=1)  # [T, E + S]
        z = z + s * gate
    return chosen.to(hidden.dtype), z.to(hidden.dtype)


class MoERouterLogits(DenseMoE):
    """moe_router_logits as a module taking (hidden, *present routing weights)."""

    def forward(self, hidden, t0, t1=None, t2=None, t3=None, t4=None, t5=None, t6=None, t7=None, t8=None,
                t9=None, t10=None, t11=None, t12=None, t13=None):
        tensors = (t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10, t11, t12, t13)
        given = dict(zip(self.fields, tensors))
        return moe_router_logits(hidden, MoEWeights(**{f: given.get(f) for f in MOE_WEIGHT_FIELDS}), self.spec)
