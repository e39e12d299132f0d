"""`import_onnx`: an ONNX file written by export_onnx -> a torch module with moecc MoE ops.

    module = import_onnx("model.onnx")
    logits = module(input_ids)
    compiled = torch.compile(module, backend="moecc")   # the MoE layers are already moecc ops

Each node of domain "moecc" (one MoE layer: a call of a local function whose doc_string
holds the layer spec, see export.py) becomes a MoELayerModule holding that layer's
initializers, back in the canonical layout (gate/up rows de-interleaved, per-row scales
[E, R] -> [E, R, 1]); the module runs the moecc reference op, and torch.compile with the
moecc backend lowers it to its kernels. onnxruntime's own com.microsoft MoE / QMoE nodes
(files moecc did not write) become MoELayerModules too, their router Gemm / MatMul folded
in (foreign_moe.py). Every other node runs through onnx_ops.OPS, in graph order. Assumes
a graph of standard ONNX ops (those OPS covers) plus these MoE layers; anything else is an
ImportError naming the op.
"""

from __future__ import annotations

import json
import re

import torch

from moecc.onnx_export.foreign_moe import FOREIGN_OPS, foreign_layer, graph_links
from moecc.onnx_export.layers import MoELayerModule
from moecc.onnx_export.onnx_ops import ONNX_DTYPES, OPS, HostInts
from moecc.spec import MoELayerSpec
from moecc.weights import MOE_WEIGHT_FIELDS, MoEWeights

DOMAIN = "moecc"
_HOST_MAX = 64  # int64 constants up to this many elements stay host ints (shape arithmetic)


def import_onnx(path_or_proto, kernel_backend: str = "reference") -> "OnnxModule":
    """Load an ONNX file (path or onnx.ModelProto) as an OnnxModule in eval mode."""
    from moecc.onnx_export.export import require_onnx

    require_onnx()
    import onnx

    proto = onnx.load(path_or_proto) if isinstance(path_or_proto, str) else path_or_proto
    return OnnxModule(proto, kernel_backend).eval()


