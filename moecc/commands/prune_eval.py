"""`moecc prune-eval MODEL...`: how much accuracy expert pruning costs on held-out text.

For each model: fraction of experts removed per layer (--fractions, plus 0) x criterion
(reap, frequency, random) x calibration domain (each domain of --data) -> bits per byte on
every domain, KL to the unpruned model and top-1 agreement, experts removed and bytes of
expert weights saved. Statistics come from the first half of the calibration domain's
windows; every score from the second half of each domain (moecc/pruning_eval.py). The
pruned model is the eager model with the experts masked, which the compile pass equals
(docs/pruning.md). Exit code 1 if any number is NaN or infinite.

    moecc prune-eval qwen3-moe-stdlib qwen3-moe-stdlib-noaux deepseek-v3-stdlib --json out/prune.json
    moecc prune-eval qwen3-moe-stdlib --fractions 0.25 --criteria reap frequency --max-bytes 20000
"""

from __future__ import annotations

import argparse
import json
import math


def register(sub) -> None:
    from moecc.models import TRAINED_MODELS
    from moecc.pruning import CRITERIA

    p = sub.add_parser("prune-eval", help="accuracy of expert pruning: fraction x criterion x calibration domain",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help=f"{', '.join(TRAINED_MODELS)} or model folders")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5],
                   help="fractions of each layer's experts to remove, in [0, 1) (default: 0.25 0.5)")
    p.add_argument("--criteria", nargs="+", default=list(CRITERIA), choices=CRITERIA)
    p.add_argument("--data", default=None, help="a text file or folder (default: the shipped held-out sample)")
    p.add_argument("--max-bytes", type=int, default=None, help="cap per domain (default: all)")
    p.add_argument("--batch", type=int, default=8, help="windows per forward pass")
    p.add_argument("--seed", type=int, default=0, help="seed of the random criterion")
    p.add_argument("--json", default=None, metavar="OUT", help="write every row as JSON here")
    p.add_argument("--markdown", default=None, metavar="OUT", help="write the tables as Markdown here")
    p.set_defaults(func=run)


def run(args) -> int:
    from rich.console import Console

    from moecc.eval_data import EvalDataError, domain_windows, load_texts
    from moecc.models import HELDOUT_DIR, build_model
    from moecc.pruning import PruningError
    from moecc.pruning_eval import prune_sweep, rows_to_dicts
    from moecc.routing_stats import RoutingStatsError

    console = Console(width=None if Console().is_terminal else 160, soft_wrap=True)
    if any(not 0 <= f < 1 for f in args.fractions):
        console.print(f"--fractions must lie in [0, 1) (fraction of experts removed); got {args.fractions}",
                      style="red")
        return 2
    if (args.max_bytes is not None and args.max_bytes < 2) or args.batch < 1:
        console.print("--max-bytes must be at least 2 and --batch positive", style="red")
        return 2
    results, bad = {}, False
    try:
        texts = load_texts(args.data or HELDOUT_DIR)
        for name in args.models:
            model = build_model(name)
            windows = domain_windows(texts, min(256, model.config.max_position_embeddings), args.max_bytes)
            rows, info = prune_sweep(model, windows, [f for f in args.fractions if f > 0], args.criteria,
                                     args.batch, args.seed)
            _print(console, name, rows, info)
            bad |= not all(math.isfinite(v) for r in rows for d in (r.bpb, r.kl, r.top1) for v in d.values())
            results[name] = {"info": info, "rows": rows_to_dicts(rows)}
    except (EvalDataError, FileNotFoundError, PruningError, RoutingStatsError, ValueError) as exc:
        console.print(str(exc), style="red", markup=False)
        return 2
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        console.print(f"wrote {args.json}", markup=False)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(markdown_table(name, r["rows"]) for name, r in results.items()))
        console.print(f"wrote {args.markdown}", markup=False)
    return 1 if bad else 0


def _print(console, name: str, rows, info) -> None:
    from rich.table import Table

    domains = list(rows[0].bpb)
    table = Table(title=f"{name}: held-out bits per byte with experts removed (calibrated on half of each domain, "
                        f"scored on the other half; {info['seconds']} s)")
    for col in ("removed", "criterion", "calibrated on"):
        table.add_column(col)
    for d in domains:
        table.add_column(f"bpb {d}", justify="right")
        table.add_column(f"vs 0% {d}", justify="right")
    for col in ("KL (nats/byte)", "top-1 agree", "experts", "MiB saved"):
        table.add_column(col, justify="right")
    base = rows[0].bpb
    for r in rows:
        cells = [f"{r.fraction:.0%}", r.criterion, r.calibration]
        for d in domains:
            cells += [f"{r.bpb[d]:.4f}", f"{(r.bpb[d] / base[d] - 1):+.1%}"]
        kl = sum(r.kl.values()) / len(r.kl)
        top1 = sum(r.top1.values()) / len(r.top1)
        cells += [f"{kl:.4f}", f"{top1:.3f}", f"{r.experts - r.removed}/{r.experts}", f"{r.bytes_saved / 2**20:.2f}"]
        table.add_row(*cells)
    console.print(table)
    for r in rows:
        for note in r.notes:
            console.print(f"  {r.fraction:.0%} {r.criterion} ({r.calibration}): {note}", markup=False)


def markdown_table(name: str, rows: list[dict]) -> str:
    """One model's rows (as in the JSON) as a Markdown table; KL and top-1 per domain."""
    domains = list(rows[0]["bpb"])
    head = ["removed", "criterion", "calibrated on"] + [f"bpb {d} (vs 0%)" for d in domains] + \
        [f"KL {d}" for d in domains] + [f"top-1 {d}" for d in domains] + ["experts kept", "KiB saved"]
    lines = [f"**{name}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = rows[0]["bpb"]
    for r in rows:
        cells = [f"{r['fraction']:.0%}", r["criterion"], r["calibration"]]
        cells += [f"{r['bpb'][d]:.4f} ({r['bpb'][d] / base[d] - 1:+.1%})" for d in domains]
        cells += [f"{r['kl'][d]:.4f}" for d in domains] + [f"{r['top1'][d]:.3f}" for d in domains]
        cells += [f"{r['experts'] - r['removed']}/{r['experts']}", f"{r['bytes_saved'] // 1024}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
