"""Expert pruning: drop the experts a routing-statistics plan removes from each MoE layer.

Matches: every moecc layer node, when options.prune_experts is set (moecc/pruning.py).
Needs:   expert_fusion before it (canonical stacks gate_up [E+S, 2N, K], down [E+S, K, N],
         shared experts appended after the routed ones); precision_lowering and
         lower_kernels after it (they quantise and bind the smaller stacks).
Does:    with max_loss, first chooses keep by running this graph on data with candidate
         plans masked (moecc/pruning_budget.py); then
         plans per layer with moecc.pruning.plan_pruning (criterion, keep, super experts,
         group floors from the layer's router spec), then replaces the layer's expert
         stacks (and expert biases) by copies holding only the kept routed experts and the
         shared ones: E' = E - removed rows, so what the kernels read and their grid
         shrink. Routing is rewritten exactly:
         - router rows deleted (router weight, router bias, correction bias; spec
           num_experts = E') where the other experts' weights do not depend on the
           removed logits: top-k softmax (softmax over the selected logits), softmax +
           renormalisation without eps or clamp, per-expert sigmoid / sqrt-softplus
           scoring without groups;
         - otherwise (softmax over all experts without renormalisation, a softmax with a
           correction bias or renormalisation eps, group-limited routing) the router is
           kept whole and spec.router.masked_experts lists the removed experts: their
           logits still normalise, they are never selected (backends/reference/routing.py);
           the Triton / TVM kernels do not implement that, so lower_kernels keeps such
           layers on the reference op (moecc.spec.kernel_unsupported).
Guarantees: the compiled layer equals the eager layer with the same experts masked
         (moecc.pruning.mask_experts); a plan that removes nothing leaves the graph
         untouched (bit-identical); statistics that do not fit a captured layer (missing
         layer, other expert count or top-k) raise PruningError before anything changes.
Memory: the pruned stacks are derived tensors (moecc.weight_store); a derived stack they
         replace (expert_fusion's canonical copy) is freed when nothing else reads it. The
         model's own parameters stay alive as long as the model does.
Certified: with options.prune_experts["certified"], experts moecc/expert_certificates.py
         proves unreachable from the router weights (input norm bounded by the RMSNorm that
         feeds the layer, found in the graph) are removed too, with or without statistics;
         the outputs do not change and the certificate is in the notes.
Counters: layers (pruned), experts_removed, rows_deleted (layers whose router rows went),
         masked (layers routed with masked_experts), skipped, certified (experts removed by
         a certificate), saved_kib (expert weight bytes no longer read or stored in the
         compiled stacks).
Notes:   per layer: experts removed, how routing was rewritten, bytes saved, plan notes,
         certificates.
"""

from __future__ import annotations

import dataclasses

from moecc.capture.report import PassResult
from moecc.passes.context import PassContext
from moecc.pruning import LayerPlan, PruningError, group_floor, plan_pruning
from moecc.spec import MoELayerSpec, RouterSpec
from moecc.weights import MOE_WEIGHT_FIELDS

NAME = "prune_experts"
STACK_FIELDS = ("gate_up", "down", "gate_up_bias", "down_bias")  # [E+S, ...]: one row per expert
ROUTER_FIELDS = ("router_weight", "router_bias", "correction_bias")  # [E, ...] ([1, E] for ERNIE's bias)


