"""`moecc eval` and `moecc.evaluate`: bad data fails with a message that says what to do;
the metrics detect a difference when there is one (so a pass means something); the CLI
prints the tables and writes JSON; `moecc demo` completes code with the trained default."""

from __future__ import annotations

import json
import math

import pytest
import torch

from moecc.cli import main
from moecc.eval_data import EvalDataError, domain_of, domain_windows, load_texts
from moecc.evaluate import EvalResult, _layer_routing, _score, load_entropy, moe_blocks

FAST = '{"kernel_backend": "reference", "rest_of_graph": "eager"}'


def test_missing_empty_and_binary_data_are_refused(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "a.py").write_text("def f():\n    return 1\n")
    (tmp_path / "mixed" / "blob.bin").write_bytes(bytes(range(256)))
    (tmp_path / "blank.txt").write_text("")
    cases = [(tmp_path / "nope", "no such file or folder"), (tmp_path / "empty", "holds no files"),
             (tmp_path / "mixed", "not UTF-8 text"), (tmp_path / "blank.txt", "every file is empty")]
    for path, message in cases:
        with pytest.raises(EvalDataError, match=message):
            load_texts(str(path))
        assert main(["eval", "qwen3-moe-stdlib", "--data", str(path)]) == 2
        assert message in capsys.readouterr().out


def test_bad_options_are_refused(capsys):
    assert main(["eval", "qwen3-moe-stdlib", "--options", "{kernel"]) == 2
    assert "not valid JSON" in capsys.readouterr().out
    assert main(["eval", "qwen3-moe-stdlib", "--options", "[1]"]) == 2
    assert "JSON object" in capsys.readouterr().out


def test_domains_and_windows(tmp_path):
    assert (domain_of("x.py"), domain_of("README.md"), domain_of("notes"), domain_of("a.csv")) == \
        ("code", "english", "english", "other")
    (tmp_path / "a.py").write_bytes(b"x" * 300)
    (tmp_path / "b.txt").write_bytes(b"hello")
    w = domain_windows(load_texts(str(tmp_path)), seq_len=128)
    assert w["code"].shape == (2, 128) and w["english"].shape == (1, 5)


def test_metrics_see_a_difference():
    torch.manual_seed(0)
    logits = torch.randn(4, 10, 256)
    targets = torch.randint(0, 256, (4, 10))
    nll_e, nll_c, kl, agree = _score(logits, logits.clone(), targets)
    assert nll_e == nll_c and kl == 0 and agree == 40
    _, _, kl, agree = _score(logits, logits + torch.randn_like(logits), targets)
    assert kl > 1e-2 and agree < 40
    _, _, kl, _ = _score(logits, torch.full_like(logits, float("nan")), targets)
    assert math.isnan(kl)
    assert load_entropy(torch.ones(8)) == pytest.approx(1.0)
    assert load_entropy(torch.tensor([5.0, 0, 0, 0])) == 0.0


def test_routing_flips_are_counted():
    from moecc.models import build_model

    model = build_model("qwen3-moe-tiny")
    name, block = moe_blocks(model)[0]
    x = torch.randn(64, model.config.hidden_size)
    same = _layer_routing(name, block, {"eager": [x], "compiled": [x.clone()]})
    moved = _layer_routing(name, block, {"eager": [x], "compiled": [torch.randn_like(x)]})
    assert same.flip_rate == 0 and same.eager_load == same.compiled_load
    assert moved.flip_rate > 0.3 and sum(moved.eager_load) == pytest.approx(1.0)


def test_eval_cli_prints_tables_and_writes_json(tmp_path, capsys, quiet):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "f.py").write_text("def add(a, b):\n    return a + b\n" * 20)
    (tmp_path / "data" / "g.txt").write_text("Return the sum of the two arguments.\n" * 20)
    out = tmp_path / "r.json"
    code = main(["eval", "qwen3-moe-stdlib", "--options", FAST, "--data", str(tmp_path / "data"),
                 "--max-bytes", "512", "--json", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "top-1 agree" in text and "flip rate" in text and "3 of 3 MoE layers captured" in text
    result = json.loads(out.read_text())
    assert set(result["domains"]) == {"code", "english"}
    assert result["overall"]["top1_agreement"] >= 0.999 and result["overall"]["kl"] <= 1e-5
    assert len(result["layers"]) == 3 and len(result["layers"][0]["eager_load"]) == 16
    assert set(result) >= {f for f in EvalResult.__dataclass_fields__}


def test_demo_completes_code_with_the_trained_default(capsys, quiet):
    code = main(["demo", "--kernel-backend", "reference", "--rest-of-graph", "eager", "--new-tokens", "12",
                 "--repeats", "1"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "def set_name" in out and "eager completion" in out and "ms/token" in out
    assert "completions identical" in out


def test_demo_refuses_a_too_long_generation(capsys):
    assert main(["demo", "--new-tokens", "1000"]) == 2
    assert "exceeds" in capsys.readouterr().out
