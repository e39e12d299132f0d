"""CPU benchmark: the TVM MoE op against a per-expert loop and a sorted torch._grouped_mm path.

    PYTHONPATH=. python bench/bench_tvm_cpu.py [--experts 128] [--tokens 1 4 16 64] [--reps 7]

Shape: Qwen3-30B-A3B's MoE layer (E=128, N=768, K=2048, top-k=8), fp32, on the CPU with
torch's thread count (TVM's pool is given the same). All three implementations do the
same routing (the reference router, in torch) and differ only in the experts:
    tvm        moecc.backends.tvm.moe_layer: grouped GEMMs + fused activation / combine
    loop       transformers' eager experts loop: for each hit expert, gather its tokens,
               F.linear(gate_up), act * up, F.linear(down), weight, index_add_
    grouped_mm sort rows by expert, torch._grouped_mm for both projections, weight,
               index_add_ (the shape of transformers' "grouped_mm" implementation)
Each implementation runs in its own process (TVM's worker threads spin after each
kernel and, in the same process, steal the cores torch's threads need: measured 3-5x
slowdowns of the torch paths), --rounds times, interleaved; a process checks its output
against the loop's (fp32 tolerance) before timing, then takes the median of --reps calls
after one warm-up. The table shows, per implementation, the best of those medians (the
machine is shared: the least disturbed run is the most repeatable number). Weights are
fresh uniform random values, ~2.4 GB in fp32 at E=128; --experts shrinks E (top-k
stays 8) if memory is short. The floor column is the memory floor: the weights of the
distinct experts the input hit (U * 3 * N * K * 4 bytes) over the read bandwidth measured
in the same run (torch.sum over 1 GiB); activations are negligible at these M.
A plain script, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from moecc.backends.reference.routing import route, router_logits
from moecc.roofline import cpu_read_bandwidth
from moecc.spec import ExpertSpec, MoELayerSpec, RouterSpec
from moecc.tolerances import check_close
from moecc.weights import make_weights


def routed(x, w, spec):
    logits = router_logits(x, w.router_weight, None, spec.router)  # [T, E]
    return route(logits, spec.router)  # [T, k] weights, ids


def per_expert_loop(x, w, spec):
    """transformers' eager experts loop (Qwen3-MoE / Mixtral style)."""
    topk_w, topk_ids = routed(x, w, spec)  # [T, k]
    e_count = spec.router.num_experts
    out = torch.zeros_like(x)  # [T, K]
    mask = F.one_hot(topk_ids, e_count).permute(2, 1, 0)  # [E, k, T]
    hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    for e in hit:
        e = e[0]
        slot, tok = torch.where(mask[e])
        gate, up = F.linear(x[tok], w.gate_up[e]).chunk(2, dim=-1)  # [t_e, N] x2
        h = F.linear(F.silu(gate) * up, w.down[e])  # [t_e, K]
        out.index_add_(0, tok, h * topk_w[tok, slot, None])
    return out


def grouped_mm_path(x, w, spec):
    """Sort rows by expert, torch._grouped_mm both projections, weighted index_add_."""
    topk_w, topk_ids = routed(x, w, spec)  # [T, k]
    k = spec.router.top_k
    flat = topk_ids.reshape(-1)  # [A]
    order = torch.argsort(flat, stable=True)  # [A]
    offs = torch.cumsum(torch.bincount(flat, minlength=spec.router.num_experts), 0).to(torch.int32)  # [E]
    tok = order // k  # [A]
    xs = x[tok]  # [A, K]
    h = torch._grouped_mm(xs, w.gate_up.transpose(1, 2), offs=offs)  # [A, 2N]
    n = spec.experts.intermediate_size
    a = F.silu(h[:, :n]) * h[:, n:]  # [A, N]
    y = torch._grouped_mm(a, w.down.transpose(1, 2), offs=offs)  # [A, K]
    out = torch.zeros_like(x)
    out.index_add_(0, tok, y * topk_w.reshape(-1)[order, None])
    return out


def tvm_op(x, w, spec):
    from moecc.backends.tvm import moe_layer

    return moe_layer(x, w, spec)


def median_time(fn, reps):
    fn()  # warm-up (first TVM call builds or loads the module)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


IMPLS = {"tvm": tvm_op, "loop": per_expert_loop, "grouped_mm": grouped_mm_path}


