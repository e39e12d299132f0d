"""Capture's edges: hand-written modules, unknown variants, eager experts, no verification."""

from __future__ import annotations

import logging

import pytest
import torch
from gpt_fast_moe import TinyMoEBlockModel
from model_checks import compile_with_report

import moecc
from moecc.models import build_model


def test_gpt_fast_style_module_is_captured(quiet):
    torch.manual_seed(0)
    model = TinyMoEBlockModel().eval()
    compiled, report = compile_with_report(model)
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
    assert [c.module_path for c in report.captured] == ["moes.0", "moes.1"]
    spec = report.captured[0].spec
    assert spec.experts.gate_up_layout == "separate" and spec.router.renormalize and spec.router.scoring == "softmax"
    assert report.pass_counter("expert_fusion", "relayouts") == 2


def test_unknown_router_variant_is_left_alone_with_reason(caplog):
    torch.manual_seed(0)
    model = TinyMoEBlockModel(scoring="relu2").eval()
    compiled, report = compile_with_report(model)
    x = torch.randn(2, 5, 64)
    with caplog.at_level(logging.WARNING, logger="moecc.capture"), pytest.warns(UserWarning, match="uncaptured"):
        with torch.no_grad():
            out = compiled(x)
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)  # the original nodes ran
    assert report.captured == []
    assert [s.module_path for s in report.skipped] == ["moes.0", "moes.1"]
    assert all("neither softmax nor sigmoid" in s.reason for s in report.skipped)
    assert "moes.0" in caplog.text and "left" in caplog.text


def test_semantic_mismatch_is_caught_by_verification(quiet, monkeypatch):
    """If recognition got a detail wrong, verification refuses the rewrite."""
    import importlib

    recognise_module = importlib.import_module("moecc.capture.recognise")

    real = recognise_module._router_spec

    def wrong_router(*args, **kwargs):
        import dataclasses

        return dataclasses.replace(real(*args, **kwargs), renormalize=False)  # drop renormalisation

    monkeypatch.setattr(recognise_module, "_router_spec", wrong_router)
    model = build_model("qwen3-moe-tiny")
    compiled, report = compile_with_report(model)
    ids = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    assert report.captured == []
    assert all("does not reproduce" in s.reason for s in report.skipped)


def test_verification_can_be_turned_off(quiet):
    model = build_model("mixtral-tiny")
    compiled, report = compile_with_report(model, verify_capture=False)
    ids = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    assert len(report.captured) == 2 and not any(c.verified for c in report.captured)


def test_eager_experts_are_detected_and_explained(quiet):
    model = build_model("qwen3-moe-tiny", experts_implementation="eager")
    report = moecc.CompileReport()
    compiled = torch.compile(model, backend="moecc",
                             options={"report": report, "rest_of_graph": "eager", "kernel_backend": "reference"})
    ids = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, model(ids).logits)
    assert any(g.eager_experts_detected for g in report.graphs)
    assert report.captured == []
    assert any("set_experts_implementation('grouped_mm')" in s.reason for s in report.skipped)

    # The one-call fix makes every layer capturable.
    moecc.use_compilable_experts(model)
    torch._dynamo.reset()
    compiled, report = compile_with_report(model)
    with torch.no_grad():
        compiled(ids)
    assert len(report.captured) == 2


def test_use_compilable_experts_rejects_bad_input():
    with pytest.raises(ValueError, match="grouped_mm"):
        moecc.use_compilable_experts(build_model("qwen3-moe-tiny"), "eager")
    with pytest.raises(TypeError, match="transformers"):
        moecc.use_compilable_experts(torch.nn.Linear(2, 2))


def test_dump_graphs_writes_one_file_per_stage(tmp_path, quiet):
    model = build_model("qwen3-moe-tiny")
    compiled, report = compile_with_report(model, dump_graphs=str(tmp_path))
    with torch.no_grad():
        compiled(torch.randint(0, 256, (1, 4)))
    names = sorted(p.name for p in tmp_path.iterdir())
    from moecc.passes.pipeline import PIPELINE

    assert names == sorted(["graph00_capture.txt"] + [f"graph00_{p.NAME}.txt" for p in PIPELINE])
    assert {"graph00_expert_fusion.txt", "graph00_lower_kernels.txt", "graph00_decode_gemv.txt"} <= set(names)
    assert "moecc.moe_layer" in (tmp_path / "graph00_capture.txt").read_text()


@pytest.mark.parametrize("name, owner, attribute", [
    ("deepseek-v3-tiny", "gate", "routed_scaling_factor"),
    ("gpt-oss-tiny", "experts", "alpha"),
])
def test_dynamic_true_lifted_float_attributes(name, owner, attribute, quiet):
    """dynamic=True turns float module attributes into graph inputs: capture reads them as
    constants of the layer and checks on every call that they did not change."""
    model = build_model(name)
    report = moecc.CompileReport()
    compiled = torch.compile(model, backend="moecc", dynamic=True, fullgraph=True,
                             options={"report": report, "kernel_backend": "reference", "rest_of_graph": "eager"})
    with torch.no_grad():
        for shape in [(1, 3), (2, 9)]:
            ids = torch.randint(0, 256, shape)
            torch.testing.assert_close(compiled(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
        assert report.graphs and all(len(g.captured) == 2 for g in report.graphs), report.format()
        setattr(getattr(model.model.layers[-1].mlp, owner), attribute, 1.0)
        with pytest.raises(RuntimeError, match="changed since"):
            compiled(torch.randint(0, 256, (1, 3)))
