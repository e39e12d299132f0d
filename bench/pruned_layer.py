"""Time of one MoE layer's kernels before and after expert pruning (issue 12).

    PYTHONPATH=. python bench/pruned_layer.py [--experts 64] [--removed 0 0.25 0.5] [--tokens 1 512]

One layer (random weights, softmax top-8 with renormalisation, N=256, K=1024, bf16) is
pruned the way passes/prune_experts.py prunes it (router rows and expert stacks of the
removed experts deleted: the lowest-numbered kept, which is as good as any for timing),
and moecc.backends.tvm.moe_layer is timed on the same hidden states for each fraction
removed: per M, `--rounds` interleaved rounds (the machine is shared), each the median of
`--calls` calls. Also printed per row: the roofline floor of the layer (moecc/roofline.py)
at the read bandwidth and the torch bf16 GEMM rate measured in the same run, and the
fraction of that floor reached. `--compare-unchunked` also times every layer with
backends/tvm/row_chunks.py off, interleaved (the A/B of that fix). Top-k is fixed, so at large M the flops do not shrink
with E: pruning saves the weight reads (and memory), not arithmetic. A plain script.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from moecc.roofline import cpu_read_bandwidth, floor_seconds, moe_layer_traffic
from moecc.spec import ExpertSpec, MoELayerSpec, RouterSpec
from moecc.weights import make_weights

N, K, TOP_K = 256, 1024, 8


def make_layer(e: int, dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    gate_up = (torch.randn(e, 2 * N, K, generator=g) * K ** -0.5).to(dtype)  # [E, 2N, K]
    down = (torch.randn(e, K, N, generator=g) * N ** -0.5).to(dtype)  # [E, K, N]
    router = (torch.randn(e, K, generator=g) * K ** -0.5 * 8).to(dtype)  # [E, K]
    spec = MoELayerSpec(RouterSpec(e, TOP_K, renormalize=True), ExpertSpec(K, N))
    return spec, make_weights(router_weight=router, gate_up=gate_up, down=down)


def prune(spec, w, removed: int):
    """Delete `removed` experts (rows of router and stacks), as the pass does for this router."""
    keep = torch.arange(removed, spec.router.num_experts)
    return (spec.replace(router={"num_experts": len(keep)}),
            w._replace(router_weight=w.router_weight[keep].contiguous(), gate_up=w.gate_up[keep].contiguous(),
                       down=w.down[keep].contiguous()))


def gemm_rate(dtype) -> float:
    """Best torch matmul rate (flop/s) on [1024, 1024] x [1024, 1024] in `dtype`."""
    a, b = torch.randn(1024, 1024).to(dtype), torch.randn(1024, 1024).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * 1024 ** 3 / best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--removed", type=float, nargs="+", default=[0.0, 0.25, 0.5])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 512])
    p.add_argument("--calls", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--compare-unchunked", action="store_true",
                   help="also time each layer with backends/tvm/row_chunks.py off (one range per expert), interleaved")
    args = p.parse_args()
    from moecc.backends.reference.routing import route, router_logits
    from moecc.backends.tvm import moe_layer, row_chunks

    chunk_bytes = {"on": row_chunks.CHUNK_BYTES, "off": 1 << 62}  # off: every expert one range
    modes = ("on", "off") if args.compare_unchunked else ("on",)

    dtype = torch.bfloat16
    spec, w = make_layer(args.experts, dtype)
    layers = {f: prune(spec, w, round(f * args.experts)) for f in args.removed}
    g = torch.Generator().manual_seed(1)
    times = {(m, f, c): [] for m in args.tokens for f in args.removed for c in modes}
    # Fresh hidden states per call: at M = 1 each call routes to other experts, whose
    # weights then come from memory rather than the cache.
    inputs = {m: [torch.randn(m, K, generator=g).to(dtype) for _ in range(args.calls)] for m in args.tokens}
    for m, xs in inputs.items():
        for s, lw in layers.values():
            moe_layer(xs[0], lw, s)  # builds or loads the kernels outside the timing
    for _ in range(args.rounds):
        for m, xs in inputs.items():
            for f, (s, lw) in layers.items():
                for c in modes:
                    row_chunks.CHUNK_BYTES = chunk_bytes[c]  # read at each call (op.run_kernels)
                    samples = []
                    for x in xs:
                        t0 = time.perf_counter()
                        moe_layer(x, lw, s)
                        samples.append(time.perf_counter() - t0)
                    times[(m, f, c)].append(statistics.median(samples))
    row_chunks.CHUNK_BYTES = chunk_bytes["on"]
    bandwidth, peak = cpu_read_bandwidth(), gemm_rate(dtype)
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} torch threads, torch {torch.__version__}; TVM op, E={args.experts} "
          f"N={N} K={K} top-{TOP_K} bf16; {args.rounds} interleaved rounds of the median of {args.calls} calls; "
          f"read bandwidth {bandwidth / 1e9:.1f} GB/s, torch bf16 GEMM {peak / 1e9:.0f} GFLOP/s (same run)")
    print("| M | removed | experts | row chunks | best round (ms) | median round (ms) | time vs unpruned "
          "| distinct experts hit | floor (ms) | fraction of floor |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for m, xs in inputs.items():
        for c in modes:
            base = min(times[(m, args.removed[0], c)])  # unpruned, same chunking
            for f, (s, lw) in layers.items():
                ids = route(router_logits(xs[0], lw.router_weight, None, s.router), s.router)[1]
                hit = int(ids.unique().numel())
                moved, flops = moe_layer_traffic(m, TOP_K, N, K, hit, 2, 2)
                floor = floor_seconds(moved, flops, bandwidth, peak)
                best = min(times[(m, f, c)])
                print(f"| {m} | {f:.0%} | {s.router.num_experts} | {c} | {best * 1e3:.2f} | "
                      f"{statistics.median(times[(m, f, c)]) * 1e3:.2f} | {best / base:.2f} | {hit} | "
                      f"{floor * 1e3:.2f} | {floor / best:.0%} |", flush=True)


if __name__ == "__main__":
    main()