def run(ctx: PassContext) -> PassResult:
    counters = {"layers": 0, "experts_removed": 0, "rows_deleted": 0, "masked": 0, "skipped": 0, "certified": 0,
                "saved_kib": 0}
    config = ctx.options.prune_experts
    if config is None:
        return PassResult(NAME, counters)
    nodes = [(node, MoELayerSpec.from_json(node.args[-1])) for node in ctx.moe_nodes()]
    groups = {s.source: (s.router.n_group, group_floor(s.router.n_group, s.router.topk_group, s.router.top_k,
                                                       s.router.group_scoring))
              for _, s in nodes if s.router.n_group > 1}
    plan = None
    if config.stats is not None:
        _check_fit(config, [spec for _, spec in nodes], _transformers_model_types(ctx.gm))
        budget = ""
        if config.max_loss is not None:
            from moecc.pruning_budget import keep_for_loss_bound

            keep, budget = keep_for_loss_bound(ctx, config, groups)
            config = dataclasses.replace(config, keep=keep)
        plan = plan_pruning(config.stats, config, groups)
    notes = [f"prune_experts: keep {config.keep:g} by {config.criterion} ({config.stats_source})"
             + (", and experts proven unreachable" if config.certified else "")]
    if config.stats is not None and budget:
        notes.append(budget)
    saved = 0
    for node, spec in nodes:
        name = spec.source
        planned = plan.layer(name) if plan is not None else None
        lp = planned or LayerPlan(name, spec.router.num_experts, ())
        why_not = _unsupported(spec)
        if config.certified and not why_not:
            lp, certified_note = _with_certificates(ctx, node, spec, lp, groups.get(name, (1, 0)))
            counters["certified"] += len(lp.removed) - (len(planned.removed) if planned else 0)
            notes.append(f"{name}: {certified_note}")
        if not lp.removed:
            notes.append(f"{name}: nothing removed" + (f" ({lp.note})" if lp.note else ""))
            continue
        if why_not:
            counters["skipped"] += 1
            notes.append(f"{name}: kept all {lp.experts} experts: {why_not}")
            continue
        exact = rows_deletable(spec.router)
        layer_saved = _rewrite(ctx, node, spec, lp.kept, lp.removed, exact)
        saved += layer_saved
        counters["layers"] += 1
        counters["experts_removed"] += len(lp.removed)
        counters["rows_deleted" if exact else "masked"] += 1
        how = "router rows deleted" if exact else "router kept, experts masked after normalisation"
        notes.append(f"{name}: removed {len(lp.removed)}/{lp.experts} experts {list(lp.removed)} ({how}), "
                     f"{layer_saved / 1024:.0f} KiB of expert weights saved" + (f"; {lp.note}" if lp.note else ""))
    counters["saved_kib"] = saved // 1024
    return PassResult(NAME, counters, notes)


def rows_deletable(router: RouterSpec) -> bool:
    """True when deleting a removed expert's router row leaves every other weight unchanged."""
    if router.n_group > 1:
        return False  # the group scores and group sizes would change
    if router.scoring == "topk_softmax":
        return True
    if router.scoring in ("sigmoid", "sqrt_softplus"):
        return True  # each expert's score depends on its own logit only
    return (router.scoring == "softmax" and router.renormalize and not router.has_correction_bias
            and not router.renormalize_eps and not router.renormalize_min)


def _unsupported(spec: MoELayerSpec) -> str:
    if not spec.experts.canonical:
        return "layout not canonical (expert_fusion kept it, e.g. fuse_shared_experts=False)"
    if spec.experts.weight_format != "dense":
        return "expert weights already quantised"
    if spec.router.scoring == "sparsemixer":
        return "sparsemixer routing has no masked form"
    if spec.router.masked_experts:
        return "the layer already has masked experts"
    return ""


def _check_fit(config, specs: list[MoELayerSpec], model_types: set[str]) -> None:
    """Every captured layer must have statistics of its shape, and the statistics the
    model type of the graph's modules (where transformers defines them); else nothing is
    pruned. Two models of one type and shape (e.g. two trainings) cannot be told apart
    here: moecc.pruning.plan_for_model checks the model object itself."""
    theirs = config.stats.fingerprint.model_type
    if specs and model_types and theirs not in model_types:
        raise PruningError(f"{config.stats_source}: statistics recorded on another model: model_type is {theirs!r} "
                           f"in the statistics, {sorted(model_types)} in the compiled graph; calibrate this model")
    by_name = {layer.name: layer for layer in config.stats.layers}
    for spec in specs:
        layer = by_name.get(spec.source)
        if layer is None:
            raise PruningError(f"{config.stats_source}: no statistics for MoE layer {spec.source!r} (the file has "
                               f"{list(by_name)[:4]}...): recorded on another model; calibrate this model")
        if (layer.experts, layer.top_k) != (spec.router.num_experts, spec.router.top_k):
            raise PruningError(f"{config.stats_source}: layer {spec.source}: statistics for {layer.experts} experts "
                               f"top-{layer.top_k}, the model's layer has {spec.router.num_experts} experts top-"
                               f"{spec.router.top_k}: recorded on another model; calibrate this model")


