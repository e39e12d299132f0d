"""What routing statistics say, for `moecc explain --routing`: per-layer load, cold and
super-expert candidates, and communities of experts that fire together.

Definitions (docs/routing.md):
- load share: an expert's share of its layer's token-expert pairs;
- entropy: load entropy / log(E): 1 uniform, 0 every pair on one expert;
- cold: under 10% of a uniform share (as in `moecc eval`);
- super-expert candidate: largest intermediate |activation| above SUPER_FACTOR x the
  layer's median of that number (super experts, Su et al. 2025, carry massive activations
  that a few tokens depend on; pruning must keep them);
- communities: networkx greedy modularity communities of the co-activation graph (nodes
  experts, edge weight = tokens that selected both); unused experts are left out.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from moecc.evaluate import load_entropy

COLD_SHARE = 0.1     # of a uniform share
SUPER_FACTOR = 3.0   # x the layer's median largest activation


@dataclass
class LayerSummary:
    name: str
    experts: int
    tokens: int
    entropy: float
    cold: list[int]
    top: list[tuple[int, float]]       # (expert, load share), busiest first
    super_candidates: list[int]
    communities: list[list[int]] | None  # None when the statistics hold no co-activation


def coactivation_graph(layer):
    """networkx Graph: used experts as nodes (attribute `load`), co-activation counts as edge weights."""
    import networkx as nx

    g = nx.Graph()
    for e, c in enumerate(layer.counts):
        if c:
            g.add_node(e, load=c)
    if layer.coactivation is not None:
        for i in range(layer.experts):
            for j in range(i + 1, layer.experts):
                if layer.coactivation[i][j]:
                    g.add_edge(i, j, weight=layer.coactivation[i][j])
    return g


def communities(layer) -> list[list[int]] | None:
    """Experts that fire together, largest community first (greedy modularity, edge weights)."""
    from networkx.algorithms.community import greedy_modularity_communities

    if layer.coactivation is None:
        return None
    g = coactivation_graph(layer)
    if g.number_of_edges() == 0:
        return [[e] for e in g.nodes]
    found = greedy_modularity_communities(g, weight="weight")
    return sorted((sorted(c) for c in found), key=lambda c: (-len(c), c))


def summarize(layer, top: int = 3) -> LayerSummary:
    import torch

    share = layer.load()
    cold = [e for e, s in enumerate(share) if s < COLD_SHARE / layer.experts]
    busiest = sorted(range(layer.experts), key=lambda e: -share[e])[:top]
    supers = []
    if layer.max_activation is not None:
        median = statistics.median(layer.max_activation)
        supers = [e for e, a in enumerate(layer.max_activation) if median > 0 and a > SUPER_FACTOR * median]
    entropy = load_entropy(torch.tensor(layer.counts, dtype=torch.float64)) if sum(layer.counts) else 0.0
    return LayerSummary(layer.name, layer.experts, layer.tokens, entropy, cold,
                        [(e, share[e]) for e in busiest], supers, communities(layer))


def print_routing(console, stats) -> list[LayerSummary]:
    """Rich tables of per-layer load and co-activation communities; returns the summaries."""
    from rich.table import Table

    fp = stats.fingerprint
    console.print(f"routing statistics: {fp.model_type}, {len(stats.layers)} MoE layers, source {stats.source}, "
                  f"data {stats.data or '?'}", markup=False)
    summaries = [summarize(layer) for layer in stats.layers]
    t = Table(title="load per MoE layer (entropy 1 = uniform; cold < 10% of a uniform share)")
    for col in ("layer", "tokens", "entropy", "cold experts", "busiest experts (share)", "super-expert candidates"):
        t.add_column(col, justify="right")
    for s in summaries:
        busiest = ", ".join(f"#{e} {100 * v:.1f}%" for e, v in s.top)
        cold = f"{len(s.cold)}/{s.experts}" + (f" ({', '.join(map(str, s.cold))})" if s.cold else "")
        supers = ", ".join(f"#{e}" for e in s.super_candidates) or "-"
        t.add_row(s.name, str(s.tokens), f"{s.entropy:.3f}", cold, busiest, supers)
    console.print(t)
    t = Table(title="co-activation communities (networkx greedy modularity; experts that fire together)")
    t.add_column("layer")
    t.add_column("communities")
    for s in summaries:
        shown = "not recorded (counts-only statistics)" if s.communities is None else "  ".join(
            "{" + ", ".join(map(str, c)) + "}" for c in s.communities)
        t.add_row(s.name, shown)
    console.print(t)
    return summaries


def plot_routing(stats, path: str) -> None:
    """PNG: one bar chart of load share per expert for each MoE layer, cold threshold marked."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    n = len(stats.layers)
    fig = Figure(figsize=(max(6.0, 0.25 * max(stats.fingerprint.experts) + 2), 2.2 * n))
    axes = fig.subplots(n, 1, squeeze=False)
    for ax, layer in zip(axes[:, 0], stats.layers):
        share = [100 * s for s in layer.load()]
        ax.bar(range(layer.experts), share, color="tab:blue")
        ax.axhline(100 / layer.experts, color="gray", lw=0.8, ls="--", label="uniform")
        ax.axhline(100 * COLD_SHARE / layer.experts, color="tab:red", lw=0.8, ls=":", label="cold below")
        ax.set_title(f"{layer.name}: {layer.tokens} tokens", fontsize=9)
        ax.set_ylabel("load %")
    axes[-1, 0].set_xlabel("expert")
    axes[0, 0].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
