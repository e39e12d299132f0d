"""Timers: eager and CUDA-graph replay on a GPU (CUDA events), wall clock on a CPU.

GPU timing, per repetition: overwrite a 256 MiB buffer (so weights come from HBM, not
L2, as they do when every layer of a model streams its own), synchronise (so the host's
launch cost is inside the measured window, which matters for launch-bound decode), record
a start event, run, record an end event. The statistic is the median over repetitions;
the number of repetitions adapts to the cost of one call.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

_FLUSH_BYTES = 256 << 20


@dataclass(frozen=True)
class Timing:
    median_ms: float
    min_ms: float
    reps: int

    def to_dict(self) -> dict:
        return {"median_ms": self.median_ms, "min_ms": self.min_ms, "reps": self.reps}


def time_fn(fn: Callable[[], object], device: torch.device | str, *, flush_l2: bool = True,
            warmup: int = 2, target_ms: float = 100.0, min_reps: int = 5, max_reps: int = 100) -> Timing:
    """Median time of `fn()` on `device` (CUDA events on a GPU, perf_counter on a CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        return _time_cuda(fn, device, flush_l2, warmup, target_ms, min_reps, max_reps)
    return _time_cpu(fn, warmup, target_ms, min_reps, max_reps)


def _reps_for(estimate_ms: float, target_ms: float, min_reps: int, max_reps: int) -> int:
    return int(min(max_reps, max(min_reps, target_ms / max(estimate_ms, 1e-3))))


def _time_cuda(fn, device, flush_l2, warmup, target_ms, min_reps, max_reps) -> Timing:
    flush = torch.empty(_FLUSH_BYTES if flush_l2 else 0, dtype=torch.uint8, device=device)
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize(device)
    reps = _reps_for((time.perf_counter() - t0) * 1e3, target_ms, min_reps, max_reps)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends):
        if flush_l2:
            flush.random_(0, 255)  # not zeros: some parts skip zero pages/lines
        torch.cuda.synchronize(device)
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    return Timing(statistics.median(times), min(times), reps)


def _time_cpu(fn, warmup, target_ms, min_reps, max_reps) -> Timing:
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    fn()
    reps = _reps_for((time.perf_counter() - t0) * 1e3, target_ms, min_reps, max_reps)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return Timing(statistics.median(times), min(times), reps)


class CapturedGraph:
    """`fn(*args)` captured once into a CUDA graph; `replay()` reruns it on the same buffers.

    Capture fails loudly (RuntimeError) for code that synchronises with the host
    (nonzero, .tolist(), .item()): such code cannot run under CUDA-graph replay at all.
    """

    def __init__(self, fn: Callable, *args, warmup: int = 2):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn(*args)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = fn(*args)

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.output
