"""expert_fusion, Before/Expected: layouts become canonical, shared experts fold in."""

from __future__ import annotations

import torch
from graph_builders import context, layer_graph, structure

from moecc.backends.reference import moe_layer
from moecc.passes import expert_fusion
from moecc.spec import ExpertSpec, MoELayerSpec, RouterSpec
from moecc.weights import MOE_WEIGHT_FIELDS, make_weights

E, K, N = 4, 16, 8


def _gpt_oss_layer():
    spec = MoELayerSpec(RouterSpec(E, 2, "topk_softmax", has_router_bias=True),
                        ExpertSpec(K, N, "swiglu_oai", gate_up_layout="interleaved", gate_up_transposed=True,
                                   down_transposed=True, has_bias=True))
    w = make_weights(router_weight=torch.randn(E, K), router_bias=torch.randn(E),
                     gate_up=torch.randn(E, K, 2 * N), down=torch.randn(E, N, K),
                     gate_up_bias=torch.randn(E, 2 * N), down_bias=torch.randn(E, K))
    return w, spec


def _deepseek_layer():
    spec = MoELayerSpec(RouterSpec(E, 2, "sigmoid", n_group=2, topk_group=1, has_correction_bias=True,
                                   renormalize=True, routed_scaling_factor=2.5),
                        ExpertSpec(K, N, num_shared=2))
    w = make_weights(router_weight=torch.randn(E, K), correction_bias=torch.randn(E) * 0.1,
                     gate_up=torch.randn(E, 2 * N, K), down=torch.randn(E, K, N),
                     shared_gate=torch.randn(2 * N, K), shared_up=torch.randn(2 * N, K),
                     shared_down=torch.randn(K, 2 * N))
    return w, spec


def _run(weights, spec, **options):
    gm, values = layer_graph(weights, spec)
    with torch.no_grad():
        before = gm(*values)
    result = expert_fusion.run(context(gm, values, **options))
    gm.recompile()
    with torch.no_grad():
        after = gm(*values)
    node = next(n for n in gm.graph.nodes if n.op == "call_function")
    return gm, node, result, before, after


def test_interleaved_transposed_layout_becomes_canonical():
    w, spec = _gpt_oss_layer()
    gm, node, result, before, after = _run(w, spec)
    args = dict(zip(MOE_WEIGHT_FIELDS, node.args[1:-1]))
    # Expected: router tensors untouched, expert tensors read from derived attributes.
    assert args["router_weight"].op == "placeholder" and args["router_bias"].op == "placeholder"
    for f in ("gate_up", "down", "gate_up_bias", "down_bias"):
        assert args[f].op == "get_attr", f
    assert tuple(getattr(gm, args["gate_up"].target).shape) == (E, 2 * N, K)
    assert tuple(getattr(gm, args["down"].target).shape) == (E, K, N)
    new_spec = MoELayerSpec.from_json(node.args[-1])
    assert new_spec.experts.canonical and new_spec.router == spec.router
    assert result.counters == {"layers": 1, "relayouts": 1, "shared_folded": 0, "aliased": 0,
                               "derived_kib": result.counters["derived_kib"]}
    torch.testing.assert_close(after, before)


def test_shared_experts_fold_into_the_stack():
    w, spec = _deepseek_layer()
    gm, node, result, before, after = _run(w, spec)
    args = dict(zip(MOE_WEIGHT_FIELDS, node.args[1:-1]))
    assert args["shared_gate"] is None and args["shared_up"] is None and args["shared_down"] is None
    assert tuple(getattr(gm, args["gate_up"].target).shape) == (E + 2, 2 * N, K)
    new_spec = MoELayerSpec.from_json(node.args[-1])
    assert new_spec.experts.shared_fused and new_spec.experts.num_shared == 2
    assert result.counters["shared_folded"] == 2
    torch.testing.assert_close(after, before)


def test_canonical_layer_is_left_unchanged():
    spec = MoELayerSpec(RouterSpec(E, 2, renormalize=True), ExpertSpec(K, N))
    w = make_weights(router_weight=torch.randn(E, K), gate_up=torch.randn(E, 2 * N, K), down=torch.randn(E, K, N))
    gm, values = layer_graph(w, spec)
    before = structure(gm)
    result = expert_fusion.run(context(gm, values))
    assert structure(gm) == before  # Expected == Before: no copies for canonical weights
    assert result.counters["relayouts"] == 0 and result.counters["layers"] == 1


def test_same_sources_share_one_derived_copy():
    """Two layers reading the same parameters (tied weights) derive the tensor once."""
    w, spec = _gpt_oss_layer()
    gm, values = layer_graph(w, spec)
    node = next(n for n in gm.graph.nodes if n.op == "call_function")
    with gm.graph.inserting_after(node):
        twin = gm.graph.call_function(node.target, (node, *node.args[1:]))
    out = next(n for n in gm.graph.nodes if n.op == "output")
    out.args = (twin,)
    ctx = context(gm, values)
    expert_fusion.run(ctx)
    assert ctx.weights.derived_tensors == 4  # gate_up, down and two biases, once


def test_reference_matches_on_fused_and_unfused_weights():
    w, spec = _deepseek_layer()
    x = torch.randn(7, K)
    gm, node, *_ = _run(w, spec)
    args = dict(zip(MOE_WEIGHT_FIELDS, node.args[1:-1]))
    fused = make_weights(**{f: (getattr(gm, n.target) if n is not None and n.op == "get_attr"
                                else getattr(w, f) if n is not None else None) for f, n in args.items()})
    torch.testing.assert_close(moe_layer(x, fused, MoELayerSpec.from_json(node.args[-1])), moe_layer(x, w, spec))


def test_release_original_weights_shares_storage_and_keeps_values():
    w, spec = _deepseek_layer()
    gate_up_before = w.gate_up.clone()
    gm, values = layer_graph(w, spec)
    ctx = context(gm, values, release_original_weights=True)
    result = expert_fusion.run(ctx)
    assert result.counters["aliased"] == 2
    derived = next(getattr(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr" and "gate_up" in n.target)
    original = values[3]  # hidden, router_weight, correction_bias, gate_up, ...
    assert original.data_ptr() == derived.data_ptr()
    torch.testing.assert_close(original, gate_up_before)
    # What remains beside the originals is exactly the two shared experts' new rows.
    shared_bytes = 2 * (2 * N * K + K * N) * 4
    assert ctx.weights.derived_bytes - ctx.weights.aliased_bytes == shared_bytes
