"""`moecc coverage` on a representative subset (the default test run); the full sweep is
`moecc coverage` (docs/coverage.md).

The subset covers each outcome the table reports: a plain architecture captured, one
needing a variant (gated shared experts), one decoder-only text model of a multimodal
architecture, one declined with a reason (MuSE Spark's projection in front of the experts), one transformers
cannot build from its default config, and the WRONG path.
"""

from __future__ import annotations

import json

import pytest

from moecc import coverage
from moecc.architectures import MAX_TINY_PARAMS, build_tiny_model, moe_architectures
from moecc.cli import main


def test_enumerates_the_installed_moe_architectures():
    names = moe_architectures()
    assert len(names) >= 60
    for expected in ("mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss", "olmoe", "nemotron_h", "qwen3_vl_moe"):
        assert expected in names
    assert "llama" not in names


def test_multimodal_architecture_builds_its_text_decoder_tiny():
    model, info = build_tiny_model("qwen3_vl_moe")
    assert info.text_decoder_only and "Text" in info.model_class
    assert 0 < info.parameters < MAX_TINY_PARAMS
    assert sum(1 for m in model.modules() if hasattr(m, "experts")) == 2


@pytest.mark.parametrize("arch, status", [
    ("olmoe", "captured"),
    ("qwen2_moe", "captured"),
    ("muse_spark", "declined"),
])
def test_subset_outcomes(arch, status, quiet):
    r = coverage.check_architecture(arch)
    assert r.status == status, r
    assert r.default_config_builds and r.moe_present == 2
    if status == "captured":
        assert r.moe_captured == 2 and r.max_rel_error is not None and r.max_rel_error <= coverage.FP32_OUTPUT_RTOL
        assert r.graph_breaks == 0 and r.variants
    else:
        assert r.moe_captured == 0 and r.max_rel_error <= coverage.FP32_OUTPUT_RTOL  # left alone = eager result
        assert any("pre_expert_proj.weight" in x and "no known role" in x for x in r.reasons), r.reasons


def test_default_config_eager_cannot_build_is_listed_not_counted():
    r = coverage.check_architecture("hunyuan_v1_moe")
    assert not r.default_config_builds
    assert "cannot build the default config" in r.reasons[0]
    assert coverage.summary([r])["counted"] == 0


def test_a_wrong_output_is_reported_as_wrong(monkeypatch, quiet):
    """No threshold: any difference from eager is WRONG, so the comparison is live."""
    monkeypatch.setattr(coverage, "FP32_OUTPUT_RTOL", -1.0)
    r = coverage.check_architecture("olmoe")
    assert r.status == "WRONG" and "differs from eager" in r.reasons[0]
    assert coverage.summary([r])["wrong"] == 1


def test_cli_writes_table_and_json(tmp_path, capsys, quiet):
    md, js = tmp_path / "coverage.md", tmp_path / "coverage.json"
    md.write_text("# Coverage\n\nprose kept\n")
    assert main(["coverage", "olmoe", "hunyuan_v1_moe", "--markdown", str(md), "--json", str(js)]) == 0
    text = md.read_text()
    assert "prose kept" in text and "| olmoe | captured | 2 / 2 |" in text
    assert "1 of 1 counted architectures captured fully (100%), 0 wrong" in text
    data = json.loads(js.read_text())
    assert data["summary"]["no_default_config"] == 1
    assert [r["architecture"] for r in data["results"]] == ["olmoe", "hunyuan_v1_moe"]
    # a second run replaces the table, not the prose
    assert main(["coverage", "olmoe", "--markdown", str(md), "--json", ""]) == 0
    assert md.read_text().count("| olmoe |") == 1 and "prose kept" in md.read_text()


def test_cli_unknown_architecture_names_the_list_command(capsys):
    assert main(["coverage", "not_a_model"]) == 2
    assert "moecc coverage --list" in capsys.readouterr().err
