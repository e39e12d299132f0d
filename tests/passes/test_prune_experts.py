"""The prune_experts pass on hand-built one-layer graphs: which routers get their rows
deleted and which keep them with masked experts, the shrunken stacks, the numerics
(the pruned graph computes the reference op with the removed experts masked on the full
weights), group floors, the no-op case, and statistics that do not fit."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch
from graph_builders import context, layer_graph, structure

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "backends"))
import layer_factory  # noqa: E402

from moecc.backends import reference  # noqa: E402
from moecc.passes import lower_kernels, prune_experts  # noqa: E402
from moecc.pruning import PruningError  # noqa: E402
from moecc.routing_stats import LayerStats, ModelFingerprint, RoutingStats  # noqa: E402
from moecc.spec import MoELayerSpec, RouterSpec, kernel_unsupported  # noqa: E402
from moecc.weights import MOE_WEIGHT_FIELDS  # noqa: E402

LAYER = "model.layers.0.mlp"


def _stats(experts: int, top_k: int, name: str = LAYER, seed: int = 0) -> RoutingStats:
    """Statistics of one layer: distinct counts and REAP scores (no ties)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = 100 * experts
    share = torch.randperm(experts, generator=gen).double() + 1  # [E] distinct
    counts = (share / share.sum() * tokens * top_k).floor().long()
    counts[0] += tokens * top_k - int(counts.sum())
    reap = (torch.randperm(experts, generator=gen).double() + 1).tolist()
    layer = LayerStats(name, 0, experts, top_k, tokens, counts.tolist(), None, reap, [1.0] * experts, None)
    return RoutingStats(ModelFingerprint("test", 1, [name], [experts], [top_k]), [layer])


def _graph(router: RouterSpec, num_shared=0, bias=False):
    torch.manual_seed(0)
    spec, weights = layer_factory.make_layer(router, num_shared=num_shared, bias=bias)
    spec = MoELayerSpec(spec.router, spec.experts, source=LAYER)
    gm, values = layer_graph(weights, spec, tokens=40)
    return spec, weights, gm, values


def _prune(gm, values, stats, keep=0.75, criterion="frequency", **extra):
    ctx = context(gm, values, prune_experts={"stats": stats, "keep": keep, "criterion": criterion, **extra})
    result = prune_experts.run(ctx)
    gm.graph.lint()
    gm.recompile()
    return ctx, result


def _masked_reference(x, weights, spec, removed):
    """The definition, on the full weights: route with the removed experts masked (router
    ids, no stack renumbering), then the reference expert sum over the full stack."""
    from moecc.backends.reference.experts import canonical_expert_weights
    from moecc.backends.reference.moe_layer import combine_experts
    from moecc.backends.reference.routing import route, router_logits

    masked = dataclasses.replace(spec.router, masked_experts=removed)
    logits = router_logits(x, weights.router_weight, weights.router_bias, spec.router)  # [T, E]
    w, ids = route(logits, masked, weights.correction_bias)  # [T, k] x2, router ids
    assert not set(ids.unique().tolist()) & set(removed)
    return combine_experts(x, w, ids, canonical_expert_weights(weights, spec.experts), spec)


def _lowest(stats, n):
    counts = stats.layers[0].counts
    return tuple(sorted(sorted(range(len(counts)), key=lambda e: counts[e])[:n]))


ROW_DELETING = {
    "softmax+renorm": RouterSpec(8, 2, "softmax", renormalize=True),
    "topk_softmax": RouterSpec(8, 2, "topk_softmax", has_router_bias=True),
    "sigmoid+bias": RouterSpec(8, 2, "sigmoid", has_correction_bias=True, renormalize=True,
                               routed_scaling_factor=2.5),
}
MASKING = {
    "softmax": RouterSpec(8, 2, "softmax"),
    "softmax+renorm eps": RouterSpec(8, 2, "softmax", renormalize=True, renormalize_eps=1e-6),
    "grouped sigmoid": RouterSpec(16, 2, "sigmoid", n_group=4, topk_group=2, has_correction_bias=True,
                                  renormalize=True, routed_scaling_factor=2.5),
}


@pytest.mark.parametrize("kind", list(ROW_DELETING) + list(MASKING))
def test_pruned_layer_equals_reference_with_experts_masked(kind):
    router = {**ROW_DELETING, **MASKING}[kind]
    spec, weights, gm, values = _graph(router, num_shared=1, bias=True)
    stats = _stats(router.num_experts, router.top_k)
    e = router.num_experts
    removed = _lowest(stats, e // 4)
    ctx, result = _prune(gm, values, stats)
    node = ctx.moe_nodes()[0]
    pruned = MoELayerSpec.from_json(node.args[-1])
    args = dict(zip(MOE_WEIGHT_FIELDS, node.args[1:-1]))
    tensors = {f: ctx.value(n) for f, n in args.items()}
    kept_rows = 3 * e // 4 + 1  # + the shared expert
    assert tensors["gate_up"].shape[0] == tensors["down"].shape[0] == tensors["gate_up_bias"].shape[0] == kept_rows
    assert result.counters["experts_removed"] == len(removed) and result.counters["layers"] == 1
    assert result.counters["saved_kib"] > 0
    if kind in ROW_DELETING:
        assert pruned.router.num_experts == 3 * e // 4 and not pruned.router.masked_experts
        assert tensors["router_weight"].shape[0] == 3 * e // 4 and result.counters["rows_deleted"] == 1
        assert not kernel_unsupported(pruned)
    else:
        assert pruned.router.num_experts == e and pruned.router.masked_experts == removed
        assert tensors["router_weight"].shape[0] == e and result.counters["masked"] == 1
        assert "masked (pruned) experts" in kernel_unsupported(pruned, "triton")
        assert "masked (pruned) experts" not in kernel_unsupported(pruned, "tvm")
    # The definition: the reference op on the full weights, the removed experts masked.
    x = values[0]
    want = _masked_reference(x, weights, spec, removed)
    unpruned = reference.moe_layer(x, weights, spec)
    got = gm(*values)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, unpruned, atol=1e-3)  # some token lost an expert: pruning did something


