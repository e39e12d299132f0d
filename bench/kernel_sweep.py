"""The MoE-layer comparison: shapes x token counts x implementations x {eager, graph}.

Per shape: weights are generated once; every implementation is first checked against the
reference on one fresh input (an implementation that disagrees is not timed: a fast wrong
kernel is not a result). Per token count M: a fresh random input, U (distinct experts hit)
from its actual routing, the floor, then each implementation timed eagerly and as a
CUDA-graph replay (graph-capturable implementations only; the graph's output is checked
against the eager output before it is timed). Every point becomes one record, including
the ones that could not run and why: a failure of one point never ends the sweep.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from moecc.shapes import MoEShape
from . import implementations as impls
from .roofline import Ceilings, floor
from .timing import CapturedGraph, time_fn
from .workload import distinct_experts_hit, layer_spec, random_hidden, random_weights

MODES = ("eager", "graph")


@dataclass(frozen=True)
class SweepConfig:
    shapes: tuple[MoEShape, ...]
    tokens: tuple[int, ...]
    implementations: tuple[str, ...]
    device: str = "cuda"
    dtype: torch.dtype = torch.bfloat16
    modes: tuple[str, ...] = MODES
    check_tokens: int = 64
    target_ms: float = 100.0  # timing budget per point (repetitions adapt to it)
    min_reps: int = 5
    seed: int = 0
    deadline: float = math.inf  # time.monotonic() after which remaining points are skipped


@dataclass
class SweepResult:
    points: list[dict] = field(default_factory=list)
    checks: list[dict] = field(default_factory=list)


def compare(out: torch.Tensor, ref: torch.Tensor, rtol: float) -> dict:
    """Per-token agreement of `out` with `ref` [T, K], and the overall SQNR in dB.

    A token agrees when ||out - ref|| <= rtol * ||ref|| on its row. Implementations may
    route a token differently when two experts' scores tie within rounding, so a check
    passes when at least 90% of tokens agree and nothing is NaN/inf.
    """
    out, ref = out.float(), ref.float()
    err = (out - ref).norm(dim=-1)  # [T]
    scale = ref.norm(dim=-1).clamp_min(1e-12)  # [T]
    agree = float((err <= rtol * scale).float().mean())
    sqnr = 20 * math.log10(float(ref.norm()) / max(float((out - ref).norm()), 1e-30))
    finite = bool(torch.isfinite(out).all())
    return {"agree_fraction": agree, "sqnr_db": sqnr, "max_rel_err": float((err / scale).max()),
            "finite": finite, "ok": finite and agree >= 0.9 and out.shape == ref.shape}


def tolerance(dtype: torch.dtype) -> float:
    return 1e-3 if dtype == torch.float32 else 3e-2


def run_sweep(cfg: SweepConfig, ceilings: Ceilings,
              on_shape_done: Optional[Callable[[SweepResult], None]] = None,
              log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> SweepResult:
    """Run the whole comparison; `on_shape_done` is called after each shape (to save)."""
    result = SweepResult()
    start, n = time.monotonic(), len(cfg.shapes)
    for si, shape in enumerate(cfg.shapes):
        # Each shape may use its share of the budget plus whatever earlier shapes left, so
        # a slow shape cannot starve the ones after it.
        share = start + (si + 1) * (cfg.deadline - start) / n if math.isfinite(cfg.deadline) else math.inf
        try:
            _run_shape(dataclasses.replace(cfg, deadline=min(cfg.deadline, share)), si, shape, ceilings, result, log)
        except Exception as exc:  # noqa: BLE001 - e.g. the reference itself failing: record, go on
            log(f"[bench] {shape.name}: {type(exc).__name__}: {exc}")
            _skip_all(cfg, shape, cfg.implementations, f"{type(exc).__name__}: {exc}"[:500], result, status="error")
            _release(cfg)
        if on_shape_done is not None:
            on_shape_done(result)
    return result


def _run_shape(cfg, si, shape, ceilings, result, log) -> None:
    device = torch.device(cfg.device)
    base = dict(shape=shape.name)
    if time.monotonic() > cfg.deadline:
        _skip_all(cfg, shape, cfg.implementations, "time budget used up", result)
        return
    spec = layer_spec(shape)
    try:
        weights = random_weights(spec, cfg.dtype, device, seed=cfg.seed + si)
    except torch.OutOfMemoryError as exc:
        _skip_all(cfg, shape, cfg.implementations, f"weights do not fit: {exc}", result, status="error")
        return
    reference = impls.build("reference", weights, spec)
    layers: dict[str, impls.Layer] = {}
    hidden = random_hidden(cfg.check_tokens, shape.hidden_size, cfg.dtype, device, seed=10_000 + si)
    ref_out = reference(hidden)
    for name in cfg.implementations:
        try:
            layer = impls.build(name, weights, spec)
            if layer.prepare:
                layer.prepare(hidden)
            check = compare(layer(hidden), ref_out, tolerance(cfg.dtype))
        except impls.Unavailable as exc:
            _skip_all(cfg, shape, (name,), f"unavailable: {exc}", result)
            log(f"[bench] {shape.name} {name}: unavailable: {exc}")
            continue
        except Exception as exc:  # noqa: BLE001 - one implementation's failure is a result
            _skip_all(cfg, shape, (name,), f"{type(exc).__name__}: {exc}"[:500], result, status="error")
            log(f"[bench] {shape.name} {name}: error while checking: {type(exc).__name__}: {exc}")
            continue
        result.checks.append({**base, "impl": name, "tokens": cfg.check_tokens, **check})
        if not check["ok"]:
            _skip_all(cfg, shape, (name,), f"check against reference failed: {check}", result, status="check_failed")
            log(f"[bench] {shape.name} {name}: CHECK FAILED {check}")
            continue
        layers[name] = layer
    del hidden, ref_out

    for mi, m in enumerate(cfg.tokens):
        hidden = random_hidden(m, shape.hidden_size, cfg.dtype, device, seed=20_000 + 100 * si + mi)
        u = distinct_experts_hit(hidden, weights, spec)
        fl = floor(shape, m, cfg.dtype, u, ceilings)
        point = {**base, "tokens": m, "distinct_experts": u, "floor_ms": fl.seconds * 1e3,
                 "bytes": fl.bytes, "flops": fl.flops, "bound": fl.bound}
        for name, layer in layers.items():
            for mode in cfg.modes:
                rec = {**point, "impl": name, "mode": mode}
                rec.update(_measure(cfg, layer, hidden, mode, fl.seconds * 1e3))
                result.points.append(rec)
                log(_progress_line(rec))
        del hidden
    del layers, reference, weights
    _release(cfg)


def _release(cfg: SweepConfig) -> None:
    """Free a shape's memory before the next one (DeepSeek-V3's weights are 22.5 GB)."""
    if "inductor_grouped_mm" in cfg.implementations:
        torch._dynamo.reset()  # compiled graphs hold the shape's weights
    gc.collect()
    if torch.device(cfg.device).type == "cuda":
        torch.cuda.empty_cache()


def _measure(cfg: SweepConfig, layer: impls.Layer, hidden: torch.Tensor, mode: str, floor_ms: float) -> dict:
    if time.monotonic() > cfg.deadline:
        return {"status": "skipped", "note": "time budget used up"}
    if mode == "graph":
        if torch.device(cfg.device).type != "cuda":
            return {"status": "n/a", "note": "CUDA graphs need a CUDA device"}
        if not layer.graph_safe:
            return {"status": "n/a", "note": layer.note or "not CUDA-graph capturable"}
    try:
        if layer.prepare:
            layer.prepare(hidden)
        if mode == "eager":
            timing = time_fn(lambda: layer(hidden), cfg.device, target_ms=cfg.target_ms, min_reps=cfg.min_reps)
        else:
            eager_out = layer(hidden)
            graph = CapturedGraph(layer, hidden)
            check = compare(graph.replay(), eager_out, tolerance(cfg.dtype))
            if not check["ok"]:
                return {"status": "check_failed", "note": f"graph replay disagrees with eager: {check}"}
            timing = time_fn(graph.replay, cfg.device, target_ms=cfg.target_ms)
            del graph
    except Exception as exc:  # noqa: BLE001
        if isinstance(exc, torch.OutOfMemoryError):
            torch.cuda.empty_cache()
        return {"status": "error", "note": f"{type(exc).__name__}: {exc}"[:500]}
    return {"status": "ok", "time_ms": timing.median_ms, "min_ms": timing.min_ms, "reps": timing.reps,
            "fraction": floor_ms / timing.median_ms, "note": layer.note}


def _skip_all(cfg, shape, names, note, result, status="skipped") -> None:
    """Record every (implementation, M, mode) of `shape` not recorded yet as not run."""
    done = {(p["impl"], p["tokens"], p["mode"]) for p in result.points if p["shape"] == shape.name}
    for name in names:
        for m in cfg.tokens:
            for mode in cfg.modes:
                if (name, m, mode) not in done:
                    result.points.append({"shape": shape.name, "tokens": m, "impl": name, "mode": mode,
                                          "status": status, "note": note})


def _progress_line(rec: dict) -> str:
    head = f"[bench] {rec['shape']:<22} M={rec['tokens']:<5} U={rec.get('distinct_experts', '?'):<4} " \
           f"{rec['impl']:<20} {rec['mode']:<5}"
    if rec["status"] == "ok":
        return f"{head} {rec['time_ms']:9.4f} ms  {100 * rec['fraction']:5.1f}% of floor"
    return f"{head} {rec['status']}: {rec.get('note', '')[:100]}"
