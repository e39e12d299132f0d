"""q / k / v as three packed linears against one over their stacked rows (passes/linear_precision.py).

    python -m moecc.bench.merged_linears [--rows 4096 512 512] [--k 2048] [--format int4] [--group 32]
                                         [--activations int8] [--reps 300]

One bf16 row (batch-1 decode) through backends.tvm.linear.quantized_linear: the separate
calls and the merged call alternate, median of --reps each; the outputs are compared
first (the merge must be bit-identical). The weights fit in the CPU caches, so this times
the per-call cost the merge saves, not DRAM streaming. A plain script, not a test.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", nargs="+", type=int, default=[4096, 512, 512])
    p.add_argument("--k", type=int, default=2048)
    p.add_argument("--format", choices=["int8", "int4"], default="int4")
    p.add_argument("--group", type=int, default=32)
    p.add_argument("--activations", choices=["float", "int8"], default="int8")
    p.add_argument("--reps", type=int, default=300)
    a = p.parse_args(argv)
    from moecc.backends.reference.quantized import quantize_rows
    from moecc.backends.tvm.linear import quantized_linear

    torch.manual_seed(0)
    qs = [quantize_rows(torch.randn(n, a.k) * 0.02, a.format, a.group) for n in a.rows]
    packed, scales = torch.cat([q.packed for q in qs]), torch.cat([q.scales for q in qs])
    x = torch.randn(1, a.k).bfloat16()

    def separate():
        return [quantized_linear(x, q.packed, q.scales, None, a.format, a.group, a.activations) for q in qs]

    def merged():
        return quantized_linear(x, packed, scales, None, a.format, a.group, a.activations)

    if not torch.equal(torch.cat(separate(), -1), merged()):
        raise SystemExit("merged output differs from the separate linears")
    for _ in range(20):
        separate(), merged()
    t_sep, t_mer = [], []
    for _ in range(a.reps):
        t0 = time.perf_counter()
        separate()
        t_sep.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        merged()
        t_mer.append(time.perf_counter() - t0)
    print(f"rows {a.rows} x K {a.k}, {a.format} g{a.group} a={a.activations}, {torch.get_num_threads()} threads: "
          f"separate {statistics.median(t_sep) * 1e6:.0f} us, merged {statistics.median(t_mer) * 1e6:.0f} us "
          f"(median of {a.reps}; outputs identical)")


if __name__ == "__main__":
    main()
