"""Timing candidate configurations on the local CUDA GPU and recording the best per M.

One `tune_table` call tunes one table (device, op, strategy, shape, dtype) for the token
counts asked for:
  1. candidates per M: search.py's space for the strategies allowed at M, pruned by the
     device profile's shared memory. fit mode "auto": by the lower bound only (the
     launch on this GPU is the exact check: a config over the limit fails to launch and
     is journaled as failed); "analytic": by the conservative estimate; "aot": compiled
     ahead of time first (search.check_fit);
     The kernel's heuristic default comes first, then the cost model's (predict.py)
     ranking, best config of each tile shape before pipelining variants; the first
     --max-configs per M (default 40) are kept, interleaved across M, so a short budget
     still covers every M;
  2. resume: every (M, config) already in the trials journal in the output folder
     ("<table>.trials.jsonl", one JSON line per measurement, failures included) is
     skipped;
  3. per candidate: run on random inputs (redrawn where the top-k choice is a near-tie,
     see decisive_hidden) and compare with moecc.backends.reference, every token within
     moecc/tolerances.py's bound for the dtype; a config that fails to build, run or
     match is journaled as failed and never timed;
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
from moecc.tuning.search import (
    allowed_strategies,
    candidate_configs,
    dtype_bytes,
    pruned_candidates,
    shared_memory_lower_bound,
)
from moecc.tuning.store import file_lock, merge_entries, now_utc, read_table, CorruptTableError
from moecc.roofline import floor_seconds, moe_layer_traffic

TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
DEFAULT_MAX_CONFIGS = 40  # per token count; the cost model's best first


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


def decisive_hidden(problem: Problem, num_tokens: int, seed: int, min_margin: float = 0.05):
    """Random hidden states whose top-k choice is not a near-tie (for the correctness check).

    A token whose k-th and (k+1)-th router logits are closer than `min_margin` (fp32)
    may be routed differently by two correct implementations (accumulation order), and
    then differs by a whole expert; such rows are redrawn. Timing uses plain random inputs.
    """
    from moecc.backends.reference import router_logits

    x = problem.hidden(num_tokens, seed)
    top_k, num_experts = problem.spec.router.top_k, problem.spec.router.num_experts
    if top_k >= num_experts:
        return x
    for attempt in range(20):
        logits = router_logits(x, problem.weights.router_weight, problem.weights.router_bias,
                               problem.spec.router).float()  # [T, E]
        top = logits.topk(top_k + 1, dim=-1).values  # [T, k+1]
        close = (top[:, top_k - 1] - top[:, top_k]) < min_margin  # [T]
        if not bool(close.any()):
            break
        x[close] = problem.hidden(int(close.sum()), seed + 7919 * (attempt + 1))
    return x


def check_against_reference(out, ref) -> float:
    """Max error relative to the largest reference value; raises unless within the
    project's tolerance for the dtype (moecc/tolerances.py) on every token."""
    import torch

    from moecc.tolerances import token_mismatch_fraction

    if not bool(torch.isfinite(out).all()):
        raise ValueError("wrong result: NaN or inf in the output")
    bad = token_mismatch_fraction(out, ref, ref.dtype)
    err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)).item()
    if bad > 0:
        raise ValueError(f"wrong result: {bad:.1%} of tokens outside tolerance (max relative error {err:.3g})")
    return err


def time_on_gpu(fn) -> tuple[float, str]:
    """Median milliseconds of `fn` under CUDA-graph replay; eagerly if it cannot be captured."""
    from triton.testing import do_bench, do_bench_cudagraph

    try:
        return do_bench_cudagraph(fn, rep=20, return_mode="median"), "cudagraph"
    except Exception:
        import torch

        torch.cuda.synchronize()
        return do_bench(fn, return_mode="median"), "eager"


def roofline_floor_s(shape: tuple, dtype: str, num_tokens: int, active_experts: int, c: Ceilings) -> float:
    """ARCHITECTURE.md's floor: max(bytes / BW, flops / PEAK) for one layer."""
    e, n, k, top_k = shape
    moved, flops = moe_layer_traffic(num_tokens, top_k, n, k, active_experts, dtype_bytes(dtype),
                                     activation_bytes=2)  # 16-bit activations
    return floor_seconds(moved, flops, c.bandwidth_gbps * 1e9, c.peak_tflops * 1e12)


@dataclass
class Problem:
    """Canonical weights and spec for one shape on the GPU (built once per table)."""

    spec: object
    weights: object
    shape: tuple
    dtype: str
    device: str = "cuda"

    def hidden(self, num_tokens: int, seed: int):
        import torch

        g = torch.Generator(device=self.device).manual_seed(seed)
        return torch.randn(num_tokens, self.shape[2], device=self.device, generator=g,
                           dtype=getattr(torch, TORCH_DTYPES[self.dtype]))


