"""Hand-built Before graphs for pass tests: one moecc layer node over placeholders."""

from __future__ import annotations

import torch
import torch.fx as fx

import moecc.ops  # noqa: F401  defines the ops
from moecc.capture import real_input_values
from moecc.options import CompileOptions
from moecc.passes.context import PassContext
from moecc.spec import MoELayerSpec
from moecc.weight_store import WeightStore
from moecc.weights import MOE_WEIGHT_FIELDS, MoEWeights


def layer_graph(weights: MoEWeights, spec: MoELayerSpec, tokens: int = 5):
    """Before: hidden [T, K] and each present weight as placeholders -> moe_layer -> output."""
    g = fx.Graph()
    hidden = g.placeholder("hidden")
    args, values = [], [torch.randn(tokens, spec.experts.hidden_size)]
    for name in MOE_WEIGHT_FIELDS:
        t = getattr(weights, name)
        if t is None:
            args.append(None)
        else:
            args.append(g.placeholder(name))
            values.append(t)
    node = g.call_function(torch.ops.moecc.moe_layer.default, (hidden, *args, spec.to_json()))
    g.output(node)
    gm = fx.GraphModule(torch.nn.Module(), g)
    return gm, values


def context(gm, values, **options) -> PassContext:
    return PassContext(gm=gm, options=CompileOptions(**options), real_values=real_input_values(gm, values),
                       weights=WeightStore(gm))


def structure(gm) -> list[tuple]:
    """(op, target) per node: what Before/Expected tests compare."""
    out = []
    for n in gm.graph.nodes:
        target = n.target if n.op in ("placeholder", "get_attr", "output") else getattr(n.target, "__name__", str(n.target))
        if n.op == "get_attr":
            target = "derived"
        out.append((n.op, target))
    return out


def lowered_layer(precision, k: int = 64, n: int = 32, **options):
    """A random E=8 top-2 layer graph after passes/precision_lowering.py with `precision`
    (and other compile options): (ctx, pass result, the moe node, spec, weights, placeholder values)."""
    import layer_factory
    from moecc.passes import precision_lowering
    from moecc.spec import RouterSpec

    torch.manual_seed(0)
    spec, weights = layer_factory.make_layer(RouterSpec(8, 2), k=k, n=n)
    gm, values = layer_graph(weights, spec)
    ctx = context(gm, values, precision=precision, **options)
    result = precision_lowering.run(ctx)
    gm.graph.lint()
    gm.recompile()
    return ctx, result, ctx.moe_nodes()[0], spec, weights, values
