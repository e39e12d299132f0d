"""`moecc bench`: MoE-layer kernels against the roofline floor, and end-to-end decode.

    moecc bench --out DIR [--shapes ...] [--tokens ...] [--impl ...] [--quick] [--e2e]
    moecc bench --device cpu --quick --out DIR     # CPU smoke run of the harness (tiny shapes)
    moecc bench --cpu --e2e --out DIR              # CPU decode: eager, Inductor, moecc, llama.cpp

Writes DIR/results.json and DIR/fraction_of_floor.png and prints the tables, the summary
last. The harness lives in bench/ (imported as moecc.bench from a source checkout).
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="benchmark MoE layers against the roofline floor (needs a CUDA GPU)",
        description="Compare moecc's Triton MoE layer with a per-expert loop, torch._grouped_mm and "
                    "Inductor on the reference shapes, as time and as a fraction of the roofline floor "
                    "(copy bandwidth and matmul rate measured in the same run). Needs a CUDA GPU; "
                    "`--device cpu --quick` runs a tiny smoke version of the harness.")
    p.add_argument("--out", required=True, help="output folder for results.json and the plot")
    p.add_argument("--shapes", nargs="+", default=[], metavar="NAME", help="reference shapes (default: all)")
    p.add_argument("--tokens", nargs="+", type=int, default=[], metavar="M", help="token counts (default: all)")
    p.add_argument("--impl", nargs="+", default=[], metavar="NAME", dest="implementations",
                   help="implementations: reference loop grouped_mm inductor_grouped_mm moecc_triton")
    p.add_argument("--modes", nargs="+", default=["eager", "graph"], choices=["eager", "graph"])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="",
                   help="default: bf16 on a GPU, fp32 for the CPU smoke run")
    p.add_argument("--quick", action="store_true",
                   help="fewer token counts and repetitions (with --device cpu: tiny shapes)")
    p.add_argument("--e2e", action="store_true", help="also run end-to-end decode (transformers models)")
    p.add_argument("--e2e-only", action="store_true", help="only end-to-end decode")
    p.add_argument("--e2e-models", nargs="+", default=[], metavar="NAME")
    p.add_argument("--e2e-batches", nargs="+", type=int, default=None, metavar="B",
                   help="batch sizes of end-to-end decode (default 1 32 on a GPU, 1 8 with --cpu)")
    cpu = p.add_argument_group("CPU end-to-end decode (--cpu --e2e; bench/cpu_decode.py)")
    cpu.add_argument("--cpu", action="store_true",
                     help="with --e2e: greedy decode on this CPU of a Qwen3-30B-A3B-width model, eager vs static "
                          "cache + Inductor vs moecc vs llama.cpp (if installed), read bandwidth measured in the run")
    cpu.add_argument("--layers", type=int, default=4, help="decoder layers of the CPU model (default 4)")
    cpu.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    cpu.add_argument("--variants", nargs="+", default=["eager", "static", "moecc", "llama.cpp"],
                     choices=["eager", "static", "moecc", "llama.cpp"])
    cpu.add_argument("--precisions", nargs="+", default=[], metavar="P",
                     help="also moecc with options={'precision': P}, e.g. int8 int4 w8a8 w4a8 (moecc/precision.py); "
                          "P+linears also quantises attention and the LM head (quantize_linears)")
    cpu.add_argument("--rounds", type=int, default=1, help="processes per variant, interleaved; best median kept")
    cpu.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's default)")
    cpu.add_argument("--new-tokens", type=int, default=24, help="decode steps per generate() (default 24)")
    p.add_argument("--from-results", metavar="RESULTS_JSON",
                   help="measure nothing: print the tables and write the plot into --out from a results.json "
                        "(e.g. one fetched from a GPU machine without matplotlib)")
    p.add_argument("--time-budget", type=float, default=480.0, metavar="SECONDS",
                   help="work not started within this many seconds is recorded as skipped "
                        "(default 480: the whole run fits one 10-minute GPU command)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    import torch

    if args.cpu:
        return _cpu_decode(args)
    if args.from_results:
        from moecc.bench.run_all import rerender

        rerender(args.from_results, args.out)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("moecc bench needs a CUDA GPU: torch.cuda.is_available() is False on this machine "
              f"(torch {torch.__version__}). For the CPU smoke run of the harness, use "
              "`moecc bench --device cpu --quick --out DIR`.", file=sys.stderr)
        return 2
    if args.device == "cpu" and not args.quick:
        print("moecc bench --device cpu only runs with --quick (tiny shapes): CPU timings of the real "
              "shapes say nothing about the GPU kernels.", file=sys.stderr)
        return 2
    try:
        from moecc.bench.run_all import BenchOptions, run
    except ModuleNotFoundError as exc:
        print(f"moecc bench: the benchmark harness (bench/, imported as moecc.bench) is not importable "
              f"({exc}); run from a source checkout with PYTHONPATH=<repo root>.", file=sys.stderr)
        return 2
    opts = BenchOptions(
        out=args.out, shapes=tuple(args.shapes), tokens=tuple(args.tokens),
        implementations=tuple(args.implementations), modes=tuple(args.modes), device=args.device,
        dtype=args.dtype, quick=args.quick, e2e=args.e2e or args.e2e_only, kernels=not args.e2e_only,
        e2e_models=tuple(args.e2e_models), e2e_batches=tuple(args.e2e_batches or (1, 32)),
        time_budget_s=args.time_budget)
    try:
        results = run(opts)
    except (KeyError, ValueError) as exc:  # unknown shape / implementation names
        print(f"moecc bench: {exc}", file=sys.stderr)
        return 2
    failed = [c for c in results["checks"] if not c["ok"]]
    return 1 if failed else 0


def _cpu_decode(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    if not (args.e2e or args.e2e_only):
        print("moecc bench --cpu measures end-to-end decode: add --e2e (the MoE-layer comparison on a CPU "
              "is bench/bench_tvm_cpu.py)", file=sys.stderr)
        return 2
    bad = [n for n in ("layers", "rounds", "new_tokens") if getattr(args, n) < 1] + (
        ["threads"] if args.threads < 0 else []) + (["e2e-batches"] if any(b < 1 for b in args.e2e_batches or []) else [])
    if bad:
        print(f"moecc bench --cpu: {', '.join(bad)} must be positive", file=sys.stderr)
        return 2
    from moecc.bench.cpu_decode import CPUDecodeConfig, format_table, run
    from moecc.precision import PrecisionError, parse_precision

    for p in args.precisions:
        try:
            parse_precision(p.removesuffix("+linears"))
        except PrecisionError as exc:
            print(f"moecc bench --cpu --precisions: {exc}", file=sys.stderr)
            return 2

    cfg = CPUDecodeConfig(layers=args.layers, batches=tuple(args.e2e_batches or (1, 8)), dtypes=tuple(args.dtypes),
                          variants=tuple(args.variants), rounds=args.rounds, threads=args.threads,
                          new_tokens=args.new_tokens, precisions=tuple(args.precisions))
    command = "moecc bench " + " ".join(sys.argv[2:] if len(sys.argv) > 2 and sys.argv[1] == "bench" else [])
    results = run(cfg, args.out, command=command.strip())
    table = format_table(results)
    out = Path(args.out)
    (out / "cpu_decode.json").write_text(json.dumps(results, indent=1))
    (out / "cpu_decode.md").write_text(table + "\n")
    print(table)
    measured = [v for r in results["rows"] for v in r["variants"].values()]
    return 0 if measured else 1
