"""One-row 16-bit linears: the kernels moecc::decode_linear can run, against F.linear, per shape.

    python -m moecc.bench.decode_gemv [--shapes 4096x2048 512x2048 2048x4096] [--calls 40]
                                      [--dtype bf16|fp16] [--small-pages]

The ways compared (moecc/decode_ops.py): "tvm" (moecc's TVM GEMV, what passes/decode_gemv.py
picks when apache-tvm is installed), "mv" (torch.mv, its fallback) and torch's F.linear
(what the graph runs without the pass). Each shape's weights are cycled through enough
copies (> 600 MB) that every call streams from DRAM; by default the copies are moved onto
2 MiB pages as the huge_pages pass does for a compiled model's weights (--small-pages
leaves them on 4 KiB pages). The ways alternate call by call; median ms, GB/s and the
fraction of the read-bandwidth floor measured in the same run (moecc.roofline). A plain
script, not a test.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

DEFAULT_SHAPES = ("4096x2048", "512x2048", "2048x4096", "102400x2048", "10944x2048")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), metavar="NxK")
    p.add_argument("--calls", type=int, default=40)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--small-pages", action="store_true", help="leave the weights on 4 KiB pages")
    a = p.parse_args(argv)
    import moecc.decode_ops  # noqa: F401  (defines moecc::decode_linear)
    from moecc.decode_ops import tvm_unfit
    from moecc.huge_pages import collapse
    from moecc.roofline import cpu_read_bandwidth

    dtype = DTYPES[a.dtype]
    op = torch.ops.moecc.decode_linear
    ways = {"mv": lambda x, w: op(x, w, None, "mv"), "F.linear": lambda x, w: F.linear(x, w)}
    bw = cpu_read_bandwidth()  # the floor is always on 2 MiB pages, as in every CPU benchmark
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}, {a.dtype}, "
          f"read bandwidth {bw / 1e9:.1f} GB/s (2 MiB pages)")
    for shape in a.shapes:
        n, k = (int(v) for v in shape.lower().split("x"))
        copies = max(2, int(600e6 // (n * k * dtype.itemsize)) + 1)
        ws = [torch.randn(n, k).to(dtype) for _ in range(copies)]
        pages = "4 KiB pages" if a.small_pages else f"2 MiB pages: {collapse(ws).collapsed_bytes / 2**20:.0f} MiB"
        x = torch.randn(1, k).to(dtype)
        shape_ways = dict(ways)
        why = tvm_unfit(ws[0])
        if not why:
            shape_ways["tvm"] = lambda x, w: op(x, w, None, "tvm")
        times: dict[str, list[float]] = {name: [] for name in shape_ways}
        for i in range(a.calls):
            for j, (name, f) in enumerate(shape_ways.items()):
                w = ws[(i * len(shape_ways) + j) % copies]
                t0 = time.perf_counter()
                f(x, w)
                times[name].append(time.perf_counter() - t0)
        nbytes = n * k * dtype.itemsize
        cols = []
        for name, ts in times.items():
            m = statistics.median(ts[1:])  # the first call of each loads / builds
            cols.append(f"{name} {m * 1e3:.3f} ms ({nbytes / m / 1e9:.1f} GB/s, {100 * nbytes / m / bw:.0f}%)")
        print(f"[{n} x {k}] ({pages}) " + ", ".join(cols) + (f"; tvm: {why}" if why else ""))


if __name__ == "__main__":
    main()
