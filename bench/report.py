"""Turning records into results.json, a plot and the printed tables.

Summary per (implementation, mode), over the points that ran:
    geomean   geometric mean of floor / time (1.0 = at the roofline floor)
    worst     the lowest fraction, with its shape and M
    vs gmm    geometric mean of time(grouped_mm) / time(impl) at the same points and mode
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict

# Issue 3's targets for the moecc kernels and for end-to-end decode.
TARGET_GEOMEAN = 0.85
TARGET_WORST = 0.60
TARGET_SPEEDUP_VS_GROUPED_MM = 1.4
SCHEMA_VERSION = 1


def _geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def summarise(points: list[dict]) -> list[dict]:
    """One row per (implementation, mode) that has at least one measured point."""
    ok = [p for p in points if p.get("status") == "ok"]
    by_key: dict[tuple, list[dict]] = defaultdict(list)
    for p in ok:
        by_key[(p["impl"], p["mode"])].append(p)
    gmm = {(p["shape"], p["tokens"], p["mode"]): p["time_ms"] for p in ok if p["impl"] == "grouped_mm"}
    rows = []
    for (impl, mode), pts in sorted(by_key.items()):
        worst = min(pts, key=lambda p: p["fraction"])
        ratios = [gmm[(p["shape"], p["tokens"], mode)] / p["time_ms"] for p in pts
                  if (p["shape"], p["tokens"], mode) in gmm]
        rows.append({
            "impl": impl, "mode": mode, "points": len(pts),
            "geomean_fraction": _geomean([p["fraction"] for p in pts]),
            "worst_fraction": worst["fraction"], "worst_at": f"{worst['shape']} M={worst['tokens']}",
            "speedup_vs_grouped_mm": _geomean(ratios) if ratios else None,
        })
    return rows


def target_verdicts(rows: list[dict], impl: str = "moecc_triton") -> list[str]:
    """Plain statements of where `impl` stands against issue 3's kernel targets."""
    out = []
    for r in rows:
        if r["impl"] != impl:
            continue
        sp = r["speedup_vs_grouped_mm"]
        checks = [
            f"geomean {100 * r['geomean_fraction']:.0f}% (target >= {100 * TARGET_GEOMEAN:.0f}%): "
            f"{'met' if r['geomean_fraction'] >= TARGET_GEOMEAN else 'NOT met'}",
            f"worst {100 * r['worst_fraction']:.0f}% (target >= {100 * TARGET_WORST:.0f}%): "
            f"{'met' if r['worst_fraction'] >= TARGET_WORST else 'NOT met'}",
        ]
        if sp is not None:
            checks.append(f"{sp:.2f}x grouped_mm (target >= {TARGET_SPEEDUP_VS_GROUPED_MM}x): "
                          f"{'met' if sp >= TARGET_SPEEDUP_VS_GROUPED_MM else 'NOT met'}")
        out.append(f"{impl} [{r['mode']}]: " + "; ".join(checks))
    return out


def write_json(results: dict, out_dir: str) -> str:
    """Write results.json atomically (a partial run still leaves a readable file)."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "results.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"schema_version": SCHEMA_VERSION, **results}, f, indent=1, default=str)
    os.replace(tmp, path)
    return path


def plot_fractions(points: list[dict], path: str, title: str = "") -> str:
    """Fraction of the roofline floor against M: one subplot per shape, one colour per
    implementation; solid lines CUDA-graph replay, dashed eager."""
    from matplotlib.figure import Figure  # object API: renders with Agg, touches no pyplot state

    ok = [p for p in points if p.get("status") == "ok"]
    shapes = list(dict.fromkeys(p["shape"] for p in points)) or ["(no points)"]
    impl_names = list(dict.fromkeys(p["impl"] for p in points))
    colours = {name: f"C{i}" for i, name in enumerate(impl_names)}
    cols = min(2, len(shapes))
    rows = math.ceil(len(shapes) / cols)
    fig = Figure(figsize=(6 * cols, 4 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, shape in zip(axes, shapes):
        for name in impl_names:
            for mode, style in (("graph", "-"), ("eager", "--")):
                pts = sorted((p for p in ok if p["shape"] == shape and p["impl"] == name and p["mode"] == mode),
                             key=lambda p: p["tokens"])
                if pts:
                    ax.plot([p["tokens"] for p in pts], [p["fraction"] for p in pts], style, marker="o",
                            markersize=3, color=colours[name], label=f"{name} ({mode})")
        ax.set_xscale("log", base=2)
        ax.set_ylim(bottom=0)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_title(shape)
        ax.set_xlabel("tokens M")
        ax.set_ylabel("fraction of roofline floor")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for ax in axes[len(shapes):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=110)
    return path


def format_points(points: list[dict], mode: str) -> str:
    """Shape x M rows, one column per implementation: 'fraction% time_ms'."""
    pts = [p for p in points if p["mode"] == mode]
    impl_names = list(dict.fromkeys(p["impl"] for p in pts))
    if not pts:
        return ""
    cell = {(p["shape"], p["tokens"], p["impl"]): p for p in pts}
    floors = {(p["shape"], p["tokens"]): p for p in pts if "floor_ms" in p}
    width = {n: max(18, len(n)) for n in impl_names}
    head = f"{'shape':<22} {'M':>5} {'U':>4} {'floor ms':>9} | " + " | ".join(f"{n:>{width[n]}}" for n in impl_names)
    lines = [f"-- {mode}: fraction of floor (time ms) --", head]
    for shape, m in dict.fromkeys((p["shape"], p["tokens"]) for p in pts):
        f = floors.get((shape, m), {})
        row = f"{shape:<22} {m:>5} {f.get('distinct_experts', '-'):>4} {f.get('floor_ms', float('nan')):>9.4f} | "
        cells = []
        for n in impl_names:
            p = cell.get((shape, m, n), {})
            if p.get("status") == "ok":
                cells.append(f"{100 * p['fraction']:5.1f}% {p['time_ms']:9.4f}")
            else:
                cells.append(f"{p.get('status', '-'):>18}")
        lines.append(row + " | ".join(f"{c:>{width[n]}}" for c, n in zip(cells, impl_names)))
    return "\n".join(lines)


def format_ceilings(ceilings: dict) -> str:
    return (f"ceilings ({ceilings.get('device', '')}, measured this run): copy "
            f"{ceilings['copy_bandwidth_GBps']:.0f} GB/s (read + write), {ceilings.get('dtype', '')} matmul "
            f"{ceilings['matmul_peak_TFLOPs']:.1f} TFLOP/s")


def format_summary(rows: list[dict]) -> str:
    lines = []
    lines.append(f"{'implementation':<20} {'mode':<5} {'points':>6} {'geomean':>8} {'worst':>6}  "
                 f"{'worst at':<28} {'vs grouped_mm':>13}")
    for r in rows:
        sp = r["speedup_vs_grouped_mm"]
        lines.append(f"{r['impl']:<20} {r['mode']:<5} {r['points']:>6} {100 * r['geomean_fraction']:>7.1f}% "
                     f"{100 * r['worst_fraction']:>5.1f}%  {r['worst_at']:<28} "
                     f"{(f'{sp:.2f}x' if sp is not None else '-'):>13}")
    return "\n".join(lines)


def format_unavailable(points: list[dict]) -> str:
    """One line per (implementation, status, note) that did not run, deduplicated."""
    seen = dict.fromkeys((p["impl"], p["status"], p.get("note", "")[:160]) for p in points
                         if p.get("status") not in ("ok", "n/a"))
    return "\n".join(f"not measured: {impl} ({status}): {note}" for impl, status, note in seen)
