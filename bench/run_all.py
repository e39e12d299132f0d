"""`moecc bench`: the kernel comparison, optionally end-to-end decode, JSON + PNG + tables.

    run(BenchOptions(out="bench-out"))       # on a CUDA GPU, every table
    run(BenchOptions(out=..., device="cpu", quick=True))   # CPU smoke run at tiny sizes

Order of work: ceilings (copy bandwidth, matmul rate), kernel sweep shape by shape
(results.json rewritten after each shape, so a run cut short still leaves its points),
then end-to-end decode, then the plot and the tables; the short summary table prints last.
A time budget spreads the run over the allowance: points past it are recorded as skipped.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import os
import platform
import sys
import time
from dataclasses import dataclass, replace

import torch

from moecc.shapes import REFERENCE_SHAPES, REFERENCE_TOKEN_COUNTS, shape_by_name
from . import report
from .implementations import CPU_DEFAULT, GPU_DEFAULT, IMPLEMENTATIONS
from .kernel_sweep import MODES, SweepConfig, run_sweep
from .roofline import dtype_name, measure_ceilings
from .workload import tiny_shape

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
QUICK_GPU_TOKENS = (1, 16, 256, 4096)
QUICK_CPU_TOKENS = (1, 4, 16)
GPU_TARGET_MS = 50.0  # timing budget per point; repetitions adapt (5 to 100)
E2E_SHARE = 0.45  # of the time budget kept for end-to-end decode when it runs


@dataclass(frozen=True)
class BenchOptions:
    out: str
    shapes: tuple[str, ...] = ()  # reference shape names; empty = all
    tokens: tuple[int, ...] = ()  # empty = the reference token counts (or the quick set)
    implementations: tuple[str, ...] = ()  # empty = the device's default set
    modes: tuple[str, ...] = MODES
    device: str = "cuda"
    dtype: str = ""  # empty = bf16 on a GPU, fp32 on a CPU
    quick: bool = False
    e2e: bool = False
    kernels: bool = True
    e2e_models: tuple[str, ...] = ()
    e2e_batches: tuple[int, ...] = (1, 32)
    time_budget_s: float = 480.0
    seed: int = 0


def resolve(opts: BenchOptions) -> tuple[SweepConfig, torch.dtype]:
    """Options -> the sweep to run (shapes, tokens, implementations, dtype)."""
    cpu = opts.device == "cpu"
    dtype = DTYPES[opts.dtype or ("fp32" if cpu else "bf16")]
    shapes = tuple(shape_by_name(n) for n in opts.shapes) if opts.shapes else REFERENCE_SHAPES
    if cpu:
        shapes = tuple(tiny_shape(s) for s in shapes)
    tokens = opts.tokens or (QUICK_CPU_TOKENS if cpu else QUICK_GPU_TOKENS if opts.quick else REFERENCE_TOKEN_COUNTS)
    names = opts.implementations or (CPU_DEFAULT if cpu else GPU_DEFAULT)
    unknown = set(names) - set(IMPLEMENTATIONS)
    if unknown:
        raise ValueError(f"unknown implementation(s) {sorted(unknown)}; known: {IMPLEMENTATIONS}")
    from .e2e_decode import MODELS

    unknown = set(opts.e2e_models) - set(MODELS)
    if unknown:
        raise ValueError(f"unknown end-to-end model(s) {sorted(unknown)}; known: {tuple(MODELS)}")
    cfg = SweepConfig(shapes=shapes, tokens=tuple(tokens), implementations=tuple(names), device=opts.device,
                      dtype=dtype, modes=("eager",) if cpu else tuple(opts.modes),
                      check_tokens=16 if cpu else 64, target_ms=20.0 if (cpu or opts.quick) else GPU_TARGET_MS,
                      min_reps=3 if cpu else 5, seed=opts.seed)
    return cfg, dtype


def environment(device: str) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "host": platform.node(),
           "device": device}
    for dist in ("triton", "transformers"):
        try:
            env[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            env[dist] = None
    if device == "cuda":
        from moecc.devices import current_device_key

        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, device_key=current_device_key(), sm=f"{props.major}{props.minor}",
                   num_sms=props.multi_processor_count, cuda=torch.version.cuda)
    return env


@contextlib.contextmanager
def _cpu_threads(device: str):
    """One intra-op thread for the CPU smoke run: its tiny ops only suffer from thread
    oversubscription on a shared machine. Restored afterwards."""
    if device != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run(opts: BenchOptions, log=lambda s: print(s, file=sys.stderr, flush=True)) -> dict:
    """Run everything asked for; returns the results dict (also written to opts.out)."""
    with _cpu_threads(opts.device):
        return _run(opts, log)


def _run(opts: BenchOptions, log) -> dict:
    start = time.monotonic()
    deadline = start + opts.time_budget_s
    cfg, dtype = resolve(opts)
    kernel_deadline = start + opts.time_budget_s * (1 - E2E_SHARE) if opts.e2e and opts.kernels else deadline
    cfg = replace(cfg, deadline=kernel_deadline)
    os.makedirs(opts.out, exist_ok=True)
    results: dict = {
        "out_dir": os.path.abspath(opts.out),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv), "environment": environment(opts.device), "dtype": dtype_name(dtype),
        "config": {"shapes": [s.name for s in cfg.shapes], "tokens": list(cfg.tokens),
                   "implementations": list(cfg.implementations), "modes": list(cfg.modes),
                   "quick": opts.quick, "time_budget_s": opts.time_budget_s},
        "points": [], "checks": [], "summary": [], "e2e": [],
    }
    log(f"[bench] measuring ceilings on {opts.device} ({dtype_name(dtype)})")
    ceilings = measure_ceilings(opts.device, dtype)
    results["ceilings"] = ceilings.to_dict()
    report.write_json(results, opts.out)

    if opts.kernels:
        def save(sweep):
            results.update(points=sweep.points, checks=sweep.checks, summary=report.summarise(sweep.points))
            report.write_json(results, opts.out)

        save(run_sweep(cfg, ceilings, on_shape_done=save, log=log))
        if opts.device == "cuda":  # measured again: how much the ceilings drifted during the sweep
            results["ceilings_after_sweep"] = measure_ceilings(opts.device, dtype).to_dict()
        results["plot"] = _plot(results, opts.out, log)

    if opts.e2e:
        from .e2e_decode import MODELS, E2EConfig, run_e2e

        e2e_cfg = E2EConfig(models=opts.e2e_models or tuple(MODELS), batches=tuple(opts.e2e_batches),
                            device=opts.device, dtype=dtype, tiny=opts.device == "cpu",
                            new_tokens=8 if opts.device == "cpu" else 32,
                            skip_steps=1 if opts.device == "cpu" else 4,
                            variants=("eager", "static") if opts.device == "cpu" else ("eager", "static", "moecc"),
                            seed=opts.seed, deadline=deadline,
                            reserve_compiled_s=0.0 if opts.device == "cpu" else 75.0)

        def save_e2e(records):
            results["e2e"] = records
            report.write_json(results, opts.out)

        save_e2e(run_e2e(e2e_cfg, ceilings.copy_bandwidth, log=log, on_record=save_e2e))

    results["elapsed_s"] = time.monotonic() - start
    report.write_json(results, opts.out)
    print(render(results), flush=True)
    return results


def _plot(results: dict, out_dir: str, log) -> str | None:
    """The PNG, or None where matplotlib is missing (the GPU machine may lack it: render it
    elsewhere from results.json with `moecc bench --from-results`)."""
    title = f"{results['environment'].get('gpu', results['environment'].get('device', ''))} " \
            f"{results['dtype']} {results['created']}"
    try:
        return report.plot_fractions(results["points"], os.path.join(out_dir, "fraction_of_floor.png"), title)
    except ImportError as exc:
        log(f"[bench] no plot: {exc}; render it where matplotlib is installed with "
            f"`moecc bench --from-results {os.path.join(out_dir, 'results.json')} --out DIR`")
        return None


def rerender(results_path: str, out_dir: str, log=lambda s: print(s, file=sys.stderr, flush=True)) -> dict:
    """Plot and tables again from a results.json (for example one fetched from a GPU machine)."""
    import json

    with open(results_path) as f:
        results = json.load(f)
    os.makedirs(out_dir, exist_ok=True)
    results["out_dir"] = os.path.abspath(out_dir)
    results["summary"] = report.summarise(results["points"])
    results["plot"] = _plot(results, out_dir, log) if results["points"] else None
    if os.path.abspath(results_path) != os.path.join(results["out_dir"], "results.json"):
        report.write_json({k: v for k, v in results.items() if k != "schema_version"}, out_dir)
    print(render(results), flush=True)
    return results


def resume_hints(results: dict) -> list[str]:
    """Commands that measure what the time budget skipped (one more GPU command each)."""
    budget = "time budget"
    shapes = list(dict.fromkeys(p["shape"] for p in results["points"]
                                if p.get("status") == "skipped" and budget in p.get("note", "")))
    models = list(dict.fromkeys(r["model"] for r in results.get("e2e", [])
                                if r.get("status") == "skipped" and budget in r.get("note", "")))
    hints = []
    if shapes:
        hints.append("skipped for time, to measure next: PYTHONPATH=. python -m moecc bench --out $OUT/more "
                     f"--shapes {' '.join(s.removesuffix('@tiny') for s in shapes)}")
    if models:
        hints.append("skipped for time, to measure next: PYTHONPATH=. python -m moecc bench --out $OUT/more "
                     f"--e2e-only --e2e-models {' '.join(models)}")
    return hints


def render(results: dict) -> str:
    """Every table, the short summary last."""
    from .e2e_decode import format_e2e

    parts = []
    for mode in ("eager", "graph"):
        table = report.format_points(results["points"], mode)
        if table:
            parts.append(table)
    unavailable = report.format_unavailable(results["points"])
    if unavailable:
        parts.append(unavailable)
    if results.get("e2e"):
        parts.append(format_e2e(results["e2e"]))
    if results.get("ceilings"):
        parts.append(report.format_ceilings(results["ceilings"]))
    if results.get("ceilings_after_sweep"):
        before, after = results["ceilings"], results["ceilings_after_sweep"]
        parts.append(f"  after the sweep: copy {after['copy_bandwidth_GBps']:.0f} GB/s "
                     f"({100 * (after['copy_bandwidth'] / before['copy_bandwidth'] - 1):+.1f}%), matmul "
                     f"{after['matmul_peak_TFLOPs']:.1f} TFLOP/s "
                     f"({100 * (after['matmul_peak'] / before['matmul_peak'] - 1):+.1f}%); fractions use the first")
    if results["summary"]:
        parts.append("== summary: fraction of roofline floor (geomean over shapes x M) ==")
        parts.append(report.format_summary(results["summary"]))
        parts += report.target_verdicts(results["summary"])
    parts += resume_hints(results)
    files = ["results.json"] + (["fraction_of_floor.png"] if results.get("plot") else [])
    parts.append(f"{' and '.join(files)} in {results['out_dir']} (run took {results.get('elapsed_s', 0):.0f} s)")
    return "\n".join(p for p in parts if p)
