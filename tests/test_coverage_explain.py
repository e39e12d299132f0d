"""`moecc explain` on configs a new user tries first: a dense model and a mistyped field
end in one line that says what is wrong, never a transformers traceback."""

from __future__ import annotations

import json

from transformers import AutoConfig

from moecc.cli import main


def _write(tmp_path, model_type, **fields):
    cfg = AutoConfig.for_model(model_type, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=256).to_dict()
    cfg.update(fields, model_type=model_type)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    return path


def test_explain_dense_config_says_no_moe_layers(tmp_path, capsys):
    path = _write(tmp_path, "llama", intermediate_size=128)
    assert main(["explain", str(path)]) == 0
    out = capsys.readouterr().out
    assert "has no MoE layers" in out and "LlamaForCausalLM" in out
    assert "Traceback" not in out and "does not support setting experts" not in out


def test_explain_wrongly_typed_field_is_one_line_naming_it(tmp_path, capsys):
    path = _write(tmp_path, "qwen3_moe", num_experts="eight")
    assert main(["explain", str(path)]) == 2
    out = capsys.readouterr().out.strip()
    assert "field 'num_experts' is invalid" in out and "expected int" in out
    assert len(out.splitlines()) == 1, out
