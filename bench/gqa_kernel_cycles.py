"""Compute cost of the GQA decode kernels per (cache slot, KV head): one thread, cache hot.

    PYTHONPATH=. python bench/gqa_kernel_cycles.py [--contexts 2048 4096 8192] [--calls 40]

Qwen3-30B-A3B widths (Hq=32, Hkv=4, D=128), batch 1, one query token, bf16 and fp32.
Each variant is the whole op (moecc/gqa.py, host work included) on the same cache every
call (so it stays in L2/L3: this measures the kernel's arithmetic and instruction cost,
not DRAM), on one thread, timed with the thread's CPU time (time.thread_time), so that
other jobs on a shared machine do not add to it (they still share caches and memory).
Best of `--calls`. Cycles = seconds x the nominal clock from /proc/cpuinfo.
Variants: "amx" / "bf16" (`vdpbf16ps`) / "widen" (bf16 widened to fp32 FMAs) are the TVM
kernel's multiply forms for bf16 (backends/tvm/attention.dot_kind, forced here; a form the
CPU lacks is skipped); "fp32" the TVM kernel on fp32; "flash" torch's flash CPU kernel.
Read with docs/kv_cache.md: the floor's budget per (slot, head) at B GB/s over two cores
is 2 x clock x bytes / B cycles (bytes = 512 in bf16, 1024 in fp32 at D = 128).
"""

from __future__ import annotations

import argparse
import time

import torch

HQ, HKV, D = 32, 4, 128


def nominal_hz() -> float:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return float(line.split(":")[1]) * 1e6
    except OSError:
        pass
    return float("nan")


def best_thread_time(fn, calls: int) -> float:
    fn()
    times = []
    for _ in range(calls):
        t0 = time.thread_time()
        fn()
        times.append(time.thread_time() - t0)
    return min(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", nargs="+", type=int, default=[2048, 4096, 8192])
    p.add_argument("--calls", type=int, default=40)
    args = p.parse_args(argv)
    import moecc.backends.tvm.attention as tvm_attention
    from moecc.gqa import gqa_decode_attention_reference as op

    torch.set_num_threads(1)  # one OpenMP thread: the parallel region runs on this thread
    hz = nominal_hz()
    real_dot = tvm_attention.dot_kind
    forms = [f for f, feature in (("amx", "amx_bf16"), ("bf16", "avx512_bf16")) if tvm_attention.cpu_has(feature)]
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, nominal clock {hz / 1e9:.2f} GHz, 1 thread, "
          "thread CPU time, best of %d; cycles per (slot, KV head)" % args.calls)
    print("| dtype | context | variant | ms | cycles / (slot, head) |")
    print("|---|---|---|---|---|")
    for dtype in (torch.bfloat16, torch.float32):
        for ctx in args.contexts:
            g = torch.Generator().manual_seed(ctx)
            q = torch.randn(1, HQ, 1, D, generator=g).to(dtype)
            k = torch.randn(1, HKV, ctx, D, generator=g).to(dtype)
            v = torch.randn(1, HKV, ctx, D, generator=g).to(dtype)
            variants = {}
            if dtype == torch.bfloat16:
                for form in forms + ["widen"]:
                    variants[form] = form if form != "widen" else "fp32"
            else:
                variants["fp32"] = "fp32"
            results = {}
            try:
                for name, form in variants.items():
                    tvm_attention.dot_kind = lambda *a, form=form: form
                    results[name] = best_thread_time(lambda: op(q, k, v, None, None, D ** -0.5, kernel="tvm"),
                                                     args.calls)
            finally:
                tvm_attention.dot_kind = real_dot
            results["flash"] = best_thread_time(lambda: op(q, k, v, None, None, D ** -0.5, kernel="flash"),
                                                args.calls)
            for name, t in results.items():
                print(f"| {str(dtype).removeprefix('torch.')} | {ctx} | {name} | {t * 1e3:.3f} | "
                      f"{t * hz / (ctx * HKV):.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
