"""Timing candidate configurations on the local CUDA GPU and recording the best per M.

One `tune_table` call tunes one table (device, op, strategy, shape, dtype) for the token
counts asked for:
  1. candidates per M: search.py's space for the strategies allowed at M, pruned by the
     device profile (shared memory; AOT compile check when available);
  2. resume: every (M, config) already in the trials journal in the output folder
     ("<table>.trials.jsonl", one JSON line per measurement, failures included) is
     skipped;
  3. per candidate: run on random inputs and compare with moecc.backends.reference
     (relative max error bound per dtype); a config that fails to build, run or match
     is journaled as failed and never timed;
  4. time it on *fresh* random inputs under CUDA-graph replay
     (triton.testing.do_bench_cudagraph, median); if the launch cannot be captured,
     with triton.testing.do_bench and the entry says timing "eager";
  5. journal the measurement, and merge it into the table (file lock, atomic replace)
     when it is the best so far for that M: partial results survive an interruption.
The budget is checked between measurements. Ceilings for the roofline floor (copy
bandwidth, large bf16 matmul rate) are measured once per run, in the same process.

Assumptions: the kernel is `moecc.backends.triton.moe_layer(hidden, weights, spec,
config=KernelConfig)` taking canonical weights (gate_up [E, 2N, K], down [E, K, N]);
a softmax top-k router with renormalisation stands for every router (routing cost is
not what is tuned). Needs torch with CUDA and triton; imported only by the CLI.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from moecc.tuning.keys import STRATEGY_AUTO, TableKey
from moecc.tuning.search import allowed_strategies, dtype_bytes, pruned_candidates
from moecc.tuning.store import file_lock, merge_entries, now_utc, read_table, CorruptTableError

TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
MAX_REL_ERROR = {"bf16": 3e-2, "fp16": 1e-2, "fp32": 1e-4}


class NoGPUError(RuntimeError):
    """Tuning was asked for on a machine without a CUDA GPU."""


def require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        raise NoGPUError(
            "moecc autotune needs a CUDA GPU to time kernels, and none is visible here "
            "(torch.cuda.is_available() is False). To write predicted tables for a GPU you "
            "do not have, run e.g.: moecc autotune --predict --device rtx4090"
        )


@dataclass(frozen=True)
class Ceilings:
    bandwidth_gbps: float  # device-to-device copy, (read + write) bytes / time
    peak_tflops: float  # large dense bf16 matmul


def measure_ceilings() -> Ceilings:
    """Copy bandwidth and bf16 matmul rate of the current GPU, measured now."""
    import torch
    from triton.testing import do_bench

    src = torch.empty(512 * 1024 * 1024, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    bw = 2 * src.numel() / (ms * 1e-3) / 1e9
    del src, dst
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b, return_mode="median")
    peak = 2 * 8192**3 / (ms * 1e-3) / 1e12
    return Ceilings(bw, peak)


def roofline_floor_s(shape: tuple, dtype: str, num_tokens: int, active_experts: int, c: Ceilings) -> float:
    """ARCHITECTURE.md's floor: max(bytes / BW, flops / PEAK) for one layer."""
    e, n, k, top_k = shape
    weight_bytes = active_experts * 3 * n * k * dtype_bytes(dtype)
    act_bytes = 2 * num_tokens * k * 2  # hidden in and out, 16-bit activations
    flops = 2 * num_tokens * top_k * 3 * n * k
    return max((weight_bytes + act_bytes) / (c.bandwidth_gbps * 1e9), flops / (c.peak_tflops * 1e12))


@dataclass
class Problem:
    """Canonical weights and spec for one shape on the GPU (built once per table)."""

    spec: object
    weights: object
    shape: tuple
    dtype: str

    def hidden(self, num_tokens: int, seed: int):
        import torch

        g = torch.Generator(device="cuda").manual_seed(seed)
        return torch.randn(num_tokens, self.shape[2], device="cuda", generator=g,
                           dtype=getattr(torch, TORCH_DTYPES[self.dtype]))


def make_problem(shape: tuple, dtype: str, seed: int = 0) -> Problem:
    import torch

    from moecc.spec import ExpertSpec, MoELayerSpec, RouterSpec
    from moecc.weights import make_weights

    e, n, k, top_k = shape
    tdt = getattr(torch, TORCH_DTYPES[dtype])
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rand(*dims, scale):
        return (torch.randn(*dims, device="cuda", generator=g, dtype=tdt) * scale)

    spec = MoELayerSpec(RouterSpec(e, top_k, "softmax", renormalize=True), ExpertSpec(k, n))
    weights = make_weights(router_weight=rand(e, k, scale=k**-0.5), gate_up=rand(e, 2 * n, k, scale=k**-0.5),
                           down=rand(e, k, n, scale=n**-0.5))
    return Problem(spec, weights, tuple(shape), dtype)


def active_experts(problem: Problem, hidden) -> int:
    from moecc.backends.reference import route, router_logits

    logits = router_logits(hidden, problem.weights.router_weight, problem.weights.router_bias,
                           problem.spec.router)
    _, ids = route(logits, problem.spec.router, problem.weights.correction_bias)
    return int(ids.unique().numel())


# -- the trials journal (resume) ----------------------------------------------------
def config_ident(num_tokens: int, cfg: dict) -> str:
    return f"{num_tokens}|" + json.dumps(cfg, sort_keys=True)


def journal_path(table_path: Path) -> Path:
    return table_path.with_name(table_path.name[: -len(".json")] + ".trials.jsonl")


