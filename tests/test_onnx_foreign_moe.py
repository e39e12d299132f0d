"""Importing onnxruntime MoE / QMoE nodes from files moecc did not write
(moecc/onnx_export/foreign_moe.py): the router Gemm / MatMul is folded into a moecc layer,
and the imported module computes what onnxruntime computes on the same file.

The files are built by hand here with onnx.helper, as another tool would write them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from moecc.onnx_export import import_onnx  # noqa: E402
from moecc.onnx_export.export import interleave_rows  # noqa: E402
from moecc.onnx_export.layers import MoELayerModule  # noqa: E402

E, K, N, TOP_K = 8, 64, 32, 2
RTOL = 1e-4  # fp32, relative to the output's max magnitude


def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(router=torch.randn(E, K, generator=g), gate_up=torch.randn(E, 2 * N, K, generator=g) * 0.2,
                down=torch.randn(E, K, N, generator=g) * 0.2, router_bias=torch.randn(E, generator=g),
                gate_up_bias=torch.randn(E, 2 * N, generator=g) * 0.1, down_bias=torch.randn(E, K, generator=g) * 0.1)


def _file(path, router="gemm", fusion=1, biases=False, quantized=None, normalize=1, extra_use=False, oai=False):
    """A graph x [T, K] -> MoE / QMoE(x, router(x), ...) written the way onnxruntime's own tools do."""
    w = _weights()
    inits, nodes = [], []

    def init(name, t):
        inits.append(numpy_helper.from_array(t.numpy() if isinstance(t, torch.Tensor) else t, name))
        return name

    if router == "gemm":
        nodes.append(helper.make_node("Gemm", ["x", init("wr", w["router"])] + ([init("br", w["router_bias"])]
                                      if biases else []), ["logits"], transB=1))
    else:  # MatMul with the transposed weight, then Add(bias)
        nodes.append(helper.make_node("MatMul", ["x", init("wr_t", w["router"].t().contiguous())],
                                      ["mm" if biases else "logits"]))
        if biases:
            nodes.append(helper.make_node("Add", ["mm", init("br", w["router_bias"])], ["logits"]))
    gate_up = interleave_rows(w["gate_up"]) if fusion == 1 else w["gate_up"]
    gate_up_bias = interleave_rows(w["gate_up_bias"]) if fusion == 1 else w["gate_up_bias"]
    attrs = dict(k=TOP_K, normalize_routing_weights=normalize, activation_type="swiglu", swiglu_fusion=fusion,
                 activation_alpha=1.702 if oai else 1.0, activation_beta=1.0 if oai else 0.0)
    if oai:
        attrs["swiglu_limit"] = 7.0
    if quantized is None:
        inputs = ["x", "logits", init("fc1", gate_up), init("fc1_b", gate_up_bias) if biases else "",
                  init("fc2", w["down"]), init("fc2_b", w["down_bias"]) if biases else ""]
        nodes.append(helper.make_node("MoE", inputs, ["y"], domain="com.microsoft", **attrs))
    else:  # QMoE, int8 / int4 packed as moecc packs them (the layout QMoE reads)
        from moecc.backends.reference.quantized import quantize_rows

        fmt, group = quantized
        fc1, fc2 = quantize_rows(gate_up, fmt, group), quantize_rows(w["down"], fmt, group)
        scale = (lambda q: q.scales.squeeze(-1)) if not group else (lambda q: q.scales)  # per row: [E, R]
        attrs.update(expert_weight_bits=8 if fmt == "int8" else 4, **({"block_size": group} if group else {}))
        inputs = ["x", "logits", init("fc1", fc1.packed), init("fc1_s", scale(fc1)), "", init("fc2", fc2.packed),
                  init("fc2_s", scale(fc2)), ""]
        nodes.append(helper.make_node("QMoE", inputs, ["y"], domain="com.microsoft", **attrs))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", K])]
    if extra_use:
        outputs.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["T", E]))
    graph = helper.make_graph(nodes, "foreign_moe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", K])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, str(path))
    return str(path)


def _ort(path, x):
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"x": x.numpy()})[0])


def _rel(got, expected):
    assert torch.isfinite(got).all() and torch.isfinite(expected).all()
    return ((got.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


@pytest.mark.parametrize("kw", [
    dict(),
    dict(router="matmul", biases=True),
    dict(fusion=2, normalize=0),
    dict(oai=True, biases=True),
    dict(quantized=("int8", 0)),
    dict(quantized=("int4", 32)),
], ids=["gemm", "matmul+bias", "concat-rows-no-renorm", "gpt-oss-swiglu", "qmoe-int8-rows", "qmoe-int4-g32"])
def test_foreign_moe_node_imports_as_a_moecc_layer(tmp_path, kw):
    path = _file(tmp_path / "f.onnx", **kw)
    module = import_onnx(path)
    # onnxruntime's CPU MoE runs interleaved rows only: the concatenated file is checked
    # against the same layer written interleaved.
    ort_path = path if kw.get("fusion", 1) == 1 else _file(tmp_path / "i.onnx", **dict(kw, fusion=1))
    layers = list(module.moe.values())
    assert len(layers) == 1 and isinstance(layers[0], MoELayerModule)
    assert layers[0].spec.router.num_experts == E and layers[0].spec.router.top_k == TOP_K
    for t in (1, 5, 33):
        x = torch.randn(t, K, generator=torch.Generator().manual_seed(t))
        with torch.no_grad():
            assert _rel(module(x), _ort(ort_path, x)) <= RTOL, (kw, t)


def test_foreign_layer_compiles_with_moecc(tmp_path):
    from moecc import CompileReport

    path = _file(tmp_path / "f.onnx", biases=True)
    module = import_onnx(path)
    report = CompileReport()
    compiled = torch.compile(module, backend="moecc", options={"report": report, "rest_of_graph": "eager"})
    x = torch.randn(6, K, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert _rel(compiled(x), _ort(path, x)) <= RTOL
    lowered = [p for g in report.graphs for p in g.passes if p.name == "lower_kernels"]
    assert lowered and sum(sum(p.counters.values()) for p in lowered) >= 1


def test_router_read_elsewhere_or_not_constant_is_refused(tmp_path):
    with pytest.raises(ImportError, match="read elsewhere"):
        import_onnx(_file(tmp_path / "a.onnx", extra_use=True))
    # router logits as a graph input: nothing to fold
    w = _weights()
    inits = [numpy_helper.from_array(interleave_rows(w["gate_up"]).numpy(), "fc1"),
             numpy_helper.from_array(w["down"].numpy(), "fc2")]
    node = helper.make_node("MoE", ["x", "logits", "fc1", "", "fc2"], ["y"], domain="com.microsoft", k=2,
                            activation_type="swiglu", swiglu_fusion=1)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", K]),
                                            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["T", E])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", K])], inits)
    onnx.save(helper.make_model(graph), str(tmp_path / "b.onnx"))
    with pytest.raises(ImportError, match="not computed by a Gemm / MatMul"):
        import_onnx(str(tmp_path / "b.onnx"))


def test_unfused_or_other_activation_is_refused(tmp_path):
    path = _file(tmp_path / "c.onnx")
    proto = onnx.load(path)
    for a in proto.graph.node[-1].attribute:
        if a.name == "activation_type":
            a.s = b"gelu"
    onnx.save(proto, str(tmp_path / "d.onnx"))
    with pytest.raises(ImportError, match="activation_type='gelu'"):
        import_onnx(str(tmp_path / "d.onnx"))
    assert np.isfinite(_ort(path, torch.randn(2, K)).numpy()).all()
