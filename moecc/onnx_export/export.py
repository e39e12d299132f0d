"""`export_onnx`: a model whose MoE layers become onnxruntime's fused MoE / QMoE operators.

    report = export_onnx(model, (input_ids,), "model.onnx")               # fp32
    report = export_onnx(model, (input_ids,), "model.onnx", precision="int4")
    print(report.summary())

Flow: capture the MoE blocks as the moecc backend does (layers.py) -> optional precision
lowering of each layer's expert stack (passes/precision_lowering.py's choice, bounds and
fallbacks) -> swap each block for a module calling the moecc op -> torch.onnx.export
(dynamo) with a translation of the moecc op into one call of an ONNX local function per
layer, domain "moecc" -> each function's body is either onnxruntime's MoE / QMoE
(ort_ops.py) or the standard-op decomposition (decompose.py) -> check with onnxruntime
on CPU against eager PyTorch.

The file's layout (what import_onnx relies on): every MoE layer is one node of domain
"moecc" calling a local function whose doc_string is JSON {"spec": <moecc layer spec>,
"fields": [MoEWeights fields, in input order], "gate_up_rows": "interleaved" | "concat"}.
onnxruntime inlines the functions when it loads the model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from moecc.onnx_export.layers import FoundLayer, MoELayerModule, find_moe_layers, set_submodule, swap_moe_layers
from moecc.spec import MoELayerSpec
from moecc.weights import MOE_WEIGHT_FIELDS

DOMAIN = "moecc"
INSTALL_HINT = "ONNX export needs onnx, onnxscript and onnxruntime: pip install 'moecc[onnx]'"
EXTERNAL_DATA_BYTES = 1 << 30  # above this, weights go to <file>.data (protobuf's 2 GiB cap)
ORT_ROUTES = ("com.microsoft.MoE", "com.microsoft.QMoE")
ROUTED_OUTSIDE = " (routing in ONNX ops)"  # suffix: onnxruntime runs the experts, standard ops the router
FALLBACK_ROUTE = "standard ONNX ops"


class OnnxExportError(RuntimeError):
    """The exported model does not reproduce the PyTorch model, or cannot be built."""


@dataclass
class LayerExport:
    """How one MoE layer was exported."""

    path: str  # module path in the model
    spec: MoELayerSpec  # as exported (weight_format says int8 / int4 after precision lowering)
    route: str  # "com.microsoft.MoE", "com.microsoft.QMoE" or "standard ONNX ops"
    why: str = ""  # why not onnxruntime's operator, or the precision note
    function: str = ""  # the ONNX local function it calls


@dataclass
class ExportReport:
    path: str
    layers: list[LayerExport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    max_relative_error: Optional[float] = None  # onnxruntime vs the PyTorch model it claims to be
    reference: str = ""  # which PyTorch model that is (eager original, or the quantised one)
    external_data: bool = False

    def summary(self) -> str:
        lines = [f"wrote {self.path}" + (" (+ external data)" if self.external_data else "")]
        if not self.layers:
            lines.append("  no MoE layer captured: exported as plain ONNX")
        for layer in self.layers:
            lines.append(f"  {layer.path}: {layer.route}  [{layer.spec.describe()}]"
                         + (f"  ({layer.why})" if layer.why else ""))
        lines += [f"  note: {n}" for n in self.notes]
        if self.max_relative_error is not None:
            lines.append(f"  onnxruntime (CPU) vs {self.reference}: max relative error {self.max_relative_error:.2e}")
        return "\n".join(lines)


def require_onnx() -> None:
    """Raise ImportError saying which extra to install when onnx / onnxscript / onnxruntime is missing."""
    import importlib.util

    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"{INSTALL_HINT} (missing: {', '.join(missing)})")


def export_onnx(model: torch.nn.Module, example_inputs: Sequence[Any], path: str, precision=None, *,
                example_kwargs: Optional[dict] = None, verify: bool = True, rtol: float = 1e-4,
                external_data: Optional[bool] = None, onnxruntime_ops: bool = True,
                input_names: Optional[Sequence[str]] = None, output_names: Optional[Sequence[str]] = None,
                dynamic_shapes=None) -> ExportReport:
    """Export `model` to ONNX at `path`, its MoE layers as onnxruntime MoE / QMoE where possible.

    example_inputs: positional inputs of one forward (e.g. (input_ids,)); tensors, or tuples
        of tensors (a KV cache); every dimension is exported as dynamic where the model allows.
    precision: None (weights as they are), "int8", "int4" or a moecc.precision config: the
        routed experts are lowered as torch.compile(options={"precision": ...}) would, and
        exported as QMoE with the packed weights unchanged.
    verify: run the file with onnxruntime (CPU) on the example inputs and raise
        OnnxExportError when an output differs from eager PyTorch by more than `rtol`
        (relative to the output's max magnitude). With precision, the reference is the
        quantised PyTorch model (the moecc reference op on the same packed weights).
    external_data: store weights in <path>.data (default: when they exceed 1 GiB).
    onnxruntime_ops: False writes every MoE layer in standard ONNX ops (for runtimes without
        onnxruntime's com.microsoft operators); the check still uses onnxruntime.
    input_names, output_names: names of the file's inputs (positional order) and outputs
        (default: torch.onnx.export's).
    dynamic_shapes: torch.export's, for example_inputs (default: every dimension Dim.AUTO).
    """
    require_onnx()
    report = ExportReport(path=path)
    example_inputs = tuple(example_inputs)
    layers, notes = find_moe_layers(model, example_inputs, example_kwargs)
    report.notes += notes
    swapped, layers, notes = swap_moe_layers(model, layers, example_inputs, example_kwargs)
    report.notes += notes
    if precision is not None:  # after the swap check, which compares float layers with the model
        layers = _lower_precision(layers, precision, report)
        for layer in layers:
            extra = swapped.get_submodule(layer.path).extra_outputs
            set_submodule(swapped, layer.path, MoELayerModule(layer.spec, layer.weights, extra_outputs=extra))
    if not layers:
        report.notes.append("the model has no MoE layer moecc captures; exported as plain ONNX")
    plan = _plan(layers, report, onnxruntime_ops)
    try:
        proto = _torch_export(swapped, example_inputs, example_kwargs, plan, input_names, output_names,
                              dynamic_shapes)
    except Exception as exc:  # say which MoE blocks stayed as the model wrote them: the usual cause
        if not report.notes:
            raise
        raise OnnxExportError("torch.onnx.export failed; MoE blocks left as the model wrote them may not "
                              "export (transformers' grouped_mm experts do not): " + "; ".join(report.notes)) from exc
    _add_layer_functions(proto, plan)
    report.external_data = _save(proto, path, external_data)
    if verify:
        reference = swapped if precision is not None else model
        report.reference = "eager PyTorch (quantised weights)" if precision is not None else "eager PyTorch"
        report.max_relative_error = _verify(path, reference, example_inputs, example_kwargs, rtol, report)
    return report


# -- precision -------------------------------------------------------------------------

def _lower_precision(layers: list[FoundLayer], precision, report: ExportReport) -> list[FoundLayer]:
    """Each layer's routed stack packed as precision lowering would (same choice and bounds)."""
    from moecc.passes.precision_lowering import _choose
    from moecc.precision import parse_precision

    config = parse_precision(precision)
    lowered = []
    for index, layer in enumerate(layers):
        chosen, why = _choose(layer.spec, layer.weights, config, seed=index)
        if chosen is None:
            report.notes.append(f"{layer.path}: kept {layer.weights.gate_up.dtype} weights ({why})")
            lowered.append(layer)
            continue
        cfg, packed, (weight_sqnr, out_sqnr) = chosen
        spec = layer.spec.replace(experts={"weight_format": cfg.weight_format, "group_size": cfg.group_size or 0})
        fmt = f"{cfg.weight_format} {'g' + str(cfg.group_size) if cfg.group_size else 'per-row'}"
        report.notes.append(f"{layer.path}: {fmt}"
                            f" (worst expert weight SQNR {weight_sqnr:.1f} dB, layer output {out_sqnr:.1f} dB)"
                            + (f"; {why}" if why else ""))
        lowered.append(FoundLayer(layer.path, layer.module_class, spec, layer.weights._replace(**packed)))
    return lowered


# -- the plan: which layer goes which way ----------------------------------------------

@dataclass
class _Function:
    name: str
    spec: MoELayerSpec
    fields: tuple[str, ...]
    route: str


def _plan_key(spec_json: str) -> str:
    """Layers that differ only in `source` (their module path) share a function."""
    import dataclasses

    return dataclasses.replace(MoELayerSpec.from_json(spec_json), source="").to_json()


def _plan(layers: list[FoundLayer], report: ExportReport, onnxruntime_ops: bool = True) -> dict[str, _Function]:
    """spec JSON -> the local function for it (layers with equal specs and fields share one)."""
    from moecc.onnx_export.ort_ops import ort_experts_unsupported, ort_routing_unsupported

    plan: dict[str, _Function] = {}
    for layer in layers:
        key = _plan_key(layer.spec.to_json())
        fields = tuple(f for f in MOE_WEIGHT_FIELDS if getattr(layer.weights, f) is not None)
        routing_why, experts_why = ort_routing_unsupported(layer.spec), ort_experts_unsupported(layer.spec)
        if not onnxruntime_ops:
            experts_why = ["onnxruntime_ops=False"]
        if key not in plan:
            route = FALLBACK_ROUTE if experts_why else ORT_ROUTES[layer.spec.experts.weight_format != "dense"]
            if route != FALLBACK_ROUTE and routing_why:
                route += ROUTED_OUTSIDE
            plan[key] = _Function(f"moe_layer_{len(plan)}", layer.spec, fields, route)
        fn = plan[key]
        why = experts_why or routing_why
        report.layers.append(LayerExport(layer.path, layer.spec, fn.route, (
            "asked for standard ops" if not onnxruntime_ops else
            "onnxruntime's MoE lacks: " + ", ".join(why) if why else ""), fn.name))
    return plan


# -- torch.onnx.export with the moecc op translated ------------------------------------

def _torch_export(model, example_inputs, example_kwargs, plan: dict[str, _Function], input_names=None,
                  output_names=None, dynamic_shapes=None):
    """The onnx.ModelProto of `model`, each moecc op a call of its layer's function."""
    import onnxscript

    import moecc.ops
    from moecc.weights import MOE_WEIGHT_FIELDS as _F

    opset = onnxscript.values.Opset(DOMAIN, 1)
    if _F != ("router_weight", "router_bias", "correction_bias", "gate_up", "up", "down", "gate_up_bias",
              "down_bias", "shared_gate", "shared_up", "shared_down", "shared_expert_gate", "gate_up_scale",
              "down_scale"):  # the exporter binds the op's arguments to these parameter names
        raise RuntimeError("moecc.weights.MOE_WEIGHT_FIELDS changed: update moe_layer's signature in "
                           "moecc/onnx_export/export.py")

    def moe_layer(hidden, router_weight, router_bias=None, correction_bias=None, gate_up=None, up=None, down=None,
                  gate_up_bias=None, down_bias=None, shared_gate=None, shared_up=None, shared_down=None,
                  shared_expert_gate=None, gate_up_scale=None, down_scale=None, spec: str = ""):
        fn = plan[_plan_key(spec)]
        given = dict(router_weight=router_weight, router_bias=router_bias, correction_bias=correction_bias,
                     gate_up=gate_up, up=up, down=down, gate_up_bias=gate_up_bias, down_bias=down_bias,
                     shared_gate=shared_gate, shared_up=shared_up, shared_down=shared_down,
                     shared_expert_gate=shared_expert_gate, gate_up_scale=gate_up_scale, down_scale=down_scale)
        op = onnxscript.values.Op(opset, fn.name, _op_schema(fn))
        return op(hidden, *[given[f] for f in fn.fields])

    def dynamic(x):  # every dimension of every tensor, nested tuples / lists followed
        if isinstance(x, torch.Tensor):
            return {i: torch.export.Dim.AUTO for i in range(x.dim())}
        return type(x)(dynamic(v) for v in x) if isinstance(x, (tuple, list)) else None

    dims = dynamic(tuple(example_inputs)) if dynamic_shapes is None else dynamic_shapes
    program = torch.onnx.export(
        model, example_inputs, kwargs=example_kwargs, dynamo=True, dynamic_shapes=dims, verbose=False,
        input_names=input_names, output_names=output_names,
        custom_translation_table={moecc.ops.op_for_backend("reference"): moe_layer}, optimize=True)
    return program.model_proto


def _op_schema(fn: _Function):
    """An ONNX OpSchema for a layer function's call node (onnxscript's tracer needs one)."""
    from onnx.defs import OpSchema

    any_tensor = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(uint8)", "tensor(double)"]
    params = [OpSchema.FormalParameter(name, f"T{i}") for i, name in enumerate(("hidden", *fn.fields))]
    constraints = [(f"T{i}", any_tensor, "") for i in range(len(params))]
    return OpSchema(fn.name, DOMAIN, 1, inputs=params, outputs=[OpSchema.FormalParameter("out", "T0")],
                    type_constraints=constraints)


def _add_layer_functions(proto, plan: dict[str, _Function]) -> None:
    """Define each layer function in the model; re-lay ORT layers' gate_up rows interleaved."""
    from onnx import helper

    from moecc.onnx_export.ort_ops import ort_function_nodes

    used = {fn.name: fn for fn in plan.values()}
    opsets = {o.domain: o.version for o in proto.opset_import}
    for fn in used.values():
        if fn.route == FALLBACK_ROUTE:
            body, body_opsets, extra = _fallback_body(fn)
            proto.functions.extend(extra)
        elif fn.route.endswith(ROUTED_OUTSIDE):
            body, body_opsets, extra = _routed_outside_body(fn)
            proto.functions.extend(extra)
        else:
            body, body_opsets, extra = ort_function_nodes(fn.spec, fn.fields), {"": opsets.get("", 18),
                                                                                "com.microsoft": 1}, []
        doc = json.dumps({"spec": json.loads(fn.spec.to_json()), "fields": list(fn.fields),
                          "gate_up_rows": "concat" if fn.route == FALLBACK_ROUTE else "interleaved"})
        proto.functions.append(helper.make_function(
            DOMAIN, fn.name, ["hidden", *fn.fields], ["out"], body,
            [helper.make_opsetid(d, v) for d, v in body_opsets.items()], doc_string=doc))
        for d, v in body_opsets.items():
            if d not in opsets:
                proto.opset_import.append(helper.make_opsetid(d, v))
                opsets[d] = v
    if DOMAIN not in opsets and used:
        proto.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    _interleave_ort_inputs(proto, used)


def _interleave_ort_inputs(proto, functions: dict[str, _Function]) -> None:
    """onnxruntime's CPU MoE takes gate/up rows interleaved (swiglu_fusion=1): rewrite those
    initializers (a row permutation; packed bytes and scales move with their rows) and give
    per-row scales QMoE's 2-D shape [E, R]."""
    from onnx import numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    uses: dict[str, int] = {}
    for node in proto.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    for node in proto.graph.node:
        fn = functions.get(node.op_type) if node.domain == DOMAIN else None
        if fn is None or fn.route == FALLBACK_ROUTE:
            continue
        positions = {f: i for i, f in enumerate(("hidden", *fn.fields))}
        for f in ("gate_up", "gate_up_bias", "gate_up_scale", "down_scale"):
            if f not in positions:
                continue
            name = node.input[positions[f]]
            if name not in inits:
                raise OnnxExportError(f"{f} of {node.name} ({name}) is not an initializer; cannot re-lay it "
                                      "for onnxruntime")
            array = numpy_helper.to_array(inits[name])
            if f != "down_scale":
                array = interleave_rows(array)
            if f.endswith("scale") and not fn.spec.experts.group_size:
                array = array.reshape(array.shape[:2])  # [E, R, 1] -> [E, R]
            if uses[name] == 1:
                inits[name].CopyFrom(numpy_helper.from_array(array, name))
            else:  # the exporter merged equal initializers (e.g. zero biases): give this use its own
                uses[name] -= 1
                name = f"{name}.{f}.{node.name}"
                proto.graph.initializer.append(numpy_helper.from_array(array, name))
                inits[name] = proto.graph.initializer[-1]
                uses[name] = 1
                node.input[positions[f]] = name


def interleave_rows(a):
    """[E, 2N, ...] gate rows then up rows -> rows g0, u0, g1, u1, ... (numpy or torch)."""
    n = a.shape[1] // 2
    stacked = (a[:, :n], a[:, n:])
    if isinstance(a, torch.Tensor):
        return torch.stack(stacked, dim=2).reshape(a.shape)
    import numpy as np

    return np.stack(stacked, axis=2).reshape(a.shape)


def deinterleave_rows(a):
    """Inverse of interleave_rows."""
    if isinstance(a, torch.Tensor):
        return torch.cat([a[:, 0::2], a[:, 1::2]], dim=1)
    import numpy as np

    return np.concatenate([a[:, 0::2], a[:, 1::2]], axis=1)


def _fallback_body(fn: _Function):
    """(nodes, opsets, functions) of the standard-op decomposition, from exporting DenseMoE."""
    from moecc.onnx_export.decompose import DenseMoE

    return _exported_body(DenseMoE, fn, fn.fields, ["out"])


def _routed_outside_body(fn: _Function):
    """(nodes, opsets, functions): the router in standard ops (decompose.moe_router_logits),
    then MoE / QMoE over all E + S experts with k = top_k + S, times z."""
    from onnx import helper

    from moecc.onnx_export.decompose import ROUTING_FIELDS, MoERouterLogits
    from moecc.onnx_export.ort_ops import ort_moe_node

    routing = tuple(f for f in fn.fields if f in ROUTING_FIELDS)
    nodes, opsets, extra = _exported_body(MoERouterLogits, fn, routing, ["router_probs", "z"])
    spec = fn.spec
    nodes.append(ort_moe_node(spec, fn.fields, "router_probs", "moe_out",
                              spec.router.top_k + spec.experts.num_shared, normalize=False))
    nodes.append(helper.make_node("Mul", ["moe_out", "z"], ["out"]))
    return nodes, dict(opsets, **{"com.microsoft": 1}), extra


def _exported_body(module_cls, fn: _Function, fields: tuple[str, ...], outputs: list[str]):
    """(nodes, opsets, functions) of module_cls(spec, fields) exported on its own, its
    inputs renamed to "hidden" + `fields` and its outputs to `outputs`."""
    from onnx import helper

    spec = fn.spec
    e_all = spec.router.num_experts + spec.experts.num_shared
    k, n = spec.experts.hidden_size, spec.experts.intermediate_size
    shapes = _example_weight_shapes(spec, e_all, k, n)
    torch.manual_seed(0)
    tensors = [_example_tensor(shapes[f], f, spec) for f in fields]
    hidden = torch.randn(3, k)
    dims = {"hidden": {0: torch.export.Dim("T", min=1)}, **{f"t{i}": None for i in range(len(fields))}}
    program = torch.onnx.export(module_cls(spec, fields).eval(), (hidden, *tensors), dynamo=True,
                                dynamic_shapes=dims, verbose=False, optimize=True)
    sub = program.model_proto
    graph = sub.graph
    if len(graph.input) != 1 + len(fields) or len(graph.output) != len(outputs):
        raise OnnxExportError(f"exporting {module_cls.__name__} for {fn.name} gave inputs "
                              f"{[i.name for i in graph.input]}, expected hidden + {list(fields)}")
    nodes = [helper.make_node("Constant", [], [t.name], value=t) for t in graph.initializer]
    # Rename graph inputs/outputs to the function's formal names.
    rename = {i.name: formal for i, formal in zip(graph.input, ["hidden", *fields])}
    rename.update({o.name: formal for o, formal in zip(graph.output, outputs)})
    for node in list(graph.node):
        node.input[:] = [rename.get(x, x) for x in node.input]
        node.output[:] = [rename.get(x, x) for x in node.output]
        nodes.append(node)
    for c in nodes[:len(graph.initializer)]:
        c.output[:] = [rename.get(x, x) for x in c.output]
    return nodes, {o.domain: o.version for o in sub.opset_import}, list(sub.functions)


def _example_weight_shapes(spec: MoELayerSpec, e_all: int, k: int, n: int) -> dict[str, tuple]:
    e = spec.router.num_experts
    quant = spec.experts.weight_format != "dense"
    per_byte = 2 if spec.experts.weight_format == "int4" else 1
    rows = 2 * n if spec.experts.gated else n
    g = spec.experts.group_size
    return {
        "router_weight": (e, k), "router_bias": (e,), "correction_bias": (e,),
        "gate_up": (e_all, rows, k // per_byte) if quant else (e_all, rows, k),
        "down": (e_all, k, n // per_byte) if quant else (e_all, k, n),
        "gate_up_bias": (e_all, rows), "down_bias": (e_all, k), "shared_expert_gate": (1, k),
        "gate_up_scale": (e_all, rows, k // g if g else 1), "down_scale": (e_all, k, n // g if g else 1),
    }


def _example_tensor(shape, field_name: str, spec: MoELayerSpec) -> torch.Tensor:
    if spec.experts.weight_format != "dense" and field_name in ("gate_up", "down"):
        return torch.randint(0, 256, shape, dtype=torch.uint8)
    return torch.randn(shape)


# -- save and verify -------------------------------------------------------------------

def _save(proto, path: str, external_data: Optional[bool]) -> bool:
    import onnx

    if external_data is None:
        external_data = sum(len(t.raw_data) for t in proto.graph.initializer) > EXTERNAL_DATA_BYTES
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    location = os.path.basename(path) + ".data"
    if external_data and os.path.exists(os.path.join(os.path.dirname(os.path.abspath(path)), location)):
        os.remove(os.path.join(os.path.dirname(os.path.abspath(path)), location))  # onnx appends otherwise
    onnx.save_model(proto, path, save_as_external_data=external_data, all_tensors_to_one_file=True,
                    location=location, size_threshold=1024)
    return external_data


def _verify(path, reference_model, example_inputs, example_kwargs, rtol, report: ExportReport) -> float:
    """Max relative error of onnxruntime's outputs against `reference_model`'s; raises above rtol."""
    import onnxruntime as ort

    from moecc.onnx_export.layers import relative_error

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feeds = onnx_feeds(session, example_inputs, example_kwargs)
    got = session.run(None, feeds)
    with torch.no_grad():
        expected = reference_model(*example_inputs, **(example_kwargs or {}))
    expected = [t for t in torch.utils._pytree.tree_leaves(expected) if isinstance(t, torch.Tensor)]
    worst = 0.0
    for i, (g, e) in enumerate(zip(got, expected)):
        err = relative_error(torch.from_numpy(g), e)
        if not err <= rtol:
            raise OnnxExportError(f"{path}: output {i} differs from {report.reference} by {err:.2e} (relative; "
                                  f"bound {rtol:g}). Layers: " + "; ".join(f"{layer.path} -> {layer.route}"
                                                                            for layer in report.layers))
        worst = max(worst, err)
    return worst


def onnx_feeds(session, example_inputs, example_kwargs=None) -> dict:
    """Example tensors keyed by the session's input names (positional, then keyword order)."""
    leaves = torch.utils._pytree.tree_leaves((tuple(example_inputs), list((example_kwargs or {}).values())))
    values = [t for t in leaves if isinstance(t, torch.Tensor)]
    names = [i.name for i in session.get_inputs()]
    return {name: value.detach().cpu().numpy() for name, value in zip(names, values)}
