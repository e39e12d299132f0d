"""The roofline floor of one MoE layer (ARCHITECTURE.md): the one place its formula lives.

For M tokens that hit U distinct experts of a layer with hidden size K, expert width N and
top-k routing:
    bytes = U * 3 * N * K * weight_bytes + 2 * M * K * activation_bytes   (weights, x in, y out)
    flops = 2 * M * top_k * 3 * N * K
    floor = max(bytes / bandwidth, flops / peak)
The benchmarks, the tuner and the predictor all call this; the rates they pass differ
(measured in the same run, or a device profile's datasheet figures).
"""

from __future__ import annotations


def moe_layer_traffic(num_tokens: int, top_k: int, intermediate: int, hidden: int, distinct_experts: int,
                      weight_bytes: float, activation_bytes: float) -> tuple[float, float]:
    """(bytes moved, flops) of one MoE layer at the roofline's accounting."""
    moved = distinct_experts * 3 * intermediate * hidden * weight_bytes + 2 * num_tokens * hidden * activation_bytes
    flops = 2 * num_tokens * top_k * 3 * intermediate * hidden
    return float(moved), float(flops)


def floor_seconds(moved_bytes: float, flops: float, bandwidth_bytes_per_s: float, peak_flops_per_s: float) -> float:
    return max(moved_bytes / bandwidth_bytes_per_s, flops / peak_flops_per_s)


def cpu_read_bandwidth(gib: float = 1.0, reps: int = 5) -> float:
    """The CPU's read rate in bytes/s: best of `reps` torch.sum over a fresh `gib` GiB fp32
    tensor on 2 MiB pages where the OS gives them (moecc/huge_pages.py: on 4 KiB pages the
    sum is bound by address translation, 5 vs 22 GB/s on the build VM), with torch's thread
    count. The bandwidth the CPU benchmarks' floors divide by."""
    import torch

    from moecc.huge_pages import huge_page_buffer

    t = huge_page_buffer(int(gib * 2 ** 30) // 4 * 4).view(torch.float32)
    t.uniform_()
    return read_rate(t, reps)


def read_rate(t, reps: int = 5) -> float:
    """Bytes/s of the fastest of `reps` torch.sum over tensor t (already touched), on
    whatever pages t has."""
    import time

    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        t.sum()
        best = min(best, time.perf_counter() - t0)
    return t.numel() * t.element_size() / best
