"""`moecc calibrate MODEL --data PATH --out stats.json`: routing statistics of the eager model.

MODEL is a trained built-in name (qwen3-moe-stdlib, qwen3-moe-stdlib-noaux,
deepseek-v3-stdlib), any built-in name, or a folder with config.json + model.safetensors.
PATH is a text file or folder (read as `moecc eval` reads it: every domain's text cut into
windows of the model's context, at most 256 bytes). Writes per layer and expert: token
counts, summed gate weight, REAP score, largest intermediate activation, co-activation
counts (docs/routing.md); the file also carries SGLang's stat-mode `logical_count`.

    moecc calibrate qwen3-moe-stdlib-noaux --data moecc/trained/heldout --out stats.json
    moecc explain --routing stats.json --plot load.png
    moecc plan-placement stats.json --devices 4 --out plan.json
"""

from __future__ import annotations

import argparse


def register(sub) -> None:
    from moecc.models import TRAINED_MODELS

    p = sub.add_parser("calibrate", help="record routing statistics (load, REAP, co-activation) on text",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help=f"{', '.join(TRAINED_MODELS)}, another built-in name, or a model folder")
    p.add_argument("--data", required=True, help="a text file or folder of text files")
    p.add_argument("--out", required=True, help="where to write the statistics (JSON)")
    p.add_argument("--max-bytes", type=int, default=None, help="cap per domain (default: all)")
    p.add_argument("--batch", type=int, default=8, help="windows per forward pass")
    p.set_defaults(func=run)


def run(args) -> int:
    from rich.console import Console

    from moecc.eval_data import EvalDataError, domain_windows, load_texts
    from moecc.routing_stats import RoutingStatsError

    console = Console(width=None if Console().is_terminal else 140, soft_wrap=True)
    if (args.max_bytes is not None and args.max_bytes < 2) or args.batch < 1:
        console.print("--max-bytes must be at least 2 and --batch positive", style="red")
        return 2
    try:
        texts = load_texts(args.data)  # bad data fails before the model is built
        from moecc.models import build_model
        from moecc.routing_stats import record_routing

        model = build_model(args.model)
        seq_len = min(256, model.config.max_position_embeddings)
        windows = domain_windows(texts, seq_len, args.max_bytes)  # {domain: [N, W]}
        batches = [w[i: i + args.batch] for w in windows.values() for i in range(0, len(w), args.batch)]
        described = ", ".join(f"{dom} {w.numel()} bytes" for dom, w in windows.items())
        stats = record_routing(model, batches, data=f"{args.data} ({described})", progress=console.is_terminal,
                               description=f"calibrate {args.model}")
        stats.extra = {"model": args.model, "seq_len": seq_len, "max_bytes": args.max_bytes}
        stats.save(args.out)
    except (EvalDataError, FileNotFoundError, RoutingStatsError, ValueError) as exc:
        console.print(str(exc), style="red", markup=False)
        return 2
    tokens = stats.layers[0].tokens
    console.print(f"{args.model}: {len(stats.layers)} MoE layers, {tokens} tokens ({described}); "
                  f"wrote {args.out}", markup=False)
    return 0
