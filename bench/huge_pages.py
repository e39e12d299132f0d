"""Streaming reads on 4 KiB vs 2 MiB pages, in one process (moecc/huge_pages.py says why).

    python -m moecc.bench.huge_pages [--mib 256] [--layers 3] [--calls 24]

1. torch.sum over a fresh bf16 tensor of `--mib` MiB on the pages torch's allocator gave
   it (4 KiB unless THP_MEM_ALLOC_ENABLE=1), then after `moecc.huge_pages.collapse`.
2. moecc's bf16 MoE layer (TVM op) at Qwen3-30B-A3B widths, M = 1, `--layers` copies
   cycled call by call (weights from DRAM), before and after collapsing their weights.
A benchmark, not a test; the collapse's own time is printed too.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _sum_gbps(x: torch.Tensor) -> float:
    from moecc.roofline import read_rate

    x.sum()  # first touch
    return read_rate(x, reps=10) / 1e9


def _layer_ms(layers, xs, calls: int) -> float:
    import moecc.backends.tvm as tvm_backend

    times = []
    for i in range(calls):
        w, spec = layers[i % len(layers)]
        t0 = time.perf_counter()
        tvm_backend.moe_layer(xs[i % len(xs)], w, spec)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[len(layers):]) * 1e3


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=int, default=256)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--calls", type=int, default=24)
    a = p.parse_args(argv)
    from moecc.bench.quantized_layer_cpu import K, _tvm_layers
    from moecc.huge_pages import collapse, unavailable_reason

    if unavailable_reason():
        raise SystemExit(f"huge pages unavailable: {unavailable_reason()}")
    out = {"date": time.strftime("%Y-%m-%d %H:%M"), "threads": torch.get_num_threads()}
    x = torch.randn(a.mib << 19, dtype=torch.bfloat16)
    out["sum_4k_gbps"] = _sum_gbps(x)
    r = collapse([x])
    out.update(sum_2m_gbps=_sum_gbps(x), sum_collapse_s=r.seconds)
    print(f"torch.sum {a.mib} MiB: {out['sum_4k_gbps']:.1f} GB/s on 4 KiB pages, {out['sum_2m_gbps']:.1f} GB/s "
          f"on 2 MiB pages (collapse {r.seconds:.1f} s)", flush=True)
    del x
    gen = torch.Generator().manual_seed(0)
    layers = _tvm_layers(a.layers, gen)["bf16"]
    xs = [torch.randn(1, K, generator=gen).to(torch.bfloat16) for _ in range(8)]
    _layer_ms(layers, xs, len(layers) + 2)  # kernels built and loaded
    out["layer_4k_ms"] = _layer_ms(layers, xs, a.calls)
    r = collapse(t for w, _ in layers for t in w if isinstance(t, torch.Tensor))
    out.update(layer_2m_ms=_layer_ms(layers, xs, a.calls), layer_collapse_s=r.seconds,
               layer_collapsed_gib=r.collapsed_bytes / 2**30)
    print(f"bf16 MoE layer M=1 (TVM op, {a.layers} layers cycled): {out['layer_4k_ms']:.2f} ms on 4 KiB pages, "
          f"{out['layer_2m_ms']:.2f} ms on 2 MiB pages ({r.describe()})", flush=True)
    return out


if __name__ == "__main__":
    main()
