"""Expert placement (moecc/placement.py, `moecc plan-placement`): every expert placed with
balanced expert counts, the replication rule as documented, the traffic metric on a hand
example, never more traffic than round-robin and clearly less on the trained statistics,
and bad input refused with a message."""

from __future__ import annotations

import json

import pytest

from moecc.cli import main
from moecc.placement import PlacementError, place_layer, plan_placement
from moecc.routing_stats import LayerStats, RoutingStats
from routing_fixtures import trained_model, trained_stats


def _layer(counts, pairs, k=2):
    e = len(counts)
    co = [[0] * e for _ in range(e)]
    for (i, j), n in pairs.items():
        co[i][j] = co[j][i] = n
    return LayerStats("l", 0, e, k, sum(counts) // k, counts, coactivation=co)


@pytest.mark.parametrize("name", ["qwen3-moe-stdlib", "qwen3-moe-stdlib-noaux", "deepseek-v3-stdlib"])
@pytest.mark.parametrize("devices", [2, 3, 4, 8])
def test_every_expert_placed_balanced_and_no_worse_than_round_robin(name, devices):
    plan = plan_placement(trained_stats(name), devices)
    for layer in plan.layers:
        homes = [devs[0] for devs in layer.devices_of_expert]
        per_device = [homes.count(d) for d in range(devices)]
        assert sorted(set(per_device)) in ([16 // devices], [16 // devices, 16 // devices + 1])
        for e, devs in enumerate(layer.devices_of_expert):
            assert devs and len(set(devs)) == len(devs)
            assert all(e in layer.experts_on_device[d] for d in devs)
        assert sum(len(d) for d in layer.experts_on_device) == sum(len(d) for d in layer.devices_of_expert)
        assert layer.traffic <= layer.round_robin_traffic


def test_co_activation_placement_beats_round_robin_on_trained_statistics():
    # Measured on the shipped noaux model: about a third of round-robin's split pairs at N = 2.
    for name in ("qwen3-moe-stdlib", "qwen3-moe-stdlib-noaux"):
        plan = plan_placement(trained_stats(name), 2)
        assert all(layer.traffic < 0.8 * layer.round_robin_traffic for layer in plan.layers), name


def test_traffic_metric_on_a_hand_example():
    # Experts 0,1 fire together (10 tokens), 2,3 together (10), 0,2 once: the best split is {0,1} {2,3}.
    layer = _layer([11, 10, 11, 10], {(0, 1): 10, (2, 3): 10, (0, 2): 1})
    placed = place_layer(layer, 2, hot_factor=100.0)  # no copies
    assert sorted(sorted(d) for d in placed.experts_on_device) == [[0, 1], [2, 3]]
    assert placed.traffic == pytest.approx(1 / 21)
    assert placed.round_robin_traffic == pytest.approx(20 / 21)  # round-robin: {0, 2} {1, 3}


def test_replication_rule():
    # 8 experts, expert 0 takes half the load: load = 4 x mean > 2 x mean, so ceil(4 / 2) = 2 copies.
    counts = [16, 4, 2, 2, 2, 2, 2, 2]
    pairs = {(0, j): counts[j] for j in range(1, 8)}
    placed = place_layer(_layer(counts, pairs), 4)
    assert placed.replicated == [0]
    assert len(placed.devices_of_expert[0]) == 2 and all(len(d) == 1 for d in placed.devices_of_expert[1:])
    assert len(place_layer(_layer(counts, pairs), 4, hot_factor=1.5).devices_of_expert[0]) == 3  # ceil(4/1.5)
    assert place_layer(_layer(counts, pairs), 4, hot_factor=5.0).replicated == []


def test_bad_devices_and_counts_only_statistics_are_refused(tmp_path, capsys):
    stats = trained_stats("qwen3-moe-stdlib")
    for devices, message in ((0, "at least 1"), (17, "more devices than experts")):
        with pytest.raises(PlacementError, match=message):
            plan_placement(stats, devices)
    counts_only = RoutingStats.from_sglang(stats.to_sglang(), trained_model("qwen3-moe-stdlib"))
    with pytest.raises(PlacementError, match="no co-activation"):
        plan_placement(counts_only, 2)
    path = tmp_path / "s.json"
    stats.save(str(path))
    assert main(["plan-placement", str(path), "--devices", "0"]) == 2
    assert "at least 1" in capsys.readouterr().out
    (tmp_path / "cut.json").write_text(path.read_text()[:500])
    assert main(["plan-placement", str(tmp_path / "cut.json"), "--devices", "2"]) == 2
    assert "truncated" in capsys.readouterr().out


def test_plan_file(tmp_path, capsys):
    path, out = tmp_path / "s.json", tmp_path / "plan.json"
    trained_stats("qwen3-moe-stdlib-noaux").save(str(path))
    assert main(["plan-placement", str(path), "--devices", "4", "--out", str(out)]) == 0
    assert "round-robin traffic" in capsys.readouterr().out
    plan = json.loads(out.read_text())
    assert plan["format"] == "moecc-expert-placement" and plan["schema_version"] == 1 and plan["devices"] == 4
    assert [layer["name"] for layer in plan["layers"]] == plan["fingerprint"]["moe_layers"]
