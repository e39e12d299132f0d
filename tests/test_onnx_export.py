"""ONNX export (moecc.onnx_export): onnxruntime's MoE / QMoE where they fit, standard ops
elsewhere, every file checked with onnxruntime (CPU) against eager PyTorch.

Shared exports are module-scoped: each tiny model is exported once (~10 s each on CPU).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("transformers")

from moecc.cli import main  # noqa: E402
from moecc.models import build_model  # noqa: E402
from moecc.onnx_export.export import export_onnx, interleave_rows, deinterleave_rows  # noqa: E402
from moecc.onnx_export.ort_ops import ort_unsupported  # noqa: E402
from moecc.spec import ExpertSpec, MoELayerSpec, RouterSpec  # noqa: E402

RTOL = 1e-4  # fp32 logits, relative to their max magnitude


def _model(name):
    model = build_model(name)
    model.config.use_cache = False
    return model


def _ids(batch, length, seed=1):
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def _ort_logits(path, ids):
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: ids.numpy()})[0])


def _rel(got, expected):
    assert torch.isfinite(got).all() and torch.isfinite(expected).all()
    return ((got.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def _function_ops(path):
    """{local function name: set of (domain, op_type)} of an exported file."""
    import onnx

    proto = onnx.load(path)
    return {f.name: {(n.domain, n.op_type) for n in f.node} for f in proto.functions}, proto


@pytest.fixture(scope="module")
def qwen_cli_export(tmp_path_factory):
    """qwen3-moe-tiny through the command line (build_model's seed: the same weights as _model)."""
    out = tmp_path_factory.mktemp("qwen_onnx")
    assert main(["export", "--format", "onnx", "--model", "qwen3-moe-tiny", "--out", str(out)]) == 0
    return str(out)


@pytest.fixture(scope="module", params=[True, False], ids=["onnxruntime_ops", "standard_ops"])
def deepseek_export(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ds_onnx") / "model.onnx")
    report = export_onnx(_model("deepseek-v3-tiny"), (_ids(2, 12),), path, onnxruntime_ops=request.param)
    return path, report, request.param


def test_cli_export_uses_onnxruntime_moe(qwen_cli_export):
    path = os.path.join(qwen_cli_export, "model.onnx")
    text = open(os.path.join(qwen_cli_export, "export_report.txt")).read()
    assert text.count("com.microsoft.MoE") == 2 and "max relative error" in text
    functions, proto = _function_ops(path)
    assert len(functions) == 1  # both layers share one spec -> one function
    (ops,) = functions.values()
    assert ("com.microsoft", "MoE") in ops
    calls = [n for n in proto.graph.node if n.domain == "moecc"]
    assert len(calls) == 2
    meta = json.loads(proto.functions[0].doc_string)
    assert meta["gate_up_rows"] == "interleaved" and meta["fields"][:1] == ["router_weight"]


@pytest.mark.parametrize("shape", [(1, 5), (3, 17)])
def test_onnxruntime_matches_eager_at_other_shapes(qwen_cli_export, shape):
    model = _model("qwen3-moe-tiny")
    ids = _ids(*shape)
    with torch.no_grad():
        expected = model(ids).logits
    assert _rel(_ort_logits(os.path.join(qwen_cli_export, "model.onnx"), ids), expected) <= RTOL


def test_deepseek_experts_run_in_onnxruntime_moe_with_routing_outside(deepseek_export):
    """Grouped sigmoid routing with a correction bias and a shared expert: the router goes
    out as standard ops (log weights, -inf elsewhere), the experts as com.microsoft.MoE;
    with onnxruntime_ops=False the whole layer is standard ops."""
    path, report, onnxruntime_ops = deepseek_export
    route = "com.microsoft.MoE (routing in ONNX ops)" if onnxruntime_ops else "standard ONNX ops"
    assert [layer.route for layer in report.layers] == [route] * 2
    if onnxruntime_ops:
        assert "sigmoid routing" in report.layers[0].why and "shared experts" in report.layers[0].why
    assert report.max_relative_error is not None and report.max_relative_error <= RTOL
    functions, _ = _function_ops(path)
    ops = set().union(*functions.values())
    assert (("com.microsoft", "MoE") in ops) == onnxruntime_ops
    assert ("", "TopK") in ops  # the grouped selection, in standard ops either way
    ids = _ids(3, 9, seed=4)
    with torch.no_grad():
        expected = _model("deepseek-v3-tiny")(ids).logits
    assert _rel(_ort_logits(path, ids), expected) <= RTOL


def test_gpt_oss_biases_and_clamped_swiglu_go_to_onnxruntime_moe(tmp_path):
    model = _model("gpt-oss-tiny")
    with torch.no_grad():  # the tiny model's biases start at zero: make them count
        for name, p in model.named_parameters():
            if name.endswith(("bias",)) and ".mlp." in name:
                p.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    path = str(tmp_path / "gpt_oss.onnx")
    report = export_onnx(model, (_ids(2, 12),), path)
    assert [layer.route for layer in report.layers] == ["com.microsoft.MoE"] * 2
    assert all(layer.spec.experts.activation == "swiglu_oai" and layer.spec.experts.has_bias
               for layer in report.layers)
    ids = _ids(1, 9, seed=3)
    with torch.no_grad():
        expected = model(ids).logits
    assert _rel(_ort_logits(path, ids), expected) <= RTOL


@pytest.mark.parametrize("precision, fmt", [("int8", "int8 per-row"),
                                            ({"format": "int4", "group_size": 32}, "int4 g32")])
def test_precision_exports_qmoe(tmp_path, precision, fmt):
    model = _model("qwen3-moe-tiny")
    path = str(tmp_path / "q.onnx")
    report = export_onnx(model, (_ids(2, 10),), path, precision=precision)
    assert [layer.route for layer in report.layers] == ["com.microsoft.QMoE"] * 2
    assert all(fmt in layer.spec.describe() for layer in report.layers)
    assert report.max_relative_error <= RTOL  # against the quantised PyTorch model
    functions, proto = _function_ops(path)
    assert ("com.microsoft", "QMoE") in set().union(*functions.values())
    packed = [t for t in proto.graph.initializer if t.name.endswith(".gate_up")]
    assert packed and all(t.data_type == 2 for t in packed)  # uint8: moecc's packed bytes, unchanged
    # Quantised, so not equal to the float model, but close (int8 much closer than int4).
    ids = _ids(2, 10)
    with torch.no_grad():
        float_logits = model(ids).logits
    err = _rel(_ort_logits(path, ids), float_logits)
    assert 0 < err < (0.05 if fmt.startswith("int8") else 0.3)


def test_model_without_moe_exports_plain_onnx(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.GELU(), torch.nn.Linear(64, 4)).eval()
    x = torch.randn(3, 8)
    report = export_onnx(model, (x,), str(tmp_path / "mlp.onnx"), external_data=True)
    assert not report.layers and any("no MoE layer" in n for n in report.notes)
    assert report.external_data and os.path.getsize(tmp_path / "mlp.onnx.data") >= 64 * 4 * 4
    assert "plain ONNX" in report.summary()
    session = ort.InferenceSession(str(tmp_path / "mlp.onnx"), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    assert _rel(got, model(x).detach()) <= RTOL


def test_missing_onnxruntime_names_the_extra(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(ImportError, match=r"moecc\[onnx\]"):
        export_onnx(torch.nn.Linear(2, 2), (torch.randn(1, 2),), str(tmp_path / "x.onnx"))
    assert main(["export", "--format", "onnx", "--model", "qwen3-moe-tiny", "--out", str(tmp_path)]) == 2


def test_ort_unsupported_says_why():
    softmax = MoELayerSpec(RouterSpec(8, 2, renormalize=True), ExpertSpec(64, 32))
    assert ort_unsupported(softmax) == []
    gpt_oss = MoELayerSpec(RouterSpec(8, 2, scoring="topk_softmax", has_router_bias=True),
                           ExpertSpec(64, 32, activation="swiglu_oai", has_bias=True))
    assert ort_unsupported(gpt_oss) == []
    gelu = MoELayerSpec(RouterSpec(8, 2), ExpertSpec(64, 32, activation="gelu_tanh"))
    assert any("gelu_tanh" in w for w in ort_unsupported(gelu))
    grouped = MoELayerSpec(RouterSpec(8, 2, scoring="sigmoid", n_group=4, topk_group=2, has_correction_bias=True),
                           ExpertSpec(64, 32))
    assert {"sigmoid routing", "group-limited routing", "score-correction bias"} <= set(ort_unsupported(grouped))


def test_interleave_rows_round_trip():
    a = torch.arange(2 * 6 * 3).reshape(2, 6, 3)
    b = interleave_rows(a)
    assert torch.equal(b[:, 0], a[:, 0]) and torch.equal(b[:, 1], a[:, 3])  # g0, u0, ...
    assert torch.equal(deinterleave_rows(b), a)
    assert (deinterleave_rows(interleave_rows(a.numpy())) == a.numpy()).all()


@pytest.mark.slow
@pytest.mark.parametrize("name, route", [("qwen3-moe-stdlib", "com.microsoft.MoE"),
                                         ("deepseek-v3-stdlib", "com.microsoft.MoE (routing in ONNX ops)")])
def test_trained_models_export_and_round_trip(tmp_path, name, route):
    """The shipped trained models: onnxruntime and the imported module both match eager."""
    import moecc

    model = _model(name)
    path = str(tmp_path / "model.onnx")
    report = export_onnx(model, (_ids(2, 32),), path)
    assert report.layers and {layer.route for layer in report.layers} == {route}
    ids = _ids(2, 48, seed=9)
    with torch.no_grad():
        expected = model(ids).logits
        assert _rel(_ort_logits(path, ids), expected) <= RTOL
        assert _rel(moecc.import_onnx(path)(ids), expected) <= RTOL
