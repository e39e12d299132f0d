"""Capture: find the MoE layers in a Dynamo graph and replace each with one moecc op.

    report = capture_moe_layers(gm, example_inputs, options)

For every region (moecc.capture.regions) the layer is recognised (recognise.py),
verified numerically against the original nodes (verify.py), and only then rewritten:
the region's nodes are replaced by

    flat = reshape(hidden, (-1, K)); y = moecc.moe_layer(flat, *weights, spec); view_as(y, hidden)

A region that fails any step is left exactly as it was; the reason goes to the report,
to the `moecc.capture` logger and, as one warning per graph, to the user.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Sequence

import torch
import torch.fx as fx

from moecc.capture.graph_utils import example_value, scalar_inputs
from moecc.capture.recognise import Decline, recognise
from moecc.capture.regions import (
    find_eager_experts_modules,
    find_moe_regions,
    find_unrouted_expert_modules,
    without_trailing_submodule,
)
from moecc.capture.report import CapturedLayer, GraphReport, SkippedRegion
from moecc.capture.verify import CannotVerify, verify
from moecc.options import CompileOptions
from moecc.weights import MOE_WEIGHT_FIELDS

log = logging.getLogger("moecc.capture")

EAGER_EXPERTS_HINT = (
    "transformers' 'eager' experts implementation graph-breaks at `nonzero`, so its expert "
    "matmuls never reach the compiled graph and moecc cannot capture them. Switch the model "
    "to a graph-friendly implementation before compiling: "
    "model.set_experts_implementation('grouped_mm') (or moecc.use_compilable_experts(model))."
)


def real_input_values(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> dict[fx.Node, Any]:
    """Placeholder and get_attr nodes -> the real values the backend received."""
    values: dict[fx.Node, Any] = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, example_inputs):
        values[node] = value
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            obj = gm
            for part in str(node.target).split("."):
                obj = getattr(obj, part)
            values[node] = obj
    return values


def capture_moe_layers(gm: fx.GraphModule, example_inputs: Sequence[Any], options: CompileOptions) -> GraphReport:
    report = GraphReport()
    eager = find_eager_experts_modules(gm.graph)
    if eager:
        report.eager_experts_detected = True
        for path in eager:
            report.skipped.append(SkippedRegion(path, "Experts", EAGER_EXPERTS_HINT))
    values = real_input_values(gm, example_inputs)
    scalars = scalar_inputs(values)
    regions = find_moe_regions(gm.graph)
    if not eager:
        for path, cls, reason in find_unrouted_expert_modules(gm.graph, regions):
            report.skipped.append(SkippedRegion(path, cls, reason))
    for region in regions:
        try:
            rec = recognise(region, scalars)
        except Decline as exc:
            # A block that post-processes its result in a child module (a norm): capture
            # the MoE before it and leave the tail in the graph.
            trimmed = without_trailing_submodule(region)
            try:
                if trimmed is None:
                    raise exc
                rec = recognise(trimmed, scalars)
                region = trimmed
            except Decline:
                report.skipped.append(SkippedRegion(region.path, region.module_class, str(exc)))
                continue
        spec, mismatch, verified = rec.candidates[0], None, False
        if options.verify_capture:
            try:
                spec, mismatch = verify(gm, region, rec, values)
                verified = spec is not None
            except CannotVerify as exc:
                report.skipped.append(SkippedRegion(region.path, region.module_class,
                                                    f"cannot verify the capture ({exc}); pass "
                                                    "options={'verify_capture': False} to trust the pattern"))
                continue
            if spec is None:
                report.skipped.append(SkippedRegion(
                    region.path, region.module_class,
                    f"recognised as {rec.candidates[0].describe()}, but it does not reproduce the "
                    f"original layer ({mismatch:.0%} of tokens differ); an unsupported variant?"))
                continue
        _rewrite(gm, region, rec, spec)
        report.captured.append(CapturedLayer(
            module_path=region.path, module_class=region.module_class, spec=spec,
            weights={role: node.name for role, node in rec.weights.items()}, verified=verified,
            max_token_error=mismatch, experts_implementation=rec.experts_implementation,
        ))
    gm.graph.lint()
    gm.recompile()
    for s in report.skipped:
        log.warning("moecc left %s (%s) alone: %s", s.module_path, s.module_class, s.reason)
    if report.skipped:
        warnings.warn(
            f"moecc left {len(report.skipped)} MoE region(s) uncaptured; first: "
            f"{report.skipped[0].module_path}: {report.skipped[0].reason}",
            stacklevel=2,
        )
    for c in report.captured:
        log.info("moecc captured %s: %s", c.module_path, c.spec.describe())
    return report


def _rewrite(gm: fx.GraphModule, region, rec, spec) -> None:
    graph = gm.graph
    k = spec.experts.hidden_size
    out_ev = example_value(rec.output)
    from moecc.ops import op_for_backend

    with graph.inserting_before(rec.output):
        for scalar, value in rec.baked.items():
            # A module attribute Dynamo passed as an input (dynamic=True) is now a constant
            # of the layer spec; Dynamo does not guard on it, so check it on every call
            # (a CPU scalar: no device synchronisation).
            same = graph.call_function(torch.eq, (scalar, value))
            graph.call_function(torch._assert_async, (same, (
                f"moecc compiled {region.path} with {scalar.name}={value!r}; the attribute changed "
                "since: call torch._dynamo.reset() and compile again")))
        flat = graph.call_function(torch.reshape, (rec.hidden, (-1, k)))
        args = [rec.weights.get(f) for f in MOE_WEIGHT_FIELDS]
        layer = graph.call_function(op_for_backend("reference"), (flat, *args, spec.to_json()))
        layer.meta["moecc_spec"] = spec
        layer.meta["moecc_module_path"] = region.path
        result = layer if out_ev.dim() == 2 else graph.call_method("view_as", (layer, rec.hidden))
    rec.output.replace_all_uses_with(result)
    for n in reversed(region.nodes):
        if n not in rec.keep and not n.users:
            graph.erase_node(n)
    alive = set(graph.nodes)
    leftover = [n for n in region.nodes if n in alive and n not in rec.keep]
    if leftover:
        raise RuntimeError(f"capture of {region.path} left nodes behind: {[n.name for n in leftover]}")
