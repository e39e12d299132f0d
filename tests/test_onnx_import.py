"""ONNX import (moecc.import_onnx): export -> import gives a torch module whose MoE layers
are moecc ops, matching the original eagerly and under torch.compile(backend="moecc")."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")
pytest.importorskip("transformers")

import moecc  # noqa: E402
from moecc.capture.report import CompileReport  # noqa: E402
from moecc.models import build_model  # noqa: E402
from moecc.onnx_export.layers import MoELayerModule  # noqa: E402

RTOL = 1e-4


def _model(name):
    model = build_model(name)
    model.config.use_cache = False
    return model


def _ids(batch, length, seed=2):
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def _rel(got, expected):
    assert torch.isfinite(got).all() and torch.isfinite(expected).all()
    return ((got.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


@pytest.fixture(scope="module", params=["qwen3-moe-tiny", "deepseek-v3-tiny"])
def round_trip(request, tmp_path_factory):
    """(original model, imported module, export report) per model family."""
    model = _model(request.param)
    path = str(tmp_path_factory.mktemp("onnx_rt") / "model.onnx")
    report = moecc.export_onnx(model, (_ids(2, 12),), path)
    return model, moecc.import_onnx(path), report


def test_imported_moe_layers_are_moecc_ops(round_trip):
    model, module, report = round_trip
    layers = list(module.moe.values())
    assert len(layers) == len(report.layers) == 2
    assert all(isinstance(m, MoELayerModule) for m in layers)
    exported = {layer.path.replace(".", "_"): layer.spec for layer in report.layers}
    assert set(module.moe) == set(exported)
    for name, layer in module.moe.items():
        spec = layer.spec
        assert spec.experts.canonical  # gate/up rows de-interleaved again
        assert spec.router == exported[name].router and spec.experts == exported[name].experts


@pytest.mark.parametrize("shape", [(2, 12), (1, 7)])
def test_imported_module_matches_original(round_trip, shape):
    model, module, _ = round_trip
    ids = _ids(*shape)
    with torch.no_grad():
        assert _rel(module(ids), model(ids).logits) <= RTOL


def test_compiled_import_captures_the_layers(round_trip):
    model, module, _ = round_trip
    report = CompileReport()
    compiled = torch.compile(module, backend="moecc", options={"report": report, "rest_of_graph": "eager"})
    ids = _ids(2, 9, seed=5)
    with torch.no_grad():
        got = compiled(ids)
        expected = model(ids).logits
    assert _rel(got, expected) <= RTOL
    lowered = [p for g in report.graphs for p in g.passes if p.name == "lower_kernels"]
    assert lowered and sum(sum(p.counters.values()) for p in lowered) >= 2  # both layers reached the pipeline
    assert len(report.graphs) == 1  # one graph: the importer's shape arithmetic never breaks it


def test_import_rejects_unknown_ops(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("Mystery", ["x"], ["y"], domain="example.com")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    path = str(tmp_path / "m.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                      helper.make_opsetid("example.com", 1)]), path)
    with pytest.raises(ImportError, match="Mystery"):
        moecc.import_onnx(path)


@pytest.mark.parametrize("precision", ["int8", {"format": "int4", "group_size": 32}])
def test_quantised_file_imports_as_the_same_packed_layer(tmp_path, precision):
    """QMoE rows and scales come back de-interleaved: the imported module computes what
    onnxruntime computes on the same file (both dequantise the same packed bytes)."""
    import onnxruntime as ort

    path = str(tmp_path / "q.onnx")
    report = moecc.export_onnx(_model("qwen3-moe-tiny"), (_ids(2, 10),), path, precision=precision)
    assert {layer.route for layer in report.layers} == {"com.microsoft.QMoE"}
    module = moecc.import_onnx(path)
    for layer in module.moe.values():
        assert layer.spec.experts.weight_format in ("int8", "int4") and layer.gate_up.dtype == torch.uint8
        assert layer.gate_up_scale.dim() == 3
    ids = _ids(3, 6, seed=7)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    expected = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: ids.numpy()})[0])
    with torch.no_grad():
        assert _rel(module(ids), expected) <= RTOL
