"""moecc benchmarks: MoE-layer kernel comparisons against the roofline floor, and
end-to-end decode.

In a source checkout this directory imports as `moecc.bench` (moecc/__init__.py adds the
repository root to the package path, as it does for passes/ and backends/); modules here
import each other relatively so they also work when pytest imports them as `bench.*`.
Nothing here runs at import time: torch, triton and matplotlib are imported where used.

    roofline.py        ceilings (copy bandwidth, bf16 matmul rate) and the floor
    timing.py          eager and CUDA-graph timers (CUDA events, L2 flushed) and a CPU timer
    workload.py        per-shape layer specs, random weights and inputs
    implementations.py the baselines and the moecc kernels behind one calling convention
    kernel_sweep.py    shapes x M x implementation x mode, checked, then timed
    e2e_decode.py      transformers models at real widths: ms per decode step
    report.py          results.json, the plot, the printed tables
    run_all.py         what `moecc bench` runs
    conftest.py, test_moe_layer_bench.py   the same comparison as pytest-benchmark tests
    bench_tvm_cpu.py   TVM kernels on a CPU (see its docstring)
"""
