"""Memory of moecc.quantize_ against the compile-time precision pass, at real widths.

    python -m moecc.bench.quantize_memory [--layers 4] [--precisions int8 int4] [--ways quantize_ pass load]
                                          [--json OUT]

Model: transformers' Qwen3-MoE at Qwen3-30B-A3B widths (hidden 2048, 128 experts of width
768, top-8; bench/cpu_decode.py's model), `--layers` layers, vocabulary 4096, built
directly in bf16 (random weights). Each (precision, way) runs in its own process, so no
run inherits another's freed-but-mapped memory:

    quantize_  moecc.quantize_(model, P), then torch.compile(model, backend="moecc") and
               one forward (the packed layers are taken as they are)
    pass       torch.compile(model, backend="moecc", options={"precision": P}) and one
               forward (the packed stacks are made beside the originals)
    load       moecc.load_quantized(None, file) of the file the quantize_ run saved with
               moecc.save_quantized (model built on the meta device, tensors read one by
               one), then one eager forward

Measured (Linux /proc/self/status): VmRSS after building the model; VmHWM, the resident
high-water mark, reset (/proc/self/clear_refs = 5) right before each phase, so "peak"
is that phase's own peak; VmRSS after it; the bytes of the model's parameters and buffers
(distinct storages) before and after. torch allocates large CPU tensors with mmap, so a
freed stack leaves the RSS at once. tracemalloc cannot see tensor memory; this can.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch

WAYS = ("quantize_", "pass", "load")


def _status() -> dict[str, int]:
    """VmRSS / VmHWM of this process in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value, _unit = line.split()
                out[key.rstrip(":")] = int(value) * 1024
    return out


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def build_model(layers: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    from moecc.bench.cpu_decode import QWEN3_30B_A3B_WIDTHS

    config = AutoConfig.for_model("qwen3_moe", vocab_size=4096, num_hidden_layers=layers, **QWEN3_30B_A3B_WIDTHS)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    model.set_experts_implementation("grouped_mm")
    return model


def worker(way: str, precision: str, layers: int, file: str) -> dict:
    """One process: build, then quantize_ + compile or compile with the pass; or load the
    file the quantize_ run saved; sizes and peaks."""
    import importlib.util

    import moecc
    from moecc.quantize_module import tensor_bytes

    kernels = "tvm" if importlib.util.find_spec("tvm") else "reference"
    if way == "load":
        return load_worker(precision, layers, file)
    t0 = time.perf_counter()
    model = build_model(layers)
    rec = {"way": way, "precision": precision, "layers": layers, "kernel_backend": kernels,
           "build_s": round(time.perf_counter() - t0, 1), "rss_built": _status()["VmRSS"],
           "tensor_bytes_before": tensor_bytes(model)}
    experts = model.model.layers[0].mlp.experts
    rec["layer_expert_bytes"] = sum(p.numel() * p.element_size() for p in experts.parameters())
    rec["expert_bytes"] = rec["layer_expert_bytes"] // experts.gate_up_proj.shape[0]
    del experts  # a reference to the old experts module would keep its stacks alive
    ids = torch.randint(1, 4096, (1, 8), generator=torch.Generator().manual_seed(0))
    if way == "quantize_":
        gc.collect()
        _reset_peak()
        t0 = time.perf_counter()
        report = moecc.quantize_(model, precision)
        gc.collect()
        st = _status()
        rec.update(quantize_s=round(time.perf_counter() - t0, 1), quantize_peak=st["VmHWM"], rss_quantized=st["VmRSS"],
                   tensor_bytes_after=tensor_bytes(model), layers_report=[r.line() for r in report.layers])
        packed = [m for m in model.modules() if type(m).__name__ == "QuantizedMoELayer"]
        rec["layer_packed_bytes"] = max(sum(b.numel() * b.element_size() for n, b in m.named_buffers()
                                            if n in ("gate_up", "down", "gate_up_scale", "down_scale"))
                                        for m in packed) if packed else 0
        options = {}
        t0 = time.perf_counter()
        moecc.save_quantized(model, file)
        rec["save_s"] = round(time.perf_counter() - t0, 1)
    else:
        options = {"precision": precision}
    report = moecc.CompileReport()
    compiled = torch.compile(model, backend="moecc", options={**options, "report": report, "kernel_backend": kernels,
                                                              "rest_of_graph": "eager"})
    gc.collect()
    _reset_peak()
    t0 = time.perf_counter()
    with torch.no_grad():
        logits = compiled(input_ids=ids, use_cache=False).logits
    gc.collect()
    st = _status()
    rec.update(compile_s=round(time.perf_counter() - t0, 1), compile_peak=st["VmHWM"], rss_compiled=st["VmRSS"],
               finite=bool(torch.isfinite(logits).all()),
               prepacked=report.pass_counter("precision_lowering", "prepacked"),
               packed_at_compile=report.pass_counter("precision_lowering", "layers"),
               packed_kib_at_compile=report.pass_counter("precision_lowering", "packed_kib"),
               kernels=report.pass_counter("lower_kernels", kernels))
    if way == "pass":
        rec["tensor_bytes_after"] = tensor_bytes(model) + rec["packed_kib_at_compile"] * 1024
    return rec


def load_worker(precision: str, layers: int, file: str) -> dict:
    """moecc.load_quantized(None, file) (config from the file, meta-device build), one eager forward."""
    import importlib

    import moecc
    from moecc.quantize_module import tensor_bytes

    importlib.import_module("transformers")  # imported before the baseline, as the other ways do
    gc.collect()
    rec = {"way": "load", "precision": precision, "layers": layers, "rss_built": _status()["VmRSS"]}
    _reset_peak()
    t0 = time.perf_counter()
    model = moecc.load_quantized(None, file)
    gc.collect()
    st = _status()
    rec.update(load_s=round(time.perf_counter() - t0, 1), load_peak=st["VmHWM"], rss_loaded=st["VmRSS"],
               tensor_bytes_after=tensor_bytes(model), file_bytes=os.path.getsize(file))
    ids = torch.randint(1, 4096, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        rec["finite"] = bool(torch.isfinite(model(input_ids=ids, use_cache=False).logits).all())
    return rec


def run(layers: int, precisions: list[str], ways: list[str] = WAYS) -> list[dict]:
    if "load" in ways and "quantize_" not in ways:
        raise ValueError("the load way reads the file the quantize_ way saves: give both")
    results = []
    for precision in precisions:
        file = os.path.join(tempfile.gettempdir(), f"moecc-quantize-memory-{os.getpid()}-{precision}.safetensors")
        try:
            for way in [w for w in WAYS if w in ways]:
                results.append(_run_worker(way, precision, layers, file))
                print(format_row(results[-1]), flush=True)
        finally:
            if os.path.exists(file):
                os.remove(file)
    return results


def _run_worker(way: str, precision: str, layers: int, file: str) -> dict:
    cmd = [sys.executable, "-m", "moecc.bench.quantize_memory", "--worker", way, precision,
           "--layers", str(layers), "--file", file]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    line = next((ln for ln in reversed(out.stdout.splitlines()) if ln.startswith("{")), None)
    if out.returncode or line is None:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(line)


def format_row(r: dict) -> str:
    gib = 2 ** 30
    if r["way"] == "load":
        return (f"{r['precision']:>5} load      before {r['rss_built'] / gib:.2f} GiB RSS; load_quantized "
                f"{r['load_s']} s: peak {r['load_peak'] / gib:.2f} GiB, after {r['rss_loaded'] / gib:.2f} GiB "
                f"(tensors {r['tensor_bytes_after'] / gib:.2f} GiB, file {r['file_bytes'] / gib:.2f} GiB); "
                f"forward finite: {r['finite']}")
    head = (f"{r['precision']:>5} {r['way']:<9} model built {r['rss_built'] / gib:.2f} GiB RSS "
            f"(tensors {r['tensor_bytes_before'] / gib:.2f} GiB)")
    if r["way"] == "quantize_":
        head += (f"; quantize_ {r['quantize_s']} s: peak {r['quantize_peak'] / gib:.2f} GiB "
                 f"(+{(r['quantize_peak'] - r['rss_built']) / gib:.2f}; one layer packed "
                 f"{r['layer_packed_bytes'] / gib:.2f}), after {r['rss_quantized'] / gib:.2f} GiB "
                 f"(tensors {r['tensor_bytes_after'] / gib:.2f} GiB)")
    return head + (f"; compile+forward {r['compile_s']} s: peak {r['compile_peak'] / gib:.2f} GiB, after "
                   f"{r['rss_compiled'] / gib:.2f} GiB (tensors incl. compile-time copies "
                   f"{r['tensor_bytes_after'] / gib:.2f} GiB); prepacked {r['prepacked']}, packed at compile "
                   f"{r['packed_at_compile']}, {r['kernels']} layers on {r['kernel_backend']}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--precisions", nargs="+", default=["int8", "int4"])
    p.add_argument("--ways", nargs="+", default=list(WAYS), choices=WAYS,
                   help="which runs (pass needs the most memory: the original model + every packed copy)")
    p.add_argument("--json", default=None, help="write the records here")
    p.add_argument("--worker", nargs=2, metavar=("WAY", "PRECISION"), help=argparse.SUPPRESS)
    p.add_argument("--file", help=argparse.SUPPRESS)  # the quantize_ run saves here, the load run reads it
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.layers, args.file)))
        return 0
    results = run(args.layers, args.precisions, args.ways)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                       "date": time.strftime("%Y-%m-%d"), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