def _with_certificates(ctx: PassContext, node, spec: MoELayerSpec, lp: LayerPlan, group: tuple[int, int]):
    """lp plus the experts moecc.expert_certificates proves unreachable -> (plan, note).

    The proof bounds the router input by the RMSNorm feeding the layer in this graph;
    without one there is no certificate. Certified experts whose witnesses the plan
    removed would become reachable: such a union is refused."""
    from moecc.expert_certificates import RouterFacts, certify, graph_input_bound

    bound = graph_input_bound(node.args[0], ctx.value)
    if bound is None:
        return lp, "no certificate: the layer's input is not an RMSNorm output moecc can bound"
    args = dict(zip(MOE_WEIGHT_FIELDS, node.args[1:-1]))
    r = spec.router
    facts = RouterFacts(ctx.value(args["router_weight"]), ctx.value(args["router_bias"]),
                        ctx.value(args["correction_bias"]), r.top_k, r.scoring, r.select_on_logits, r.n_group)
    certs = certify(facts, bound) if not r.masked_experts and r.scoring != "sparsemixer" else []
    if not certs:
        return lp, f"no expert provably unreachable (router input norm <= {bound:.3g})"
    planned = set(lp.removed)
    for c in certs:
        if set(c.witnesses) & planned and c.kind == "dominated" and len(set(c.witnesses) - planned) < r.top_k:
            raise PruningError(f"{spec.source}: expert {c.expert} is unreachable only while experts "
                               f"{sorted(set(c.witnesses) & planned)} stay, and the plan removes them; raise 'keep'")
    removed = tuple(sorted(planned | {c.expert for c in certs}))
    n_group, floor = group
    size = r.num_experts // n_group
    if r.num_experts - len(removed) < r.top_k or any(
            sum(1 for e in range(g * size, (g + 1) * size) if e not in removed) < floor for g in range(n_group)):
        raise PruningError(f"{spec.source}: the plan and the certified experts together leave fewer experts than "
                           "routing needs; raise 'keep'")
    said = "; ".join(f"expert {c.expert} {c.kind}" + (f" by {list(c.witnesses)}" if c.witnesses else "")
                     + f" ({c.detail})" for c in certs)
    return LayerPlan(lp.name, lp.experts, removed, lp.protected, lp.note), f"certified unreachable: {said}"


def _transformers_model_types(gm) -> set[str]:
    """model_type of every transformers module the graph was traced through (Dynamo's
    nn_module_stack: transformers.models.<model_type>.modeling_<model_type>)."""
    types = set()
    for node in gm.graph.nodes:
        for entry in (node.meta.get("nn_module_stack") or {}).values():
            cls = entry[1] if isinstance(entry, tuple) and len(entry) > 1 else None
            parts = str(getattr(cls, "__module__", "")).split(".")
            if len(parts) > 3 and parts[:2] == ["transformers", "models"]:
                types.add(parts[2])
    return types


def _rewrite(ctx: PassContext, node, spec: MoELayerSpec, kept: tuple[int, ...], removed: tuple[int, ...],
             exact: bool) -> int:
    """Point the node at pruned copies of its stacks (and router); returns bytes saved."""
    e = spec.router.num_experts
    stack_rows = list(kept) + list(range(e, e + spec.experts.num_shared if spec.experts.shared_fused else e))
    arg_nodes = dict(zip(MOE_WEIGHT_FIELDS, node.args[1:-1]))
    sources = tuple(n.name if n is not None else None for n in arg_nodes.values())
    new_args = dict(arg_nodes)
    saved = 0
    fields = STACK_FIELDS + (ROUTER_FIELDS if exact else ())
    with ctx.gm.graph.inserting_before(node):
        for field_name in fields:
            source = arg_nodes[field_name]
            if source is None:
                continue
            full = ctx.value(source)
            rows = list(kept) if field_name in ROUTER_FIELDS else stack_rows
            dim = full.dim() - 1 if field_name == "correction_bias" else 0  # [E] or [1, E]

            def make(t=full, r=rows, d=dim):
                return t.index_select(d, _index(r, t.device)).contiguous()

            new_args[field_name] = ctx.weights.get_attr(("pruned", field_name, tuple(rows), sources), make, field_name)
            if field_name in STACK_FIELDS:
                saved += full.numel() * full.element_size() * len(removed) // full.shape[0]
    pruned = spec.replace(router={"num_experts": len(kept)} if exact else {"masked_experts": tuple(removed)})
    node.args = (node.args[0], *[new_args[f] for f in MOE_WEIGHT_FIELDS], pruned.to_json())
    for old in set(arg_nodes[f] for f in fields if arg_nodes[f] is not None):
        _free_if_unused(ctx, old)
    return saved


def _index(rows, device):
    import torch

    return torch.tensor(rows, dtype=torch.long, device=device)


def _free_if_unused(ctx: PassContext, node) -> None:
    """Drop a derived tensor (a moecc get_attr) that no node reads any more."""
    if node.op != "get_attr" or node.users or not str(node.target).startswith("_moecc_"):
        return
    ctx.gm.graph.erase_node(node)
    if not any(n.op == "get_attr" and n.target == node.target for n in ctx.gm.graph.nodes):
        # The store keeps its record (its names count records, so none is reused); no later
        # pass asks for an expert_fusion stack again.
        delattr(ctx.gm, str(node.target))
