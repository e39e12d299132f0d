"""The moecc command line: demo, explain and doctor exit 0 and say what they did;
bad input fails with a message that says what to do."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from moecc.cli import main


def test_demo_runs_and_reports(capsys, quiet):
    code = main(["demo", "--model", "qwen3-moe-tiny", "--rest-of-graph", "eager", "--kernel-backend", "reference",
                 "--repeats", "1", "--batch", "1", "--tokens", "4"])
    out = capsys.readouterr().out
    assert code == 0
    assert "model.layers.0.mlp" in out and "model.layers.1.mlp" in out
    assert "logit difference" in out and "eager" in out and "moecc" in out


def test_demo_rejects_bad_sizes(capsys):
    assert main(["demo", "--model", "qwen3-moe-tiny", "--tokens", "0"]) == 2
    assert "must be positive" in capsys.readouterr().out


def test_explain_builtin_model(capsys, quiet):
    assert main(["explain", "deepseek-v3-tiny"]) == 0
    out = capsys.readouterr().out
    assert "DeepseekV3MoE" in out and "verified" in out and "pass expert_fusion" in out
    assert "2 MoE layer(s) captured, 0 left alone" in out


def test_explain_precision_names_each_layers_format_and_linears(capsys, quiet):
    assert main(["explain", "qwen3-moe-tiny", "--kernel-backend", "reference", "--precision",
                 '{"format": "int4", "group_size": 32}', "--quantize-linears"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.0.mlp: int4 g32: weight SQNR >=" in out
    assert "model.layers.1.self_attn.o_proj.weight (64, 64): int4 g32, weight SQNR" in out
    assert main(["explain", "qwen3-moe-tiny", "--precision", "int2"]) == 2
    assert "--precision: unknown precision 'int2'; valid:" in capsys.readouterr().out


def test_explain_large_config_json_on_meta(tmp_path, capsys, quiet):
    """A real-size config is traced on the meta device: nothing is allocated."""
    from transformers import AutoConfig

    cfg = AutoConfig.for_model("qwen3_moe", num_hidden_layers=2, hidden_size=2048, moe_intermediate_size=768,
                               num_experts=128, num_experts_per_tok=8, num_attention_heads=32,
                               num_key_value_heads=4, head_dim=128).to_dict()
    cfg["model_type"] = "qwen3_moe"
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    assert main(["explain", str(path)]) == 0
    out = capsys.readouterr().out
    assert "meta device" in out and "E=128 top8" in out and "NOT verified" in out


@pytest.mark.parametrize("content, message", [
    (None, "neither a built-in model"),
    ("{not json", "not valid JSON"),
    ('{"hidden_size": 4}', "no 'model_type'"),
])
def test_explain_bad_model_argument(tmp_path, capsys, content, message):
    path = tmp_path / "config.json"
    if content is not None:
        path.write_text(content)
    assert main(["explain", str(path)]) == 2
    assert message in capsys.readouterr().out


def test_doctor(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "kernel_backend='auto' picks" in out


def test_module_entry_point_help():
    proc = subprocess.run([sys.executable, "-m", "moecc", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for command in ("demo", "explain", "autotune", "bench", "doctor", "export"):
        assert command in proc.stdout
