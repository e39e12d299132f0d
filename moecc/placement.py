"""Expert placement over N devices from routing statistics (`moecc plan-placement`).

Goal: experts that fire for the same token sit on the same device, so a token's k expert
evaluations need fewer devices; devices hold equal numbers of experts (memory balance);
hot experts get copies so that no device serves most of a layer's tokens alone.

Per MoE layer:
1. Partition (networkx): recursive Kernighan-Lin bisection of the co-activation graph
   (nodes experts, edge weight = tokens that selected both). Each split divides the
   devices into halves and deals the experts (in the starting order) to the devices in
   turn, so every device gets floor(E/N) or ceil(E/N) experts; KL's swaps keep those sizes
   and reduce the weight cut. Two starting points are tried (experts by load, dealt out in turn; and the
   round-robin split) and a third candidate is round-robin itself; the plan keeps the
   candidate with the least traffic, so it never has more than round-robin.
2. Replication rule: an expert whose load is above HOT_FACTOR x the layer's mean expert
   load gets copies = min(N, ceil(load / (HOT_FACTOR x mean))) in all, the extra ones on
   the devices with the least load that do not hold it; a token's work on it is split
   evenly among the copies.
3. Traffic, the number reported (from the statistics' pair counts, no per-token data
   needed): the share of co-activated expert pairs (for each token, every pair of its k
   experts) whose two experts share no device. For top-2 it is the fraction of tokens
   whose two experts run on different devices; a pair is local if any copy of one sits
   with any copy of the other. Also reported: load imbalance = max device load / mean.

The plan file (JSON, format "moecc-expert-placement", schema_version 1) is what the
expert-parallel runtime will read: per layer, `experts_on_device` [N][...] and
`devices_of_expert` [E][...] (first entry = the expert's home device).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

FORMAT = "moecc-expert-placement"
SCHEMA_VERSION = 1
HOT_FACTOR = 2.0


class PlacementError(ValueError):
    """Placement impossible with these arguments; the message says why."""


@dataclass
class LayerPlacement:
    name: str
    layer_index: int
    experts: int
    experts_on_device: list[list[int]]   # [N][...] every copy
    devices_of_expert: list[list[int]]   # [E][...] home device first
    replicated: list[int]                # experts with more than one copy
    traffic: float                       # share of co-activated pairs split across devices
    round_robin_traffic: float
    load_imbalance: float                # max device load / mean device load
    round_robin_load_imbalance: float
    method: str                          # which candidate won


@dataclass
class PlacementPlan:
    devices: int
    fingerprint: dict
    layers: list[LayerPlacement]
    hot_factor: float = HOT_FACTOR

    def to_dict(self) -> dict:
        return {"format": FORMAT, "schema_version": SCHEMA_VERSION, "devices": self.devices,
                "replication_rule": {"hot_factor": self.hot_factor,
                                     "copies": "min(N, ceil(load / (hot_factor * mean expert load)))"},
                "fingerprint": self.fingerprint, "layers": [asdict(layer) for layer in self.layers]}

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
            f.write("\n")


def _graph(layer):
    import networkx as nx

    g = nx.Graph()
    g.add_nodes_from(range(layer.experts))
    co = layer.coactivation
    for i in range(layer.experts):
        for j in range(i + 1, layer.experts):
            if co[i][j]:
                g.add_edge(i, j, weight=co[i][j])
    return g


def _split(g, experts: list[int], devices: list[int], order: list[int], seed: int) -> dict[int, int]:
    """{expert: device}: recursive KL bisection of `experts` over `devices`, starting from `order`."""
    from networkx.algorithms.community import kernighan_lin_bisection

    if len(devices) == 1:
        return {e: devices[0] for e in experts}
    left_devs, right_devs = devices[: len(devices) // 2], devices[len(devices) // 2:]
    ranked = [e for e in order if e in set(experts)]
    # Deal the ranked experts out to the devices in turn; the left devices' share starts the left half.
    left = {e for i, e in enumerate(ranked) if i % len(devices) < len(left_devs)}
    right = set(experts) - left
    if left and right:
        sub = g.subgraph(experts)
        a, b = kernighan_lin_bisection(sub, partition=(left, right), weight="weight", seed=seed)
        # KL keeps the two sizes but may return the halves in either order.
        left, right = (a, b) if len(a) == len(left) else (b, a)
    out = _split(g, sorted(left), left_devs, order, seed)
    out.update(_split(g, sorted(right), right_devs, order, seed))
    return out


def _replicate(home: dict[int, int], counts: list[int], n: int, hot_factor: float) -> list[list[int]]:
    """[E][...] devices of each expert: home first, copies for hot experts on the least loaded devices."""
    e_count = len(counts)
    mean = sum(counts) / e_count
    devices_of = [[home[e]] for e in range(e_count)]
    device_load = [0.0] * n
    for e in range(e_count):
        device_load[home[e]] += counts[e]
    for e in sorted(range(e_count), key=lambda e: -counts[e]):
        if mean == 0 or counts[e] <= hot_factor * mean:
            continue
        copies = min(n, math.ceil(counts[e] / (hot_factor * mean)))
        device_load[home[e]] -= counts[e]
        while len(devices_of[e]) < copies:
            devices_of[e].append(min((d for d in range(n) if d not in devices_of[e]), key=lambda d: device_load[d]))
        for d in devices_of[e]:
            device_load[d] += counts[e] / copies
    return devices_of


def _traffic(devices_of: list[list[int]], co) -> float:
    total = split = 0
    for i in range(len(devices_of)):
        for j in range(i + 1, len(devices_of)):
            if co[i][j]:
                total += co[i][j]
                if not set(devices_of[i]) & set(devices_of[j]):
                    split += co[i][j]
    return split / total if total else 0.0


def _imbalance(devices_of: list[list[int]], counts: list[int], n: int) -> float:
    load = [0.0] * n
    for e, devs in enumerate(devices_of):
        for d in devs:
            load[d] += counts[e] / len(devs)
    mean = sum(load) / n
    return max(load) / mean if mean else 1.0


def place_layer(layer, n: int, hot_factor: float = HOT_FACTOR, seed: int = 0) -> LayerPlacement:
    if layer.coactivation is None:
        raise PlacementError(f"{layer.name}: the statistics hold no co-activation counts (an SGLang dump has "
                             "only counts); record them with `moecc calibrate`")
    e_count = layer.experts
    g = _graph(layer)
    round_robin = {e: e % n for e in range(e_count)}
    by_load = sorted(range(e_count), key=lambda e: -layer.counts[e])
    candidates = {"round-robin": round_robin,
                  "kl-bisection from load order": _split(g, list(range(e_count)), list(range(n)), by_load, seed),
                  "kl-bisection from round-robin": _split(g, list(range(e_count)), list(range(n)),
                                                          sorted(range(e_count), key=lambda e: (e % n, e)), seed)}
    scored = {}
    for method, home in candidates.items():
        devs = _replicate(home, layer.counts, n, hot_factor)
        scored[method] = (_traffic(devs, layer.coactivation), _imbalance(devs, layer.counts, n), devs)
    rr_devs = [[e % n] for e in range(e_count)]  # the baseline: round-robin, no copies
    rr_traffic, rr_imbalance = _traffic(rr_devs, layer.coactivation), _imbalance(rr_devs, layer.counts, n)
    # Least traffic; ties go to the better-balanced plan.
    method = min(scored, key=lambda m: (round(scored[m][0], 12), scored[m][1]))
    traffic, imbalance, devs = scored[method]
    on_device = [sorted(e for e in range(e_count) if d in devs[e]) for d in range(n)]
    return LayerPlacement(layer.name, layer.layer_index, e_count, on_device, devs,
                          [e for e in range(e_count) if len(devs[e]) > 1], traffic, rr_traffic, imbalance,
                          rr_imbalance, method)


def plan_placement(stats, devices: int, *, hot_factor: float = HOT_FACTOR, seed: int = 0) -> PlacementPlan:
    """A placement of every MoE layer's experts over `devices` devices (see the module docstring)."""
    if not isinstance(devices, int) or isinstance(devices, bool) or devices < 1:
        raise PlacementError(f"--devices {devices!r}: give a whole number of devices, at least 1")
    smallest = min(layer.experts for layer in stats.layers)
    if devices > smallest:
        raise PlacementError(f"--devices {devices}: more devices than experts in a layer ({smallest}); "
                             f"give at most {smallest}")
    if not hot_factor > 1:
        raise PlacementError(f"hot_factor {hot_factor}: must be above 1 (a multiple of the mean expert load)")
    layers = [place_layer(layer, devices, hot_factor, seed) for layer in stats.layers]
    return PlacementPlan(devices, asdict(stats.fingerprint), layers, hot_factor)