def make_problem(shape: tuple, dtype: str, seed: int = 0, device: str = "cuda") -> Problem:
    import torch

    from moecc.spec import ExpertSpec, MoELayerSpec, RouterSpec
    from moecc.weights import make_weights

    e, n, k, top_k = shape
    tdt = getattr(torch, TORCH_DTYPES[dtype])
    g = torch.Generator(device=device).manual_seed(seed)

    def rand(*dims, scale):
        return (torch.randn(*dims, device=device, generator=g, dtype=tdt) * scale)

    spec = MoELayerSpec(RouterSpec(e, top_k, "softmax", renormalize=True), ExpertSpec(k, n))
    weights = make_weights(router_weight=rand(e, k, scale=k**-0.5), gate_up=rand(e, 2 * n, k, scale=k**-0.5),
                           down=rand(e, k, n, scale=n**-0.5))
    return Problem(spec, weights, tuple(shape), dtype, device)


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


def plan(key: TableKey, batches: list[int], profile, fit_mode: str = "auto",
         max_configs: int = DEFAULT_MAX_CONFIGS) -> list[tuple[int, object]]:
    """[(M, KernelConfig)] to measure, most promising first.

    Per M: the strategies allowed at M, the configs that fit (see module docstring),
    ranked by the cost model (predict.py; rates from the profile when it has them) and
    cut to the best `max_configs` (0: all). The lists of all M are interleaved by rank,
    so a budget cut leaves every M with its most promising configs measured.
    """
    from moecc.tuning.predict import rank_key

    per_m = []
    for m in batches:
        strategies = allowed_strategies(m, key.shape) if key.strategy == STRATEGY_AUTO else (key.strategy,)
        cands = []
        for strat in strategies:
            if fit_mode == "auto":  # on the GPU being tuned, the launch itself is the exact check
                cands.extend(cfg for cfg in candidate_configs(strat, m, key.shape)
                             if shared_memory_lower_bound(cfg, key.dtype) <= profile.max_shared_memory_per_block)
            else:
                cands.extend(pruned_candidates(strat, m, key.shape, key.dtype, profile, fit_mode)[0])
        if profile.memory_bandwidth_gbps > 0 and profile.peak_tflops:
            cands.sort(key=lambda c: rank_key(c, profile, key.shape, key.dtype, m))
        cands = _diverse_first(_heuristic(key, m, profile) + cands)
        per_m.append([(m, c) for c in (cands[:max_configs] if max_configs else cands)])
    todo = []
    for rank in range(max((len(c) for c in per_m), default=0)):
        todo.extend(c[rank] for c in per_m if rank < len(c))
    return todo


def _heuristic(key: TableKey, m: int, profile) -> list:
    """The kernel's own default for this M (backends/triton/heuristics.py), measured first
    so a tuned table is never worse than running untuned."""
    try:
        from moecc.backends.triton.heuristics import heuristic_config

        return [heuristic_config(*key.shape, m, key.dtype, profile)]
    except Exception:  # absent, or no rule for this dtype
        return []


def _diverse_first(ranked: list) -> list:
    """Keep order, but the best config of each tile shape (BM, BN, BK, split_k) comes
    before the variants (stages, warps, group_m) of any tile: the model separates tile
    shapes far better than it separates pipelining variants."""
    seen, firsts, rest = set(), [], []
    for cfg in ranked:
        tile = (cfg.block_m, cfg.block_n, cfg.block_k, cfg.split_k, cfg.strategy)
        if cfg in firsts or cfg in rest:
            continue
        (rest if tile in seen else firsts).append(cfg)
        seen.add(tile)
    return firsts + rest


def tune_table(key: TableKey, table_path: Path, batches: list[int], profile, *, deadline: float,
               progress: Callable[[str], None] | None = None, advance: Callable[[], None] | None = None,
               on_corrupt=None, fit_mode: str = "auto", ceilings: Ceilings | None = None,
               max_configs: int = DEFAULT_MAX_CONFIGS, problem: Problem | None = None,
               kernel: Callable | None = None, timer: Callable | None = None) -> TuneReport:
    """Tune one table on the current GPU until done or `deadline` (time.monotonic()).

    `problem`, `kernel` (moe_layer's signature) and `timer` (fn -> (ms, "cudagraph" |
    "eager")) default to the real ones on CUDA; tests pass CPU stand-ins.
    """
    import torch

    from moecc.backends import reference

    if problem is None:
        require_cuda()
    if kernel is None:
        from moecc.backends.triton import moe_layer as kernel
    timer = timer or time_on_gpu
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
    problem = problem or make_problem(key.shape, key.dtype)
    checked_inputs: dict[int, tuple] = {}  # M -> (hidden, reference output, active experts)
    for m, cfg in plan(key, batches, profile, fit_mode, max_configs):
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
            x = decisive_hidden(problem, m, seed=1000 + m)
            checked_inputs[m] = (x, reference.moe_layer(x, problem.weights, problem.spec))
        x, ref = checked_inputs[m]
        record = {"M": m, "config": cfg.to_dict(), "at": now_utc()}
        try:
            out = kernel(x, problem.weights, problem.spec, config=cfg)
            err = check_against_reference(out, ref)

            fresh = problem.hidden(m, seed=int(time.time_ns() % 2**31))
            ms, timing = timer(lambda: kernel(fresh, problem.weights, problem.spec, config=cfg))
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
            if torch.cuda.is_available():
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
