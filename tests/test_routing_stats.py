"""Routing statistics (moecc/routing_stats.py), `moecc calibrate` and `moecc explain --routing`:
the recorded numbers obey the invariants routing implies, REAP equals a direct evaluation
through the experts module, the file round-trips and reads as SGLang's stat dump, bad files
and other models are refused with a message that says what to do."""

from __future__ import annotations

import json
import math

import pytest
import torch

from moecc.cli import main
from moecc.routing_report import communities, summarize
from moecc.routing_stats import (LayerStats, RoutingStats, RoutingStatsError, _LayerAccumulator, load_stats,
                                 record_routing)
from routing_fixtures import MAX_BYTES, trained_model, trained_stats

TRAINED = ("qwen3-moe-stdlib", "qwen3-moe-stdlib-noaux", "deepseek-v3-stdlib")


@pytest.mark.parametrize("name", TRAINED)
def test_recorded_numbers_obey_routing_invariants(name):
    stats = trained_stats(name)
    tokens = 2 * MAX_BYTES  # code + English, every byte a token
    assert stats.fingerprint.moe_layers == [layer.name for layer in stats.layers]
    for layer in stats.layers:
        k, e = layer.top_k, layer.experts
        assert layer.tokens == tokens and sum(layer.counts) == tokens * k
        co = layer.coactivation
        assert all(co[i][j] == co[j][i] for i in range(e) for j in range(e)) and not any(co[i][i] for i in range(e))
        # Each routed pair of expert i co-occurs with the token's k-1 other experts.
        assert [sum(row) for row in co] == [c * (k - 1) for c in layer.counts]
        for c, r, a in zip(layer.counts, layer.reap, layer.max_activation):
            assert math.isfinite(r) and math.isfinite(a)
            assert (r == 0 and a == 0) if c == 0 else (r > 0 and a > 0)
    if name.startswith("qwen3"):  # renormalised top-k: the gate weights of a token sum to 1
        for layer in stats.layers:
            assert sum(layer.gate_weight_sum) == pytest.approx(layer.tokens, rel=1e-6)


def test_reap_equals_the_experts_module_output():
    model = trained_model("qwen3-moe-stdlib")
    block = model.model.layers[1].mlp
    x = torch.randn(12, model.config.hidden_size)  # [T, D]
    acc = _LayerAccumulator("l", 1, block)
    acc.add(x)
    got = acc.result()
    _, w, idx = block.gate(x)  # [T, k]
    sums, counts = torch.zeros(16, dtype=torch.float64), torch.zeros(16)
    with torch.no_grad():
        for t in range(12):
            for s in range(idx.shape[1]):
                e = int(idx[t, s])
                y = block.experts(x[t: t + 1], idx[t: t + 1, s: s + 1], torch.ones(1, 1))  # expert e alone
                sums[e] += float(w[t, s]) * float(y.norm())
                counts[e] += 1
    want = torch.where(counts > 0, sums / counts.clamp(min=1), torch.zeros_like(sums))
    assert got.reap == pytest.approx(want.tolist(), rel=1e-5, abs=1e-9)  # fp32 expert matmuls


def test_noaux_model_has_more_cold_experts_than_the_balanced_one():
    cold = {n: sum(len(summarize(layer).cold) for layer in trained_stats(n).layers)
            for n in ("qwen3-moe-stdlib", "qwen3-moe-stdlib-noaux")}
    assert cold["qwen3-moe-stdlib-noaux"] > cold["qwen3-moe-stdlib"]


def test_json_round_trip_and_sglang_view(tmp_path):
    stats = trained_stats("deepseek-v3-stdlib")
    path = tmp_path / "stats.json"
    stats.save(str(path))
    again = load_stats(str(path))
    assert again.to_dict() == stats.to_dict()
    again.check_model(trained_model("deepseek-v3-stdlib"))
    # SGLang's stat dump: logical_count [steps, layers, experts]; layer 0 is dense, a zero row.
    counts = stats.to_sglang()["logical_count"]
    assert tuple(counts.shape) == (1, 3, 16) and counts[0, 0].sum() == 0
    assert counts[0, 2].tolist() == stats.layers[1].counts
    # Back from an SGLang dump (object, .pt file, and our own JSON, which carries logical_count).
    torch.save(stats.to_sglang(), tmp_path / "dump.pt")
    for dump in (stats.to_sglang(), str(tmp_path / "dump.pt"), str(path)):
        back = RoutingStats.from_sglang(dump, trained_model("deepseek-v3-stdlib"))
        assert [layer.counts for layer in back.layers] == [layer.counts for layer in stats.layers]
        assert back.source == "sglang" and back.layers[0].reap is None
    with pytest.raises(RoutingStatsError, match="recorded on another model"):
        RoutingStats.from_sglang(stats.to_sglang(), trained_model("qwen3-moe-stdlib"))