class OnnxModule(torch.nn.Module):
    """Runs an ONNX graph with torch ops; its MoE layers are MoELayerModules (`self.moe`)."""

    def __init__(self, proto, kernel_backend: str = "reference"):
        super().__init__()
        from onnx import helper, numpy_helper

        graph = proto.graph
        functions = {f.name: f for f in proto.functions if f.domain == DOMAIN}
        # torch.tensor copies into torch's 64-byte-aligned memory; numpy's may not be (TVM kernels assume it).
        tensors = {t.name: torch.tensor(numpy_helper.to_array(t)) for t in graph.initializer}
        self.input_names = [i.name for i in graph.input if i.name not in tensors]
        self.output_names = [o.name for o in graph.output]
        self.moe = torch.nn.ModuleDict()
        self.consts = torch.nn.Module()  # float / large initializers as buffers
        self._const_names: dict[str, str] = {}
        self._host: dict[str, HostInts] = {}
        self._steps = []
        moe_inputs = set()
        producers, consumers = graph_links(graph)
        folded: set[str] = set()  # router nodes a foreign MoE layer absorbs
        foreign: dict[int, tuple[str, MoELayerModule]] = {}
        for i, node in enumerate(graph.node):
            if node.domain == "com.microsoft" and node.op_type in FOREIGN_OPS:
                module, absorbed = foreign_layer(node, producers, consumers, tensors, kernel_backend)
                foreign[i] = (re.sub(r"\W", "_", node.name or node.output[0]), module)
                folded.update(absorbed)
        for i, node in enumerate(graph.node):
            if (node.name or node.output[0]) in folded:
                continue
            if i in foreign:
                name, module = foreign[i]
                self.moe[name] = module
                self._steps.append(("moe", name, [node.input[0]], list(node.output), {}))
                moe_inputs.update(node.input[1:])
                continue
            if node.domain == DOMAIN:
                name, module = _layer_module(node, functions, tensors, kernel_backend)
                self.moe[name] = module
                self._steps.append(("moe", name, [node.input[0]], list(node.output), {}))
                moe_inputs.update(node.input[1:])
                continue
            if node.op_type == "Constant":
                tensors[node.output[0]] = _attr_value(helper.get_attribute_value(node.attribute[0]))
                continue
            if node.domain not in ("", "ai.onnx") or node.op_type not in OPS:
                raise ImportError(f"import_onnx: no torch translation for {node.domain or 'ai.onnx'}::"
                                  f"{node.op_type} (node {node.name}); moecc imports the standard ops in "
                                  "moecc/onnx_export/onnx_ops.py and moecc layer functions")
            attrs = {a.name: _attr_value(helper.get_attribute_value(a)) for a in node.attribute}
            if node.op_type == "ConstantOfShape" and "value" in attrs:  # a host scalar: no .item() in forward
                attrs["value"] = (attrs["value"].reshape(-1)[0].item(), attrs["value"].dtype)
            self._steps.append(("op", node.op_type, list(node.input), list(node.output), attrs))
        used = {i for _, _, ins, _, _ in self._steps for i in ins}
        for i, (name, value) in enumerate(tensors.items()):
            if name not in used:
                continue  # only MoE layers read it (they hold their own copy)
            if value.dtype in (torch.int64, torch.int32) and value.dim() <= 1 and value.numel() <= _HOST_MAX:
                self._host[name] = HostInts(value.reshape(-1).tolist(), value.dim() == 0, value.dtype)
            else:
                attr = f"c{i}_" + re.sub(r"\W", "_", name)[-40:]
                self.consts.register_buffer(attr, value)
                self._const_names[name] = attr

    def forward(self, *inputs):
        if len(inputs) != len(self.input_names):
            raise TypeError(f"expected {len(self.input_names)} inputs ({', '.join(self.input_names)}), "
                            f"got {len(inputs)}")
        env = dict(zip(self.input_names, inputs))
        env.update(self._host)
        for name, attr in self._const_names.items():
            env[name] = getattr(self.consts, attr)
        for kind, op, ins, outs, attrs in self._steps:
            args = [env[i] if i else None for i in ins]
            while args and args[-1] is None:
                args.pop()
            result = self.moe[op](*args) if kind == "moe" else _call(op, args, attrs)
            if isinstance(result, (tuple, list)):
                env.update(zip(outs, result))
            else:
                env[outs[0]] = result
        results = [env[o] for o in self.output_names]
        return results[0] if len(results) == 1 else tuple(results)


def _call(op: str, args, attrs):
    return OPS[op](*args, **attrs)  # positional args in the ONNX input order


def _attr_value(value):
    """An ONNX attribute value in Python: tensors to torch, strings decoded."""
    from onnx import TensorProto, numpy_helper

    if isinstance(value, TensorProto):
        return torch.tensor(numpy_helper.to_array(value))
    if isinstance(value, bytes):
        return value.decode()
    return value


def _layer_module(node, functions, tensors, kernel_backend: str):
    """(module name, MoELayerModule) for one moecc layer node."""
    from moecc.onnx_export.export import deinterleave_rows

    function = functions.get(node.op_type)
    if function is None:
        raise ImportError(f"moecc node {node.name} calls {node.op_type}, which the file does not define")
    meta = json.loads(function.doc_string)
    spec = MoELayerSpec.from_json(json.dumps(meta["spec"]))
    given = {}
    for f, name in zip(meta["fields"], node.input[1:]):
        if name not in tensors:
            raise ImportError(f"{node.name}: weight {f} ({name}) is not an initializer")
        given[f] = tensors[name]
    if meta.get("gate_up_rows") == "interleaved":
        for f in ("gate_up", "gate_up_bias", "gate_up_scale"):
            if f in given:
                given[f] = deinterleave_rows(given[f]).contiguous()
    for f in ("gate_up_scale", "down_scale"):
        if f in given and given[f].dim() == 2:  # QMoE's per-row [E, R] -> moecc's [E, R, 1]
            given[f] = given[f].unsqueeze(-1)
    weights = MoEWeights(**{f: given.get(f) for f in MOE_WEIGHT_FIELDS})
    router_name = node.input[1 + meta["fields"].index("router_weight")]
    path = router_name[: -len(".router_weight")] if router_name.endswith(".router_weight") else node.name
    return re.sub(r"\W", "_", path), MoELayerModule(spec, weights, kernel_backend)


__all__ = ["import_onnx", "OnnxModule", "ONNX_DTYPES"]
