"""Expert fusion: give every MoE layer the canonical weight layout the kernels take.

Matches: every moecc layer node whose spec is not canonical (moecc.spec.ExpertSpec).
Needs:   capture (moecc.capture) to have produced the nodes; real weight values.
Does:    - gate/up to one concatenated [E, 2N, K] stack (from interleaved GPT-OSS or
           separate gpt-fast w1/w3 stacks), down to [E, K, N];
         - shared experts (DeepSeek) folded in as always-active experts E..E+S-1, so one
           launch sequence serves routed and shared experts;
         each derived tensor made once at compile time (moecc.weight_store).
Guarantees: afterwards every layer node has spec.experts.canonical == True, its weight
           arguments in canonical layout, and unchanged numerics (same reference op).
Memory: appending shared experts copies the routed stack. With
          options.release_original_weights the routed parameter is rebound to a view of the
          derived stack (counter: aliased), so nothing doubles; otherwise the extra memory is
          reported, with a warning above 1 GiB.
Counters: layers (fused layers), relayouts (layers whose weights were re-laid out),
          shared_folded (shared experts appended), aliased, derived_kib.
"""

from __future__ import annotations

import logging

from moecc.backends.reference.experts import canonical_expert_weights
from moecc.capture.report import PassResult
from moecc.spec import MoELayerSpec
from moecc.weights import MOE_WEIGHT_FIELDS, MoEWeights
from moecc.passes.context import PassContext

NAME = "expert_fusion"
log = logging.getLogger("moecc.passes")


def run(ctx: PassContext) -> PassResult:
    counters = {"layers": 0, "relayouts": 0, "shared_folded": 0, "aliased": 0}
    notes = []
    before = ctx.weights.derived_bytes
    for node in ctx.moe_nodes():
        spec = MoELayerSpec.from_json(node.args[-1])
        counters["layers"] += 1
        if spec.experts.canonical:
            continue
        if spec.experts.num_shared and not ctx.options.fuse_shared_experts and spec.experts.gate_up_layout == "concat" \
                and not spec.experts.gate_up_transposed and not spec.experts.down_transposed:
            notes.append(f"{spec.source}: shared experts kept separate (fuse_shared_experts=False)")
            continue
        arg_nodes = dict(zip(MOE_WEIGHT_FIELDS, node.args[1:-1]))
        sources = tuple(n.name if n is not None else None for n in arg_nodes.values())

        def make(field_name, _nodes=arg_nodes, _spec=spec):
            w = MoEWeights(**{f: ctx.value(n) for f, n in _nodes.items()})
            return getattr(canonical_expert_weights(w, _spec.experts), field_name)

        new_args = dict(arg_nodes)
        with ctx.gm.graph.inserting_before(node):
            for field_name in ("gate_up", "down", "gate_up_bias", "down_bias"):
                if field_name.endswith("bias") and arg_nodes[field_name] is None:
                    continue
                new_args[field_name] = ctx.weights.get_attr(
                    ("canonical", field_name, spec.to_json(), sources),
                    lambda f=field_name: make(f), f"{field_name}")
        if ctx.options.release_original_weights:
            counters["aliased"] += _alias_originals(ctx, spec, arg_nodes, new_args)
        for dropped in ("up", "shared_gate", "shared_up", "shared_down"):
            new_args[dropped] = None
        canonical = spec.replace(experts={
            "gate_up_layout": "concat", "gate_up_transposed": False, "down_transposed": False,
            "shared_fused": spec.experts.num_shared > 0,
        })
        node.args = (node.args[0], *[new_args[f] for f in MOE_WEIGHT_FIELDS], canonical.to_json())
        counters["relayouts"] += 1
        counters["shared_folded"] += spec.experts.num_shared
    # No eliminate_dead_code(): FX would drop in-place ops elsewhere in the model whose
    # results are unused (their effect is the mutation). Old weight args are placeholders.
    counters["derived_kib"] = (ctx.weights.derived_bytes - before) // 1024
    extra = ctx.weights.derived_bytes - before - ctx.weights.aliased_bytes
    if extra > 0:
        notes.append(f"derived weights kept beside the originals: {extra / 2**30:.3f} GiB")
        if extra > 2**30:
            log.warning("moecc keeps %.1f GiB of re-laid-out expert weights beside the model's own; pass "
                        "options={'release_original_weights': True} to share storage where possible",
                        extra / 2**30)
    return PassResult(NAME, counters, notes)


def _alias_originals(ctx: PassContext, spec: MoELayerSpec, arg_nodes: dict, new_args: dict) -> int:
    """Rebind unchanged original stacks to views of the derived ones (same values)."""
    aliased = 0
    e = spec.router.num_experts
    if spec.experts.gate_up_layout != "concat" or spec.experts.gate_up_transposed or spec.experts.down_transposed:
        return 0  # the routed part was re-laid out: no view of the derived tensor equals it
    for field_name in ("gate_up", "down"):
        original = ctx.value(arg_nodes[field_name])
        derived = ctx.weights.tensor(new_args[field_name])
        if original.device.type == "meta" or derived.data_ptr() == original.data_ptr():
            continue
        view = derived[:e]
        if view.shape == original.shape and view.dtype == original.dtype:
            original.data = view
            ctx.weights.aliased_bytes += original.numel() * original.element_size()
            aliased += 1
    return aliased