def _corrupt(raw, how):
    layer = raw["layers"][0]
    if how == "counts":
        layer["counts"][0] += 1
    elif how == "nan":
        layer["reap"][0] = float("nan")
    elif how == "asymmetric":
        layer["coactivation"][0][1] += 1
    elif how == "experts":
        layer["counts"] = layer["counts"][:-1]
    elif how == "version":
        raw["schema_version"] = 99
    elif how == "format":
        del raw["format"]
    return raw


@pytest.mark.parametrize("how,message", [("counts", "counts sum to"), ("nan", "NaN"), ("asymmetric", "symmetric"),
                                         ("experts", "15 counts for 16 experts"), ("version", "schema_version 99"),
                                         ("format", "not a moecc routing-statistics file")])
def test_corrupted_files_are_refused(tmp_path, how, message):
    raw = _corrupt(trained_stats("qwen3-moe-stdlib").to_dict(), how)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(RoutingStatsError, match=message):
        load_stats(str(path))


def test_truncated_missing_and_foreign_statistics_are_refused(tmp_path, capsys):
    stats = trained_stats("qwen3-moe-stdlib")
    good = tmp_path / "stats.json"
    stats.save(str(good))
    cut = tmp_path / "cut.json"
    cut.write_text(good.read_text()[:1000])
    with pytest.raises(RoutingStatsError, match="truncated or not JSON"):
        load_stats(str(cut))
    with pytest.raises(RoutingStatsError, match="no such statistics file"):
        load_stats(str(tmp_path / "nope.json"))
    with pytest.raises(RoutingStatsError, match="recorded on another model: model_type"):
        stats.check_model(trained_model("deepseek-v3-stdlib"))
    from moecc.models import build_model

    wider = build_model("qwen3-moe-stdlib-noaux", num_experts=32, ignore_mismatched_sizes=True)
    with pytest.raises(RoutingStatsError, match="experts is"):
        stats.check_model(wider)
    assert main(["explain", "--routing", str(cut)]) == 2
    assert "truncated or not JSON" in capsys.readouterr().out


def test_summary_finds_super_experts_and_communities():
    # Two cliques {0,1,2} and {3,4,5} joined by one weak edge; expert 4 has a massive activation.
    co = [[0] * 6 for _ in range(6)]
    for group in ((0, 1, 2), (3, 4, 5)):
        for i in group:
            for j in group:
                co[i][j] = 0 if i == j else 50
    co[2][3] = co[3][2] = 1
    layer = LayerStats("l", 0, 6, 2, 151, [100, 100, 101, 101, 100, 100], coactivation=co,
                       max_activation=[1.0, 1.2, 0.9, 1.1, 40.0, 1.0])
    assert communities(layer) == [[0, 1, 2], [3, 4, 5]]
    assert summarize(layer).super_candidates == [4]


def test_calibrate_explain_cli(tmp_path, capsys):
    out, png = tmp_path / "s.json", tmp_path / "load.png"
    assert main(["calibrate", "qwen3-moe-stdlib-noaux", "--data", "moecc/trained/heldout/english",
                 "--out", str(out), "--max-bytes", "1024"]) == 0
    stats = load_stats(str(out))
    assert stats.layers[0].tokens == 1024 and "english" in stats.data
    capsys.readouterr()
    assert main(["explain", "--routing", str(out), "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert "model.layers.2.mlp" in text and "communities" in text and "cold" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["calibrate", "qwen3-moe-stdlib", "--data", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "no such file or folder" in capsys.readouterr().out
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)))
    assert main(["calibrate", "qwen3-moe-stdlib", "--data", str(tmp_path / "blob.bin"), "--out", str(out)]) == 2
    assert "not UTF-8 text" in capsys.readouterr().out
    assert main(["explain"]) == 2
    assert "needs a MODEL" in capsys.readouterr().out
    assert main(["explain", "qwen3-moe-tiny", "--routing", str(out)]) == 2


def test_unreadable_experts_layout_is_refused():
    from moecc.models import build_model

    model = build_model("qwen3-moe-tiny")
    model.model.layers[0].mlp.experts.down_proj = torch.nn.Parameter(torch.zeros(8, 3, 3))
    with pytest.raises(RoutingStatsError, match="not in the layout"):
        record_routing(model, [torch.zeros(1, 4, dtype=torch.long)])


def test_public_names():
    import moecc

    assert moecc.record_routing is record_routing and moecc.load_stats is load_stats