def read_journal(path: Path) -> dict[str, dict]:
    """Measured (M, config) -> record; a torn last line (killed tuner) is ignored."""
    done: dict[str, dict] = {}
    if not path.exists():
        return done
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
            done[config_ident(int(rec["M"]), rec["config"])] = rec
        except (ValueError, KeyError, TypeError):
            continue
    return done


def append_journal(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path), open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


@dataclass
class TuneReport:
    measured: int = 0
    skipped: int = 0
    failed: int = 0
    out_of_budget: bool = False
    best: dict = field(default_factory=dict)  # M -> entry


def plan(key: TableKey, batches: list[int], profile, fit_mode: str = "auto") -> list[tuple[int, object]]:
    """[(M, KernelConfig)] to try, in order: per M, the strategies allowed and the fitting configs."""
    todo = []
    for m in batches:
        strategies = allowed_strategies(m, key.shape) if key.strategy == STRATEGY_AUTO else (key.strategy,)
        for strat in strategies:
            todo.extend((m, cfg) for cfg in pruned_candidates(strat, m, key.shape, key.dtype, profile, fit_mode)[0])
    return todo


def tune_table(key: TableKey, table_path: Path, batches: list[int], profile, *, deadline: float,
               progress: Callable[[str], None] | None = None, advance: Callable[[], None] | None = None,
               on_corrupt=None, fit_mode: str = "auto", ceilings: Ceilings | None = None) -> TuneReport:
    """Tune one table on the current GPU until done or `deadline` (time.monotonic())."""
    import torch
    from triton.testing import do_bench, do_bench_cudagraph

    from moecc.backends import reference
    from moecc.backends.triton import moe_layer
    from moecc.backends.triton.config import KernelConfig

    require_cuda()
    ceilings = ceilings or measure_ceilings()
    report = TuneReport()
    journal = journal_path(table_path)
    done = read_journal(journal)
    best: dict[int, dict] = {}
    if table_path.exists():
        try:
            best = dict(read_table(table_path)["entries"])
        except CorruptTableError as exc:
            if on_corrupt:
                on_corrupt(exc)
    problem = make_problem(key.shape, key.dtype)
    checked_inputs: dict[int, tuple] = {}  # M -> (hidden, reference output, active experts)
    for m, cfg in plan(key, batches, profile, fit_mode):
        ident = config_ident(m, cfg.to_dict())
        if ident in done:
            report.skipped += 1
            if advance:
                advance()
            continue
        if time.monotonic() >= deadline:
            report.out_of_budget = True
            break
        if progress:
            progress(f"M={m} {cfg.strategy} BM{cfg.block_m} BN{cfg.block_n} BK{cfg.block_k} "
                     f"s{cfg.num_stages} w{cfg.num_warps}")
        if m not in checked_inputs:
            x = problem.hidden(m, seed=1000 + m)
            checked_inputs[m] = (x, reference.moe_layer(x, problem.weights, problem.spec))
        x, ref = checked_inputs[m]
        record = {"M": m, "config": cfg.to_dict(), "at": now_utc()}
        try:
            out = moe_layer(x, problem.weights, problem.spec, config=cfg)
            err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)).item()
            if not math.isfinite(err) or err > MAX_REL_ERROR.get(key.dtype, 3e-2):
                raise ValueError(f"wrong result: max relative error {err:.3g}")
            fresh = problem.hidden(m, seed=int(time.time_ns() % 2**31))
            fn = lambda: moe_layer(fresh, problem.weights, problem.spec, config=cfg)  # noqa: E731
            try:
                ms, timing = do_bench_cudagraph(fn, rep=20, return_mode="median"), "cudagraph"
            except Exception:
                ms, timing = do_bench(fn, return_mode="median"), "eager"
            floor = roofline_floor_s(key.shape, key.dtype, m, active_experts(problem, fresh), ceilings)
            record.update(ok=True, time_us=ms * 1e3, timing=timing)
            entry = {"config": cfg.to_dict(), "origin": "tuned", "time_us": round(ms * 1e3, 3),
                     "floor_us": round(floor * 1e6, 3), "roofline_fraction": round(floor / (ms * 1e-3), 4),
                     "bandwidth_gbps": round(ceilings.bandwidth_gbps, 1),
                     "peak_tflops": round(ceilings.peak_tflops, 1), "timing": timing,
                     "max_rel_error": round(err, 5), "updated": now_utc()}
            report.measured += 1
            old = best.get(m)
            if old is None or old.get("origin") != "tuned" or entry["time_us"] < old.get("time_us", math.inf):
                best[m] = entry
                merge_entries(table_path, key, {m: entry}, on_corrupt=on_corrupt)
        except Exception as exc:  # a config that cannot build or run is a result, not a crash
            try:
                torch.cuda.synchronize()
            except Exception:
                pass  # a sticky CUDA error: the next config reports it too
            record.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:300]}")
            report.failed += 1
        append_journal(journal, record)
        if advance:
            advance()
    report.best = best
    return report


def parse_budget(text: str | None) -> float:
    """"5m", "90s", "1h", "300" -> seconds; None -> no limit."""
    if not text:
        return math.inf
    units = {"s": 1, "m": 60, "h": 3600}
    t = text.strip().lower()
    try:
        return float(t[:-1]) * units[t[-1]] if t[-1] in units else float(t)
    except (ValueError, IndexError):
        raise ValueError(f"budget {text!r} is not a duration like 90s, 5m, 1h") from None


def ensure_dir(path: os.PathLike | str) -> Path:
    p = Path(path).expanduser()
    p.mkdir(parents=True, exist_ok=True)
    return p