def make_layer(num_experts: int, seed: int = 0):
    """Qwen3-30B-A3B's layer with fresh uniform random weights (same seed -> same layer)."""
    e, n, k, top_k = num_experts, 768, 2048, 8
    g = torch.Generator().manual_seed(seed)
    spec = MoELayerSpec(RouterSpec(e, top_k, renormalize=True), ExpertSpec(k, n))

    def rnd(*shape, fan_in):  # uniform with the variance of randn / sqrt(fan_in); fast to draw
        return (torch.rand(*shape, generator=g) * 2 - 1) * (3.0 / fan_in) ** 0.5

    w = make_weights(router_weight=rnd(e, k, fan_in=k) * 8, gate_up=rnd(e, 2 * n, k, fan_in=k),
                     down=rnd(e, k, n, fan_in=n))
    return spec, w, g


def worker(impl: str, args) -> dict:
    """Time one implementation in this process (no other implementation's threads alive)."""
    spec, w, g = make_layer(args.experts)
    fn = IMPLS[impl]
    out = {}
    for m in args.tokens:
        x = torch.randn(m, spec.experts.hidden_size, generator=g)
        if impl != "loop":  # checked against the loop, computed before fn's first call
            expected = per_expert_loop(x, w, spec)
            check_close(fn(x, w, spec), expected, torch.float32)
        ids = routed(x, w, spec)[1]  # [T, k]
        weight_bytes = len(torch.unique(ids)) * 3 * spec.experts.intermediate_size * spec.experts.hidden_size * 4
        out[m] = {"time": median_time(lambda: fn(x, w, spec), args.reps), "bytes": weight_bytes}
    return out


def best_of_processes(script: str, names, args) -> tuple[dict[str, dict[int, float]], dict[int, int]]:
    """Run `script --worker NAME` for every name, args.rounds times interleaved (a fresh
    process each: no other implementation's threads or caches alive); per name and M the
    best of the processes' median times, and the weight bytes each M reads."""
    best: dict[str, dict[int, float]] = {name: {} for name in names}
    weight_bytes: dict[int, int] = {}
    for _ in range(args.rounds):
        for name in names:
            cmd = [sys.executable, script, "--worker", name, "--experts", str(args.experts),
                   "--reps", str(args.reps), "--tokens", *map(str, args.tokens)]
            res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            for m, r in res.items():
                best[name][int(m)] = min(best[name].get(int(m), float("inf")), r["time"])
                weight_bytes[int(m)] = r["bytes"]
    return best, weight_bytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--rounds", type=int, default=2, help="processes per implementation, interleaved")
    p.add_argument("--impl", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    p.add_argument("--worker", choices=list(IMPLS), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return

    impls = [name for name in args.impl if name != "grouped_mm" or hasattr(torch, "_grouped_mm")]
    best, weight_bytes = best_of_processes(__file__, impls, args)
    bandwidth = cpu_read_bandwidth()

    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, torch {torch.__version__}; "
          f"E={args.experts} N=768 K=2048 top_k=8 fp32; best of {args.rounds} processes x median of "
          f"{args.reps} calls; read bandwidth (torch.sum of 1 GiB) {bandwidth / 1e9:.1f} GB/s"
          + ("" if hasattr(torch, "_grouped_mm") else "; torch._grouped_mm not available: column skipped"))
    ratios = [name for name in ("loop", "grouped_mm") if name in impls and "tvm" in impls]
    header = "| M | weights read (MB) | floor (ms) | " + " | ".join(f"{name} (ms)" for name in impls) + " |" + "".join(
        f" {name} / tvm |" for name in ratios) + (" tvm: floor / time |" if "tvm" in impls else "")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for m in args.tokens:
        floor = weight_bytes[m] / bandwidth
        row = f"| {m} | {weight_bytes[m] / 1e6:.0f} | {floor * 1e3:.2f} | "
        row += " | ".join(f"{best[name][m] * 1e3:.2f}" for name in impls) + " |"
        row += "".join(f" {best[name][m] / best['tvm'][m]:.2f}x |" for name in ratios)
        if "tvm" in impls:
            row += f" {floor / best['tvm'][m]:.0%} |"
        print(row, flush=True)


if __name__ == "__main__":
    main()
