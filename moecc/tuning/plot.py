"""`moecc autotune --plot`: fraction of the roofline floor against token count M.

One line per (device, shape, dtype) table; solid for tuned entries (time measured, floor
from bandwidth and matmul rate measured in the same run), dashed for predicted entries
(the cost model's time against the datasheet floor: a model, labelled as such).
Needs matplotlib (the `plot` extra); uses the non-interactive Agg backend.
"""

from __future__ import annotations

from pathlib import Path


def plot_roofline(rows, out_path: Path, title: str = "moecc MoE kernels: fraction of roofline floor") -> int:
    """Write the PNG; returns the number of lines drawn (0: nothing had measurements)."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install 'moecc[plot]'") from None
    fig, ax = plt.subplots(figsize=(8, 5))
    lines = 0
    for row in rows:
        points = sorted((m, e["roofline_fraction"], e.get("origin")) for m, e in row.entries.items()
                        if isinstance(e.get("roofline_fraction"), (int, float)))
        if not points:
            continue
        predicted = all(p[2] == "predicted" for p in points)
        label = f"{row.key.device} {row.key.shape_tag} {row.key.dtype}" + (" (predicted)" if predicted else "")
        ax.plot([p[0] for p in points], [p[1] for p in points], "--o" if predicted else "-o", label=label,
                markersize=3)
        lines += 1
    if lines:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens M")
        ax.set_ylabel("roofline floor / time (1.0 = at the floor)")
        ax.set_ylim(0, 1.05)
        ax.grid(True, alpha=0.3)
        ax.set_title(title)
        ax.legend(fontsize=7)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out_path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return lines
