"""CPU peer benchmark: the moecc TVM MoE op against onnxruntime's fused com.microsoft.MoE.

    PYTHONPATH=. python bench/onnxruntime_peer.py [--experts 128] [--tokens 1 4 16] [--reps 7]

Shape: Qwen3-30B-A3B's MoE layer (E=128, N=768, K=2048, top-k=8; bench_tvm_cpu.make_layer,
same weights), fp32, on the CPU. Both sides do the whole layer: router matmul, softmax
top-k with renormalisation, SwiGLU experts, weighted combine.
    tvm          moecc.backends.tvm.moe_layer (what torch.compile(backend="moecc") runs on CPU)
    onnxruntime  one onnxruntime session holding exactly what moecc's ONNX export writes for
                 this layer (moecc.onnx_export.ort_ops: Gemm router + MoE, gate/up rows
                 interleaved), intra-op threads = torch's thread count; the weights are
                 handed to the session as OrtValues (no 2 GiB protobuf limit)
Each side runs in its own process (--rounds times, interleaved), checks its output against
the per-expert loop (fp32 tolerance) before timing, and takes the median of --reps calls
after one warm-up; the table shows the best of those medians. The floor column is
bench_tvm_cpu's: the distinct experts' weights over the read bandwidth measured in the
same run. A plain script, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from bench.bench_tvm_cpu import best_of_processes, make_layer, median_time, per_expert_loop, routed
from moecc.roofline import cpu_read_bandwidth
from moecc.tolerances import check_close

IMPLS = ("tvm", "onnxruntime")


def onnxruntime_layer(spec, w):
    """A callable x [M, K] -> [M, K] running the layer in one onnxruntime session."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from moecc.onnx_export.export import interleave_rows
    from moecc.onnx_export.ort_ops import ort_function_nodes

    fields = ("router_weight", "gate_up", "down")
    k = spec.experts.hidden_size
    nodes = ort_function_nodes(spec, fields)
    weights = {"router_weight": w.router_weight, "gate_up": interleave_rows(w.gate_up).contiguous(), "down": w.down}
    inputs = [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["M", k])]
    # Initializers declared as external data and handed over in memory (add_external_initializers):
    # no 2 GiB protobuf limit, no file, and onnxruntime sees constants it may prepack.
    inits = []
    for f in fields:
        t = TensorProto(name=f, data_type=TensorProto.FLOAT, dims=list(weights[f].shape))
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", f"{f}.bin"), ("offset", "0"), ("length", str(weights[f].numel() * 4))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        inits.append(t)
    graph = helper.make_graph(nodes, "moe_layer", inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT,
                                                                                          ["M", k])], inits)
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    keep = [ort.OrtValue.ortvalue_from_numpy(weights[f].numpy()) for f in fields]  # alive as long as the session
    options.add_external_initializers(list(fields), keep)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    def run(x):
        return torch.from_numpy(session.run(None, {"hidden": x.numpy()})[0])

    run.keep = keep
    return run


def worker(impl: str, args) -> dict:
    spec, w, g = make_layer(args.experts)
    if impl == "tvm":
        from moecc.backends.tvm import moe_layer

        fn = lambda x: moe_layer(x, w, spec)  # noqa: E731
    else:
        fn = onnxruntime_layer(spec, w)
    out = {}
    for m in args.tokens:
        x = torch.randn(m, spec.experts.hidden_size, generator=g)
        check_close(fn(x), per_expert_loop(x, w, spec), torch.float32)
        ids = routed(x, w, spec)[1]  # [M, k]
        weight_bytes = len(torch.unique(ids)) * 3 * spec.experts.intermediate_size * spec.experts.hidden_size * 4
        out[m] = {"time": median_time(lambda: fn(x), args.reps), "bytes": weight_bytes}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--rounds", type=int, default=2, help="processes per implementation, interleaved")
    p.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    best, weight_bytes = best_of_processes(__file__, IMPLS, args)  # a fresh process per side and round
    bandwidth = cpu_read_bandwidth()
    import onnxruntime

    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}; "
          f"E={args.experts} N=768 K=2048 top_k=8 fp32; best of {args.rounds} processes x median of {args.reps} "
          f"calls; read bandwidth (torch.sum of 1 GiB) {bandwidth / 1e9:.1f} GB/s")
    print("| M | weights read (MB) | floor (ms) | tvm (ms) | onnxruntime (ms) | onnxruntime / tvm | "
          "tvm: floor / time | onnxruntime: floor / time |")
    print("|---|---|---|---|---|---|---|---|")
    for m in args.tokens:
        floor = weight_bytes[m] / bandwidth
        t, o = best["tvm"][m], best["onnxruntime"][m]
        print(f"| {m} | {weight_bytes[m] / 1e6:.0f} | {floor * 1e3:.2f} | {t * 1e3:.2f} | {o * 1e3:.2f} | "
              f"{o / t:.2f}x | {floor / t:.0%} | {floor / o:.0%} |", flush=True)


if __name__ == "__main__":
    main()
