"""pytest-benchmark: MoE layer implementations on the reference shapes (CUDA only).

Parametrised over shape x M x implementation x mode, shapes outermost so each shape's
weights are generated once. Each benchmark records, in `extra_info`, the floor of its
point (U from the actual routing of its input) and the fraction of the floor reached.
Timing: pytest-benchmark's wall clock around one call plus a device synchronisation
(`moecc bench` is the CUDA-event timer with L2 flushing; prefer its numbers for tables).
"""

from __future__ import annotations

import pytest
import torch

from moecc.shapes import REFERENCE_SHAPES, REFERENCE_TOKEN_COUNTS

from .implementations import GPU_DEFAULT
from .roofline import floor
from .timing import CapturedGraph
from .workload import distinct_experts_hit, random_hidden

CASES = [(s, m, impl, mode) for s in REFERENCE_SHAPES for m in REFERENCE_TOKEN_COUNTS
         for impl in GPU_DEFAULT for mode in ("graph", "eager")]


@pytest.mark.gpu
@pytest.mark.parametrize("shape,tokens,impl,mode", CASES,
                         ids=[f"{s.name}-M{m}-{i}-{mo}" for s, m, i, mo in CASES])
def test_moe_layer(benchmark, shape_cache, ceilings, shape, tokens, impl, mode):
    layer = shape_cache.layer(shape, impl)
    weights, spec = shape_cache.get(shape)
    hidden = random_hidden(tokens, shape.hidden_size, torch.bfloat16, shape_cache.device, seed=tokens)
    if layer.prepare:
        layer.prepare(hidden)
    if mode == "graph":
        if not layer.graph_safe:
            pytest.skip(f"{impl}: {layer.note or 'not CUDA-graph capturable'}")
        graph = CapturedGraph(layer, hidden)

        def target():
            graph.replay()
            torch.cuda.synchronize()
    else:
        def target():
            layer(hidden)
            torch.cuda.synchronize()

    benchmark.group = f"{shape.name} M={tokens} {mode}"
    benchmark.pedantic(target, warmup_rounds=3, rounds=20, iterations=1)
    u = distinct_experts_hit(hidden, weights, spec)
    fl = floor(shape, tokens, torch.bfloat16, u, ceilings)
    median_s = benchmark.stats.stats.median
    benchmark.extra_info.update(distinct_experts=u, floor_ms=fl.seconds * 1e3, bound=fl.bound,
                                fraction_of_floor=fl.seconds / median_s,
                                copy_bandwidth_GBps=ceilings.copy_bandwidth / 1e9,
                                matmul_peak_TFLOPs=ceilings.matmul_peak / 1e12)
