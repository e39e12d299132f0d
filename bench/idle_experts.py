"""Evidence that the TVM op reads only the experts that received tokens (issue 12, item 1).

    PYTHONPATH=. python bench/idle_experts.py [--experts 64 256] [--dtype bf16] [--calls 40]

One MoE layer at Qwen3-30B-A3B's widths (N=768, K=2048, top-8), random weights, for each
E: the median time of moecc.backends.tvm.moe_layer at M = 1 over `--calls` calls, each
with fresh hidden states (so each call routes to other experts and their weights come from
DRAM, not the cache: 8 experts are 75 MB in bf16), after one warm-up call per E that builds
or loads the kernels; `--rounds` rounds over all E, interleaved, because the machine is
shared (best and median round reported). If the op read every expert's weights, E = 256 would read 4x the bytes
of E = 64; reading only the k routed experts, the time stays flat. The "all experts"
column is what reading every expert would cost at the read bandwidth measured in the same
run (torch.sum over 1 GiB, moecc.roofline.cpu_read_bandwidth). A plain script, not a test.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from moecc.roofline import cpu_read_bandwidth
from moecc.spec import ExpertSpec, MoELayerSpec, RouterSpec
from moecc.weights import make_weights

N, K, TOP_K = 768, 2048, 8
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def make_layer(e: int, dtype, seed: int = 0):
    """Random layer filled one expert at a time (no full-size fp32 temporary: E=256 is 2.4 GB in bf16)."""
    g = torch.Generator().manual_seed(seed)
    gate_up, down = torch.empty(e, 2 * N, K, dtype=dtype), torch.empty(e, K, N, dtype=dtype)
    for i in range(e):  # uniform with the variance of randn / sqrt(fan_in)
        gate_up[i] = ((torch.rand(2 * N, K, generator=g) * 2 - 1) * (3.0 / K) ** 0.5).to(dtype)
        down[i] = ((torch.rand(K, N, generator=g) * 2 - 1) * (3.0 / N) ** 0.5).to(dtype)
    router = (torch.rand(e, K, generator=g) * 2 - 1) * (3.0 / K) ** 0.5 * 8
    spec = MoELayerSpec(RouterSpec(e, TOP_K, renormalize=True), ExpertSpec(K, N))
    return spec, make_weights(router_weight=router.to(dtype), gate_up=gate_up, down=down), g


def time_layer(layer, calls: int, seed: int) -> tuple[float, int]:
    """Median seconds per call over `calls` fresh inputs, and how many distinct experts they hit."""
    from moecc.backends.reference.routing import route, router_logits
    from moecc.backends.tvm import moe_layer

    spec, w, dtype = layer
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(1, K, generator=g).to(dtype) for _ in range(calls)]
    hit = set()
    for x in xs:
        hit |= set(route(router_logits(x, w.router_weight, None, spec.router), spec.router)[1].view(-1).tolist())
    times = []
    for x in xs:
        t0 = time.perf_counter()
        moe_layer(x, w, spec)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), len(hit)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--experts", type=int, nargs="+", default=[64, 256])
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--calls", type=int, default=40)
    p.add_argument("--rounds", type=int, default=5, help="rounds over all E, interleaved")
    args = p.parse_args()
    from moecc.backends.tvm import moe_layer

    dtype = DTYPES[args.dtype]
    bytes_per_expert = 3 * N * K * dtype.itemsize
    layers = {}
    for e in args.experts:
        spec, w, g = make_layer(e, dtype)
        moe_layer(torch.randn(1, K, generator=g).to(dtype), w, spec)  # builds or loads the kernels
        layers[e] = (spec, w, dtype)
    # Interleaved rounds (the machine is shared): each E's best and median round are reported.
    results = {e: [] for e in args.experts}
    for r in range(args.rounds):
        for e in args.experts:
            results[e].append(time_layer(layers[e], args.calls, seed=1000 * r + e))
    bandwidth = cpu_read_bandwidth()
    rows = [(e, min(t for t, _ in res), statistics.median(t for t, _ in res), max(h for _, h in res))
            for e, res in results.items()]
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} torch threads, torch {torch.__version__}; TVM op, M=1, N={N} K={K} "
          f"top-{TOP_K}, {args.dtype}; per round the median of {args.calls} calls with fresh inputs, "
          f"{args.rounds} rounds interleaved; read bandwidth {bandwidth / 1e9:.1f} GB/s")
    print("| E | best round (ms) | median round (ms) | distinct experts hit in a round | top-k experts' weights (MB) "
          "| their floor (ms) | all experts' weights (MB) | floor if all were read (ms) |")
    print("|---|---|---|---|---|---|---|---|")
    for e, best, med, hit in rows:
        print(f"| {e} | {best * 1e3:.2f} | {med * 1e3:.2f} | {hit} | {TOP_K * bytes_per_expert / 1e6:.0f} | "
              f"{TOP_K * bytes_per_expert / bandwidth * 1e3:.2f} | {e * bytes_per_expert / 1e6:.0f} | "
              f"{e * bytes_per_expert / bandwidth * 1e3:.1f} |", flush=True)


if __name__ == "__main__":
    main()