@pytest.mark.parametrize("kind", list(MASKING) + ["softmax+renorm"])
def test_masked_and_row_deleted_layers_run_on_the_tvm_op(kind):
    """The TVM op routes masked layers (router ids -> rows of the smaller stack) and
    computes what the reference definition computes on the full weights."""
    pytest.importorskip("tvm")
    router = {**ROW_DELETING, **MASKING}[kind]
    spec, weights, gm, values = _graph(router, num_shared=1, bias=False)
    stats = _stats(router.num_experts, router.top_k)
    removed = _lowest(stats, router.num_experts // 4)
    ctx, _ = _prune(gm, values, stats)
    pruned = MoELayerSpec.from_json(ctx.moe_nodes()[0].args[-1])
    assert bool(pruned.router.masked_experts) == (kind in MASKING)
    result = lower_kernels.run(context(gm, values, kernel_backend="tvm"))
    gm.recompile()
    assert result.counters["tvm"] == 1, result.notes
    got = gm(*values)
    want = _masked_reference(values[0], weights, spec, removed)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_group_floor_keeps_two_experts_per_group():
    spec, weights, gm, values = _graph(MASKING["grouped sigmoid"])
    ctx, result = _prune(gm, values, _stats(16, 2), keep=0.25)  # asks for 12 of 16 gone
    pruned = MoELayerSpec.from_json(ctx.moe_nodes()[0].args[-1])
    masked = pruned.router.masked_experts
    per_group = [sum(1 for m in masked if m // 4 == g) for g in range(4)]
    assert len(masked) == 8 and max(per_group) == 2  # each group of 4 keeps 2 (top2_sum group scores)
    assert any("groups keeps >= 2" in n for n in result.notes)
    x = values[0]
    torch.testing.assert_close(gm(*values), _masked_reference(x, weights, spec, masked), rtol=1e-5, atol=1e-5)


def test_keep_one_leaves_the_graph_untouched():
    spec, weights, gm, values = _graph(ROW_DELETING["softmax+renorm"])
    before, args_before = structure(gm), ctx_args(gm)
    ctx, result = _prune(gm, values, _stats(8, 2), keep=1.0)
    assert structure(gm) == before and ctx_args(gm) == args_before
    assert result.counters["layers"] == 0 and result.counters["experts_removed"] == 0


def ctx_args(gm):
    return [tuple(a.name if hasattr(a, "name") else a for a in n.args) for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("stats,message", [
    (_stats(8, 2, name="model.layers.5.mlp"), "no statistics for MoE layer 'model.layers.0.mlp'"),
    (_stats(16, 2), "statistics for 16 experts top-2, the model's layer has 8 experts top-2"),
    (_stats(8, 4), "statistics for 8 experts top-4"),
])
def test_statistics_of_another_model_are_refused_and_nothing_changes(stats, message):
    spec, weights, gm, values = _graph(ROW_DELETING["softmax+renorm"])
    before, args_before = structure(gm), ctx_args(gm)
    with pytest.raises(PruningError, match=message.replace("(", r"\(")):
        _prune(gm, values, stats)
    assert structure(gm) == before and ctx_args(gm) == args_before


@pytest.mark.parametrize("kind", ["softmax+renorm", "grouped sigmoid"])
def test_precision_lowering_after_pruning_quantises_the_smaller_stack(kind):
    from moecc.passes import precision_lowering

    router = {**ROW_DELETING, **MASKING}[kind]
    spec, weights, gm, values = _graph(router, num_shared=1)
    stats = _stats(router.num_experts, router.top_k)
    removed = _lowest(stats, router.num_experts // 4)
    ctx = context(gm, values, prune_experts={"stats": stats, "keep": 0.75, "criterion": "frequency"},
                  precision="int8")
    prune_experts.run(ctx)
    assert precision_lowering.run(ctx).counters["int8"] == 1
    gm.graph.lint()
    gm.recompile()
    node = ctx.moe_nodes()[0]
    packed = ctx.value(dict(zip(MOE_WEIGHT_FIELDS, node.args[1:-1]))["gate_up"])
    assert packed.dtype == torch.uint8 and packed.shape[0] == 3 * router.num_experts // 4 + 1
    got, want = gm(*values), _masked_reference(values[0], weights, spec, removed)
    assert torch.isfinite(got).all()
    sqnr = 20 * torch.log10(want.norm() / (got - want).norm())
    assert sqnr > 30  # int8 weights: the lowering's own output bound


@pytest.mark.tvm
@pytest.mark.parametrize("kind", ["softmax+renorm", "sigmoid+bias"])
def test_row_deleted_layers_on_the_tvm_kernels_equal_the_masked_definition(kind):
    router = ROW_DELETING[kind]
    spec, weights, gm, values = _graph(router, num_shared=1)
    stats = _stats(router.num_experts, router.top_k)
    removed = _lowest(stats, router.num_experts // 4)
    _prune(gm, values, stats)
    assert lower_kernels.run(context(gm, values, kernel_backend="tvm")).counters["tvm"] == 1
    gm.recompile()
    got, want = gm(*values), _masked_reference(values[0], weights, spec, removed)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
