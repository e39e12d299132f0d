"""`moecc eval MODEL`: the eager model beside the moecc-compiled one on real text.

MODEL is a trained built-in name (qwen3-moe-stdlib, qwen3-moe-stdlib-noaux,
deepseek-v3-stdlib) or a folder with config.json + model.safetensors. Prints one table
per domain (bits per byte of both, KL of next-byte distributions, top-1 agreement) and
one per MoE layer (routing flip rate, load entropy, cold experts); --json writes all of
it, including per-expert loads. Exit code 1 if anything compiled is NaN/inf.

    moecc eval qwen3-moe-stdlib --options '{"kernel_backend": "tvm"}' --json out/eval.json
    moecc eval deepseek-v3-stdlib --data path/to/text_or_folder --max-bytes 20000
"""

from __future__ import annotations

import argparse
import json


def register(sub) -> None:
    from moecc.models import TRAINED_MODELS

    p = sub.add_parser("eval", help="eager vs compiled on held-out text: bits/byte, KL, top-1, routing flips",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help=f"{', '.join(TRAINED_MODELS)} or a model folder")
    p.add_argument("--options", default="{}", help='torch.compile(backend="moecc") options as JSON, e.g. '
                   '\'{"kernel_backend": "reference", "rest_of_graph": "eager"}\'')
    p.add_argument("--data", default=None, help="a text file or folder (default: the shipped held-out sample)")
    p.add_argument("--max-bytes", type=int, default=None, help="cap per domain (default: all)")
    p.add_argument("--batch", type=int, default=8, help="windows per forward pass")
    p.add_argument("--json", default=None, metavar="OUT", help="write the full result as JSON here")
    p.set_defaults(func=run)


def run(args) -> int:
    from rich.console import Console

    from moecc.eval_data import EvalDataError, load_texts

    console = Console(width=None if Console().is_terminal else 140, soft_wrap=True)
    try:
        options = json.loads(args.options)
    except json.JSONDecodeError as exc:
        console.print(f"--options is not valid JSON ({exc}); e.g. '{{\"kernel_backend\": \"tvm\"}}'",
                      style="red", markup=False)
        return 2
    if not isinstance(options, dict) or "report" in options:
        console.print("--options must be a JSON object of compile options (without 'report')", style="red")
        return 2
    if (args.max_bytes is not None and args.max_bytes < 2) or args.batch < 1:
        console.print("--max-bytes must be at least 2 and --batch positive", style="red")
        return 2
    try:
        if args.data is not None:
            load_texts(args.data)  # fail on bad data before loading and compiling the model
        from moecc.evaluate import evaluate
        from moecc.models import build_model

        model = build_model(args.model)
        result = evaluate(model, options, args.data, max_bytes=args.max_bytes, batch=args.batch,
                          model_name=args.model, progress=console.is_terminal)
    except (EvalDataError, FileNotFoundError) as exc:
        console.print(str(exc), style="red", markup=False)
        return 2
    print_result(console, result)
    if args.json:
        with open(args.json, "w") as f:
            f.write(result.to_json() + "\n")
        console.print(f"wrote {args.json}")
    if not result.finite:
        console.print("NaN/inf in the compiled model's outputs", style="red")
        return 1
    return 0


def print_result(console, result) -> None:
    from rich.table import Table

    opts = json.dumps(result.options) if result.options else "defaults"
    kernels = ", ".join(f"{k}={v}" for k, v in result.kernels.items() if v) or "none"
    console.print(f"{result.model}: {result.captured_layers} of {result.moe_layers} MoE layers captured "
                  f"(kernels: {kernels}); options {opts}; data {result.data}; windows of {result.seq_len} bytes",
                  markup=False)
    t = Table(title="next-byte prediction, eager vs compiled")
    for col in ("domain", "bytes", "unigram bpb", "eager bpb", "compiled bpb", "KL (nats/byte)", "top-1 agree"):
        t.add_column(col, justify="right")
    for d in list(result.domains.values()) + [result.overall]:
        t.add_row(d.domain, str(d.bytes_predicted), f"{d.unigram_bpb:.3f}", f"{d.eager_bpb:.4f}",
                  f"{d.compiled_bpb:.4f}", f"{d.kl:.2e}", f"{100 * d.top1_agreement:.3f}%")
    console.print(t)
    t = Table(title="routing per MoE layer (load entropy: 1 = uniform over experts)")
    for col in ("layer", "tokens", "flip rate", "eager load entropy", "compiled load entropy", "cold experts",
                "busiest expert"):
        t.add_column(col, justify="right")
    for layer in result.layers:
        top = max(range(layer.experts), key=lambda e: layer.eager_load[e])
        t.add_row(layer.layer, str(layer.tokens), f"{100 * layer.flip_rate:.3f}%", f"{layer.eager_entropy:.3f}",
                  f"{layer.compiled_entropy:.3f}", f"{layer.cold_experts}/{layer.experts}",
                  f"#{top} ({100 * layer.eager_load[top]:.1f}%)")
    console.print(t)
    console.print(f"time: eager {result.seconds['eager']:.1f} s, compiled {result.seconds['compiled']:.1f} s "
                  f"(first call compiles), total {result.seconds['total']:.1f} s")
