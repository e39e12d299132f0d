"""Turn a candidate region into a typed layer description, or say why not.

Two steps, each of which may decline with a reason:
1. Interface: exactly one activation enters the region (the hidden states), exactly one
   value leaves it, the region mutates nothing outside itself, and every weight it reads
   is one of the MoEWeights roles (named like transformers' or gpt-fast's modules).
2. Semantics: router and expert variants read off the ops in the region (see the
   `_router_spec` and `_expert_layouts` docstrings). Where the graph leaves a layout
   ambiguous (square weights), several candidate specs are returned in order; capture
   verification picks the one that reproduces the region numerically.
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from moecc.capture.graph_utils import (
    arg,
    call_name,
    descendants,
    example_value,
    constant_value,
    float_constant,
    is_call,
    is_getitem,
    is_weight_node,
    weight_name,
)
from moecc.capture.regions import Region
from moecc.spec import ExpertSpec, MoELayerSpec, RouterSpec, SpecError


class Decline(Exception):
    """The region is not understood completely; the message says why."""


@dataclass
class Recognised:
    hidden: fx.Node  # [.., K] activation entering the region
    output: fx.Node  # the region's one result, same shape as hidden or [T, K]
    weights: dict[str, fx.Node]  # MoEWeights field -> weight node
    candidates: list[MoELayerSpec]  # most likely first
    experts_implementation: str
    externals: list[fx.Node] = field(default_factory=list)
    keep: set[fx.Node] = field(default_factory=set)  # shape computations used outside: not erased
    baked: dict[fx.Node, float] = field(default_factory=dict)  # scalar inputs read as constants


# Parameter names -> MoEWeights roles. Owner-module names decide shared vs routed.
_STACKED = {
    "gate_up_proj": "gate_up", "w13": "gate_up", "gate_up": "gate_up", "w13_weight": "gate_up",
    "down_proj": "down", "w2": "down", "w2_weight": "down",
    "up_proj": "up", "w3": "up",
    "gate_proj": "gate", "w1": "gate",
}
_STACKED_BIAS = {"gate_up_proj_bias": "gate_up_bias", "down_proj_bias": "down_bias"}
_SHARED_LINEAR = {"gate_up_proj": "shared_gate_up", "gate_proj": "shared_gate", "up_proj": "shared_up", "down_proj": "shared_down",
                  "w1": "shared_gate", "w3": "shared_up", "w2": "shared_down"}
# Selection-only score biases (DeepSeek-V3 e_score_correction_bias, AFMoE expert_bias,
# ERNIE 4.5 moe_statics.e_score_correction_bias stored as [1, E]).
_CORRECTION_BIAS = ("e_score_correction_bias", "expert_bias", "correction_bias", "score_correction_bias")
_MUTATING_FUNCTIONS = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv}


def recognise(region: Region, scalars: dict[fx.Node, float] | None = None) -> Recognised:
    nodes = set(region.nodes)
    externals: list[fx.Node] = []
    for n in region.nodes:
        for a in n.all_input_nodes:
            if a not in nodes and a not in externals:
                externals.append(a)
    _check_no_outside_mutation(region, nodes)

    scalars = scalars or {}
    activations = [a for a in externals if not is_weight_node(a) and a not in scalars
                   and isinstance(example_value(a), torch.Tensor)]
    if len(activations) != 1:
        raise Decline(f"expected one activation input (the hidden states), found {len(activations)}: "
                      f"{[a.name for a in activations]}; the router and experts of {region.module_class} do not "
                      "sit in a module whose only input is the hidden states (the router reads another tensor, "
                      "or the MoE is inlined in a larger layer)")
    hidden = activations[0]
    escaping = [n for n in region.nodes if any(u not in nodes for u in n.users)]
    outputs = [n for n in escaping if isinstance(example_value(n), torch.Tensor)]
    keep = _shape_only_closure([n for n in escaping if n not in outputs], nodes)
    if len(outputs) != 1:
        raise Decline(f"expected one result leaving the layer, found {len(outputs)}: {[o.name for o in outputs]}")
    output = outputs[0]
    hv, ov = example_value(hidden), example_value(output)
    if not isinstance(ov, torch.Tensor) or ov.dtype != hv.dtype:
        raise Decline("the layer's result is not a tensor of the input's dtype")
    if not (_same_shape(ov, hv) or (ov.dim() == 2 and _same_size(ov.shape[-1], hv.shape[-1]))):
        raise Decline(f"result shape {tuple(ov.shape)} is neither the input's {tuple(hv.shape)} nor [T, K]")

    weights = _classify_weights([a for a in externals if is_weight_node(a)], region)
    for required in ("router_weight", "down"):
        if required not in weights:
            raise Decline(f"no {required.replace('_', ' ')} found among the layer's parameters")
    gated = "gate_up" in weights or "gate" in weights
    if not gated and "up" not in weights:
        raise Decline("no gate/up or up expert weights found")
    if not gated:  # NemotronH: down(act(up(x))); the one projection travels as gate_up
        weights["gate_up"] = weights.pop("up")
        if "shared_up" in weights and "shared_gate" not in weights:
            weights["shared_gate"] = weights.pop("shared_up")

    candidates = _candidate_specs(region, nodes, hidden, weights, scalars, gated)
    if "gate" in weights:  # separate gate and up stacks travel as gate_up (gate) + up
        weights["gate_up"] = weights.pop("gate")
    if "shared_gate_up" in weights:  # a fused shared gate/up Linear travels as shared_gate
        weights["shared_gate"] = weights.pop("shared_gate_up")
    impl = _experts_implementation(region)
    baked = {a: scalars[a] for a in externals if a in scalars}
    return Recognised(hidden, output, weights, candidates, impl, externals, keep, baked)


_SHAPE_ONLY_OPS = {"size", "sym_size", "view", "reshape", "getattr", "getitem", "mul", "add", "sub",
                   "floordiv", "truediv", "sym_numel", "numel", "dim"}


def _shape_only_closure(roots: list[fx.Node], nodes: set[fx.Node]) -> set[fx.Node]:
    """Symbolic sizes computed inside the layer but used outside (Dynamo shares them).

    They are kept in the graph with everything inside the layer they depend on, which
    must be shape arithmetic or views of the input: anything that computes is a Decline.
    """
    keep: set[fx.Node] = set()
    stack = list(roots)
    while stack:
        n = stack.pop()
        if n in keep:
            continue
        if isinstance(example_value(n), torch.Tensor) and call_name(n) not in ("view", "reshape"):
            raise Decline(f"a size used outside the layer depends on {n.name} ({call_name(n)})")
        if call_name(n) not in _SHAPE_ONLY_OPS and not isinstance(example_value(n), (int, torch.SymInt)):
            raise Decline(f"{n.name} ({call_name(n)}) is used outside the layer")
        keep.add(n)
        stack.extend(a for a in n.all_input_nodes if a in nodes)
    return keep


def _same_size(a, b) -> bool:
    return str(a) == str(b)


def _same_shape(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dim() == b.dim() and all(_same_size(x, y) for x, y in zip(a.shape, b.shape))


def _check_no_outside_mutation(region: Region, nodes: set[fx.Node]) -> None:
    for n in region.nodes:
        mutating = (n.op == "call_method" and str(n.target).endswith("_") and not str(n.target).startswith("__")) \
            or (n.op == "call_function" and n.target in _MUTATING_FUNCTIONS)
        if mutating and n.args and isinstance(n.args[0], fx.Node) and n.args[0] not in nodes:
            raise Decline(f"{n.name} ({call_name(n)}) mutates a tensor from outside the layer")


def _classify_weights(weight_nodes: list[fx.Node], region: Region) -> dict[str, fx.Node]:
    roles: dict[str, fx.Node] = {}
    stacked_e = {example_value(w).shape[0] for w in weight_nodes if example_value(w).dim() == 3}
    if len(stacked_e) != 1:
        raise Decline(f"stacked expert weights disagree on the number of experts: {sorted(map(str, stacked_e))}")
    e = next(iter(stacked_e))
    for w in weight_nodes:
        owner, pname = weight_name(w)
        v = example_value(w)
        role = None
        if v.dim() == 3:
            role = _STACKED.get(pname)
        elif pname in _STACKED_BIAS and v.dim() == 2:
            role = _STACKED_BIAS[pname]
        elif pname in _CORRECTION_BIAS and v.numel() == e and v.dim() <= 2:
            role = "correction_bias"
        elif v.dim() == 1 and _same_size(v.shape[0], e):
            role = "router_bias" if pname == "bias" else None
        elif owner == "shared_expert_gate" and pname == "weight" and v.dim() == 2 and v.shape[0] == 1:
            role = "shared_expert_gate"
        elif v.dim() == 2 and _same_size(v.shape[0], e) and pname == "weight" and "shared" not in owner:
            role = "router_weight"
        elif v.dim() == 2 and pname == "weight" and owner in _SHARED_LINEAR:
            role = _SHARED_LINEAR[owner]
        if role is None:
            raise Decline(f"parameter {owner}.{pname} {tuple(v.shape)} has no known role in an MoE layer")
        if role in roles:
            raise Decline(f"two parameters claim the role {role}: {roles[role].name}, {w.name}")
        roles[role] = w
    return roles


def _experts_implementation(region: Region) -> str:
    names = {call_name(n) for n in region.nodes}
    if "grouped_mm_fallback" in names or "_grouped_mm" in names or "grouped_mm" in names:
        return "grouped_mm"
    if "bmm" in names and "repeat_interleave" in names:
        return "batched_mm"
    if "einsum" in names or "bmm" in names:
        return "indexed-einsum"
    return "other"


def _candidate_specs(region: Region, nodes: set[fx.Node], hidden: fx.Node,
                     weights: dict[str, fx.Node], scalars: dict[fx.Node, float],
                     gated: bool = True) -> list[MoELayerSpec]:
    k_size = example_value(hidden).shape[-1]
    expert_nodes = descendants([weights[r] for r in ("gate_up", "gate", "up", "down") if r in weights], nodes)
    shared_nodes = descendants([weights[r] for r in ("shared_gate", "shared_up", "shared_down", "shared_expert_gate",
                                                     "shared_gate_up")
                                if r in weights], nodes)
    router_nodes = [n for n in region.nodes if n not in expert_nodes and n not in shared_nodes]
    router = _router_spec(router_nodes, weights, scalars)
    output_scale = _routed_output_scale(region, expert_nodes, shared_nodes, scalars)
    if output_scale != 1.0:
        router = dataclasses.replace(router, routed_scaling_factor=router.routed_scaling_factor * output_scale)
    specs = []
    for layout in _expert_layouts(region, expert_nodes, weights, k_size, scalars, gated):
        try:
            if "shared_expert_gate" in weights:
                layout = dataclasses.replace(layout, shared_gated=True)
            specs.append(MoELayerSpec(router=router, experts=layout, source=region.path))
        except SpecError as exc:
            raise Decline(f"inconsistent layer description: {exc}") from exc
    return specs


def _router_spec(router_nodes: list[fx.Node], weights: dict[str, fx.Node],
                 scalars: dict[fx.Node, float] | None = None) -> RouterSpec:
    """Router variant from the ops outside the experts.

    - top_k: k of the last topk; scoring: softmax after that topk -> "topk_softmax",
      softmax before -> "softmax", sigmoid -> "sigmoid", softplus + sqrt -> "sqrt_softplus".
    - group-limited: a topk over a [T, G] tensor gives topk_group; G is its last dim;
      a topk over [T, G, E/G] means groups are scored by the sum of their top-2,
      an amax/max over it means by their maximum.
    - renormalise: a division by a tensor after the last topk; an add of a constant to the
      sum is eps, a clamp of it the floor; a division by a constant is a scale.
    - routed scaling factor: a multiplication by a constant after the last topk.
    - logits in fp32: the router matmul's result is fp32 while the hidden states are not.
    """
    in_router = set(router_nodes)
    topks = [n for n in router_nodes if is_call(n, "topk")]
    if not topks:
        return _sparsemixer_router(router_nodes, weights, scalars)
    final = topks[-1]
    e = int(example_value(weights["router_weight"]).shape[0])
    top_k = int(arg(final, 1, "k"))
    after = descendants([final], in_router)
    softmaxes = [n for n in router_nodes if is_call(n, "softmax")]
    if any(s in after for s in softmaxes):
        scoring = "topk_softmax"
    elif softmaxes:
        scoring = "softmax"
    elif any(is_call(n, "sigmoid") for n in router_nodes):
        scoring = "sigmoid"
    elif any(is_call(n, "softplus") for n in router_nodes) and any(is_call(n, "sqrt") for n in router_nodes):
        scoring = "sqrt_softplus"
    else:
        raise Decline("router scores are neither softmax nor sigmoid "
                      f"(router ops: {sorted({call_name(n) for n in router_nodes} - {''})[:14]})")
    # Sigmoid only of the gathered logits: selection ranked the raw logits (Kolibri).
    select_on_logits = scoring == "sigmoid" and all(s in after for s in router_nodes if is_call(s, "sigmoid"))

    n_group, topk_group, group_scoring = 1, 1, "top2_sum"
    for t in topks[:-1]:
        src = example_value(t.args[0])
        if src.dim() == 2:
            n_group, topk_group = int(src.shape[-1]), int(arg(t, 1, "k"))
    if n_group > 1 and any(is_call(n, "amax", "max") and example_value(n.args[0]).dim() == 3 for n in router_nodes):
        group_scoring = "max"

    renormalize, eps, floor, scale = False, 0.0, 0.0, 1.0
    for n in router_nodes:
        if n not in after:
            continue
        name = call_name(n)
        if name in ("truediv", "itruediv", "div", "div_", "__truediv__", "__itruediv__"):
            denominator = n.args[1] if len(n.args) > 1 else None
            constant = constant_value(denominator, scalars)
            if constant is not None:  # weights / top_k (OpenAI privacy filter): a scale, not a renormalisation
                scale /= constant
                continue
            renormalize = True
            if isinstance(denominator, fx.Node) and call_name(denominator) in ("add", "iadd", "__add__"):
                eps = float_constant(denominator, scalars) or 0.0
            elif isinstance(denominator, fx.Node) and call_name(denominator) in ("clamp", "clamp_min", "clip"):
                floor = constant_value(arg(denominator, 1, "min"), scalars) or 0.0
        elif name in ("mul", "imul", "__mul__", "mul_"):
            c = float_constant(n, scalars)
            if c is not None:
                scale *= c
    linear = next((n for n in router_nodes if is_call(n, "linear", "matmul", "mm")
                   and weights["router_weight"] in n.all_input_nodes), None)
    hidden_fp32 = any(example_value(w).dtype == torch.float32 for w in [weights["router_weight"]])
    logits_fp32 = linear is not None and example_value(linear).dtype == torch.float32 and not hidden_fp32
    return RouterSpec(
        num_experts=e, top_k=top_k, scoring=scoring, n_group=n_group, topk_group=topk_group,
        group_scoring=group_scoring, has_router_bias="router_bias" in weights,
        has_correction_bias="correction_bias" in weights, renormalize=renormalize, renormalize_eps=eps,
        renormalize_min=floor, routed_scaling_factor=scale, logits_in_fp32=logits_fp32,
        select_on_logits=select_on_logits,
    )


def _sparsemixer_router(router_nodes: list[fx.Node], weights: dict[str, fx.Node],
                        scalars: dict[fx.Node, float] | None) -> RouterSpec:
    """PhiMoE's sparsemixer: two rounds of max, a relative-distance test `> 2*eps`, a
    masked softmax and a scatter of -inf over the first pick. Verification checks the rest."""
    names = [call_name(n) for n in router_nodes]
    maxes = [n for n in router_nodes if is_call(n, "max") and (len(n.args) > 1 or "dim" in n.kwargs)]
    tests = [float_constant(n, scalars) for n in router_nodes if is_call(n, "gt", "__gt__")]
    if len(maxes) != 2 or "masked_fill" not in names or "scatter" not in names or "softmax" not in names \
            or not tests or None in tests or len(set(tests)) != 1:
        raise Decline("no top-k expert selection found, and the router is not a sparsemixer "
                      f"(router ops: {sorted(set(names) - {''})[:16]})")
    e = int(example_value(weights["router_weight"]).shape[0])
    return RouterSpec(num_experts=e, top_k=2, scoring="sparsemixer", sparsemixer_eps=tests[0] / 2,
                      has_router_bias="router_bias" in weights)


def _routed_output_scale(region: Region, expert_nodes: set[fx.Node], shared_nodes: set[fx.Node],
                         scalars: dict[fx.Node, float] | None) -> float:
    """A constant multiplying the routed experts' sum in the MoE block itself (Beam applies
    its routed_scaling_factor there, not to the routing weights): the same linear map as
    scaling the weights. Muls inside the experts module (GPT-OSS's alpha) are not it."""
    scale = 1.0
    for n in region.nodes:
        if n not in expert_nodes or n in shared_nodes or call_name(n) not in ("mul", "imul", "__mul__", "mul_"):
            continue
        stack = list(n.meta.get("nn_module_stack") or {})
        if not stack or stack[-1] != region.key:
            continue
        c = float_constant(n, scalars)
        if c is not None:
            scale *= c
    return scale


def _expert_layouts(region: Region, expert_nodes: set[fx.Node], weights: dict[str, fx.Node],
                    k_size, scalars: dict[fx.Node, float] | None = None, gated: bool = True) -> list[ExpertSpec]:
    """Expert layout and activation candidates.

    Activation: silu -> "silu"; gelu(approximate="tanh") -> "gelu_tanh", plain gelu ->
    "gelu"; clamp + sigmoid of (gate * alpha) -> "swiglu_oai" with that alpha and the
    clamp limit; two c * tanh(x / c) + sigmoid -> "swiglu_softcap" (gate cap first).
    Layout: a stride-2 slice of the gate/up product -> "interleaved"; separate gate and up
    stacks -> "separate"; else "concat". Orientation from shapes: [E, 2N, K] or [E, K, 2N];
    when 2N == K (or N == K for down) both are candidates.
    """
    ordered = [n for n in region.nodes if n in expert_nodes]
    names = [call_name(n) for n in ordered]
    alpha, limit, caps = 1.702, 7.0, (0.0, 0.0)
    if not gated and "relu" in names and ("square" in names or "pow" in names):
        act = "relu2"
    elif "silu" in names:
        act = "silu"
    elif "gelu" in names:
        g = ordered[names.index("gelu")]
        act = "gelu_tanh" if g.kwargs.get("approximate", "none") == "tanh" else "gelu"
    elif "tanh" in names and "sigmoid" in names:
        # c * tanh(x / c) on the gate, then on up (Inkling2's softcapped SwiGLU)
        found = [float_constant(t.args[0], scalars) for t in ordered if call_name(t) == "tanh"
                 and isinstance(t.args[0], fx.Node) and call_name(t.args[0]) in ("truediv", "div", "__truediv__")]
        if len(found) != 2 or None in found:
            raise Decline("tanh in the experts is not the softcapped SwiGLU moecc knows "
                          "(c_g*tanh(gate/c_g) * sigmoid(gate) * c_u*tanh(up/c_u))")
        act, caps = "swiglu_softcap", (found[0], found[1])
    elif "sigmoid" in names and "clamp" in names:
        act = "swiglu_oai"
        sig = ordered[names.index("sigmoid")]
        scaled = sig.args[0]
        if isinstance(scaled, fx.Node) and float_constant(scaled, scalars) is not None:
            alpha = float_constant(scaled, scalars)
        for c in (n for n in ordered if call_name(n) == "clamp"):
            hi = constant_value(arg(c, 2, "max"), scalars)
            if hi is not None:
                limit = hi
    else:
        raise Decline(f"unrecognised expert activation (ops: {sorted(set(names))[:12]})")

    interleaved = any(is_getitem(n) and _has_step2_slice(n.args[1]) for n in ordered)
    separate = "up" in weights
    layout = "separate" if separate else "interleaved" if interleaved else "concat"
    first = weights["gate" if separate else "gate_up"]
    _, a, b = (int(x) for x in example_value(first).shape)
    _, da, db = (int(x) for x in example_value(weights["down"]).shape)
    k = int(k_size)
    width = 1 if separate or not gated else 2  # gate_up rows per intermediate channel
    up_options = []
    if b == k:
        up_options.append((False, a // width))
    if a == k:
        up_options.append((True, b // width))
    if not up_options:
        raise Decline(f"expert weight {tuple(example_value(first).shape)} has no dimension equal to hidden size {k}")
    has_bias = "gate_up_bias" in weights or "down_bias" in weights
    num_shared, shared_width = 0, 0
    specs = []
    for transposed, n in up_options:
        fused_shared = "shared_gate_up" in weights
        if "shared_gate" in weights or fused_shared:
            width_shared = int(example_value(weights["shared_gate_up" if fused_shared else "shared_gate"]).shape[0])
            width_shared //= 2 if fused_shared else 1
            num_shared = -(-width_shared // n)  # ceil: a narrower shared MLP is zero-padded
            shared_width = width_shared if width_shared % n else 0
        down_options = [d for d, ok in ((False, (da, db) == (k, n)), (True, (da, db) == (n, k))) if ok]
        for down_t in down_options:
            specs.append(ExpertSpec(
                hidden_size=k, intermediate_size=n, activation=act, swiglu_alpha=alpha, swiglu_limit=limit,
                gate_softcap=caps[0], up_softcap=caps[1],
                gate_up_layout=layout, gate_up_transposed=transposed, down_transposed=down_t,
                has_bias=has_bias, num_shared=num_shared, shared_gate_up_fused=fused_shared,
                shared_intermediate_size=shared_width, gated=gated,
            ))
    if not specs:
        raise Decline(f"down weight {(da, db)} does not match hidden size {k} and the expert width")
    return specs


def _has_step2_slice(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(s, slice) and s.step == 2 for s in items)

