"""`moecc demo`: compile a built-in MoE model with backend="moecc" and show what happened.

Builds a small transformers MoE model from a config (random weights, no downloads),
compiles it, and prints each captured layer, the largest difference from eager and
eager vs compiled time. Works on CPU and GPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def register(sub) -> None:
    from moecc.models import DEMO_MODEL

    p = sub.add_parser("demo", help="compile a built-in MoE model and compare it with eager",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEMO_MODEL, help=f"built-in name or config.json (default {DEMO_MODEL})")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--tokens", type=int, default=8, help="tokens per sequence")
    p.add_argument("--kernel-backend", default="auto", choices=["auto", "reference", "triton", "tvm"])
    p.add_argument("--rest-of-graph", default="inductor", choices=["inductor", "eager"])
    p.add_argument("--repeats", type=int, default=5, help="timed forward passes per variant")
    p.set_defaults(func=run)


def _median_seconds(fn, repeats: int, sync) -> float:
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(args) -> int:
    import torch
    from rich.console import Console
    from rich.table import Table

    import moecc
    from moecc.models import build_model

    console = Console(width=None if Console().is_terminal else 140, soft_wrap=True)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        console.print("[red]--device cuda: no CUDA GPU is visible[/red]")
        return 2
    dtype = getattr(torch, DTYPES[args.dtype or ("bf16" if device == "cuda" else "fp32")])
    if args.batch < 1 or args.tokens < 1 or args.repeats < 1:
        console.print("[red]--batch, --tokens and --repeats must be positive[/red]")
        return 2

    with console.status(f"building {args.model} ({dtype}, {device})"):
        model = build_model(args.model, dtype=dtype, device=device)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.tokens),
                        generator=torch.Generator().manual_seed(0)).to(device)
    report = moecc.CompileReport()
    compiled = torch.compile(model, backend="moecc", fullgraph=True, options={
        "report": report, "kernel_backend": args.kernel_backend, "rest_of_graph": args.rest_of_graph})
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.no_grad():
        eager_logits = model(ids).logits
        with console.status("compiling with backend='moecc' (first call)"):
            t0 = time.perf_counter()
            compiled_logits = compiled(ids).logits
            sync()
            compile_s = time.perf_counter() - t0
        eager_s = _median_seconds(lambda: model(ids), args.repeats, sync)
        compiled_s = _median_seconds(lambda: compiled(ids), args.repeats, sync)

    table = Table(title=f"MoE layers captured in {args.model}")
    for col in ("layer", "module", "experts impl", "description", "verified"):
        table.add_column(col)
    for c in report.captured:
        table.add_row(c.module_path, c.module_class, c.experts_implementation, c.spec.describe(),
                      "yes" if c.verified else "no")
    console.print(table)
    for s in report.skipped:
        console.print(f"[yellow]left alone[/yellow] {s.module_path}: {s.reason}")
    for g in report.graphs:
        for p in g.passes:
            console.print(f"pass {p.name}: " + ", ".join(f"{k}={v}" for k, v in p.counters.items()))
            for n in p.notes:
                console.print(f"    {n}")
    diff = (compiled_logits.float() - eager_logits.float()).abs().max().item()
    scale = eager_logits.float().abs().max().item()
    console.print(f"largest |compiled - eager| logit difference: {diff:.3e} (largest |logit| {scale:.3e})")
    console.print(f"forward of {args.batch}x{args.tokens} tokens, median of {args.repeats}: "
                  f"eager {eager_s * 1e3:.2f} ms, moecc {compiled_s * 1e3:.2f} ms "
                  f"({eager_s / compiled_s:.2f}x); first compiled call {compile_s:.1f} s")
    if not torch.isfinite(compiled_logits).all():
        console.print("[red]compiled logits contain NaN/inf[/red]")
        return 1
    return 0
