"""`moecc plan-placement STATS --devices N --out plan.json`: place experts over N devices.

STATS is a `moecc calibrate` file. Per MoE layer, experts that fire together go to the
same device (networkx Kernighan-Lin bisection of the co-activation graph, equal expert
counts per device), hot experts (load above 2x the mean) get copies; the table compares
the expected cross-device traffic (share of co-activated expert pairs on different
devices) and the load imbalance with a round-robin split (docs/routing.md).

    moecc plan-placement stats.json --devices 4 --out plan.json
"""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("plan-placement", help="partition experts over N devices from routing statistics",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stats", help="routing statistics from `moecc calibrate`")
    p.add_argument("--devices", type=int, required=True, help="number of devices (1 .. experts per layer)")
    p.add_argument("--out", default=None, help="write the plan (JSON) here")
    p.add_argument("--hot-factor", type=float, default=2.0,
                   help="replicate experts whose load exceeds this multiple of the mean (default 2)")
    p.set_defaults(func=run)


def run(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from moecc.placement import PlacementError, plan_placement
    from moecc.routing_stats import RoutingStatsError, load_stats

    console = Console(width=None if Console().is_terminal else 140, soft_wrap=True)
    try:
        stats = load_stats(args.stats)
        plan = plan_placement(stats, args.devices, hot_factor=args.hot_factor)
    except (RoutingStatsError, PlacementError) as exc:
        console.print(str(exc), style="red", markup=False)
        return 2
    t = Table(title=f"placement over {args.devices} devices (traffic: share of co-activated expert pairs "
                    "on different devices; imbalance: max device load / mean)")
    for col in ("layer", "traffic", "round-robin traffic", "imbalance", "round-robin imbalance", "replicated",
                "experts per device"):
        t.add_column(col, justify="right")
    for layer in plan.layers:
        t.add_row(layer.name, f"{100 * layer.traffic:.1f}%", f"{100 * layer.round_robin_traffic:.1f}%",
                  f"{layer.load_imbalance:.2f}", f"{layer.round_robin_load_imbalance:.2f}",
                  ", ".join(f"#{e}" for e in layer.replicated) or "-",
                  " ".join(str(len(d)) for d in layer.experts_on_device))
    console.print(t)
    if args.out:
        plan.save(args.out)
        console.print(f"wrote {args.out}", markup=False)
    return 0
