"""One-row bf16 linears: torch.mv (what passes/decode_gemv.py runs) against F.linear, per shape.

    python -m moecc.bench.decode_gemv [--shapes 102400x2048 3072x2048 10944x2048] [--calls 40]

Each shape's weights are cycled through enough copies (> 600 MB) that every call streams
from DRAM; the two ways alternate call by call; median ms and GB/s of each. A plain script.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

DEFAULT_SHAPES = ("102400x2048", "3072x2048", "2048x2048", "576x2048", "10944x2048", "2048x10944")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), metavar="NxK")
    p.add_argument("--calls", type=int, default=40)
    a = p.parse_args(argv)
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    for shape in a.shapes:
        n, k = (int(v) for v in shape.lower().split("x"))
        copies = max(2, int(600e6 // (n * k * 2)) + 1)
        ws = [torch.randn(n, k).bfloat16() for _ in range(copies)]
        x = torch.randn(1, k).bfloat16()
        t_mv, t_lin = [], []
        for i in range(a.calls):
            t0 = time.perf_counter()
            torch.mv(ws[i % copies], x[0])
            t_mv.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            F.linear(x, ws[(i + 1) % copies])
            t_lin.append(time.perf_counter() - t0)
        gb = n * k * 2 / 1e9
        mv, lin = statistics.median(t_mv), statistics.median(t_lin)
        print(f"[{n} x {k}] mv {mv * 1e3:.2f} ms ({gb / mv:.1f} GB/s), F.linear {lin * 1e3:.2f} ms ({gb / lin:.1f} GB/s)")


if __name__ == "__main__":
    main()
