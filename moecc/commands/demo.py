"""`moecc demo`: compile a built-in MoE model with backend="moecc" and show what happened.

With a trained model (the default, qwen3-moe-stdlib: a byte-level model shipped with
moecc, see docs/models.md) it completes a Python function greedily, eager beside
compiled (static cache, transformers' CompileConfig(backend="moecc")), and prints both
completions and the milliseconds per decoded token of each. With a random-weight config
(qwen3-moe-demo, the *-tiny models, a config.json) it compares one forward pass: largest
logit difference and eager vs compiled time. Both print every captured layer. CPU and GPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# The trained models are small (about 2.3 bits per byte on held-out code): they complete
# common idioms such as a raise statement, not whole algorithms.
DEMO_PROMPT = "def set_name(self, name):\n    if not isinstance(name, str):\n        raise "


def register(sub) -> None:
    from moecc.models import DEMO_MODEL

    p = sub.add_parser("demo", help="compile a built-in MoE model and compare it with eager",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEMO_MODEL, help=f"built-in name, trained model folder or config.json "
                   f"(default {DEMO_MODEL})")
    p.add_argument("--prompt", default=DEMO_PROMPT, help="trained models: the text to complete")
    p.add_argument("--new-tokens", type=int, default=24, help="trained models: bytes to generate")
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

    import moecc
    from moecc.models import build_model

    console = Console(width=None if Console().is_terminal else 140, soft_wrap=True)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        console.print("[red]--device cuda: no CUDA GPU is visible[/red]")
        return 2
    dtype = getattr(torch, DTYPES[args.dtype or ("bf16" if device == "cuda" else "fp32")])
    if args.batch < 1 or args.tokens < 1 or args.repeats < 1 or args.new_tokens < 1:
        console.print("[red]--batch, --tokens, --new-tokens and --repeats must be positive[/red]")
        return 2
    from moecc.models import trained_model_dir

    try:
        trained = trained_model_dir(args.model)
    except FileNotFoundError as exc:
        console.print(str(exc), style="red", markup=False)
        return 2
    if trained is not None:
        return _run_generation(args, console, device, dtype)

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

    _print_report(console, args.model, report)
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


def _print_report(console, model_name: str, report) -> None:
    from rich.table import Table

    table = Table(title=f"MoE layers captured in {model_name}")
    for col in ("layer", "module", "experts impl", "description", "verified"):
        table.add_column(col)
    seen = set()
    for c in report.captured:  # generate() compiles prefill and decode: one row per layer
        if c.module_path in seen:
            continue
        seen.add(c.module_path)
        table.add_row(c.module_path, c.module_class, c.experts_implementation, c.spec.describe(),
                      "yes" if c.verified else "no")
    console.print(table)
    for s in report.skipped:
        console.print(f"[yellow]left alone[/yellow] {s.module_path}: {s.reason}")
    for g in report.graphs[:1]:
        for p in g.passes:
            console.print(f"pass {p.name}: " + ", ".join(f"{k}={v}" for k, v in p.counters.items()))
            for n in p.notes:
                console.print(f"    {n}")


def _run_generation(args, console, device: str, dtype) -> int:
    """Trained model: greedy completion of args.prompt, eager beside compiled, ms per token."""
    import torch
    from transformers.generation.configuration_utils import CompileConfig

    import moecc
    from moecc.models import build_model
    from moecc.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    with console.status(f"loading {args.model} ({dtype}, {device})"):
        model = build_model(args.model, dtype=dtype, device=device)
    ids = tok(args.prompt, return_tensors="pt")["input_ids"].to(device)
    max_len = model.config.max_position_embeddings
    if ids.shape[1] + args.new_tokens > max_len:
        console.print(f"[red]prompt ({ids.shape[1]} bytes) + --new-tokens ({args.new_tokens}) exceeds the model's "
                      f"{max_len} positions; shorten one[/red]")
        return 2
    report = moecc.CompileReport()
    compile_config = CompileConfig(backend="moecc", mode=None, fullgraph=True, options={
        "report": report, "kernel_backend": args.kernel_backend, "rest_of_graph": args.rest_of_graph})
    compile_config._compile_all_devices = True  # transformers compiles decode on CUDA only unless told
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def generate(**extra):
        return model.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                              do_sample=False, cache_implementation="static", pad_token_id=0, **extra)

    with torch.no_grad():
        eager_out = generate()
        with console.status("compiling with backend='moecc' (prefill and decode step)"):
            t0 = time.perf_counter()
            compiled_out = generate(compile_config=compile_config)
            sync()
            compile_s = time.perf_counter() - t0
        eager_s = _median_seconds(generate, args.repeats, sync)
        compiled_s = _median_seconds(lambda: generate(compile_config=compile_config), args.repeats, sync)
    _print_report(console, args.model, report)
    n_prompt = ids.shape[1]
    console.print("prompt:", style="bold")
    console.print(args.prompt, markup=False, highlight=False)
    for label, out in (("eager", eager_out), ("compiled (moecc)", compiled_out)):
        console.print(f"{label} completion:", style="bold")
        console.print(tok.decode(out[0, n_prompt:]), markup=False, highlight=False)
    same = torch.equal(eager_out, compiled_out)
    console.print("completions identical" if same else "[yellow]completions differ[/yellow] (near-tied bytes "
                  "can flip under different kernel arithmetic)")
    per_tok = 1e3 / args.new_tokens
    console.print(f"greedy generation of {args.new_tokens} bytes (static cache), median of {args.repeats}: "
                  f"eager {eager_s * per_tok:.2f} ms/token, moecc {compiled_s * per_tok:.2f} ms/token "
                  f"({eager_s / compiled_s:.2f}x); first compiled generate (compiles) {compile_s:.1f} s")
    return 0
