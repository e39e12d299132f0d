"""CPU end-to-end decode in one run: eager transformers, static cache + Inductor, moecc, llama.cpp.

    moecc bench --cpu --e2e --out DIR [--layers 4] [--batches 1 8] [--dtypes fp32 bf16] [--rounds 1]
                                      [--precisions int8 int4 w8a8 w4a8]

Model: transformers' Qwen3-MoE at Qwen3-30B-A3B widths (hidden 2048, 128 experts of width
768, top-8, 32 query / 4 KV heads of 128), `--layers` layers, vocabulary 4096, untied LM
head, random weights drawn from a fixed seed: every process builds the same model.

Variants (each in its own process, so no variant inherits another's threads, graphs or
caches; `--rounds` interleaves them and keeps each one's best median):
    eager      model.generate() as transformers runs it (dynamic cache, grouped_mm experts)
    static     cache_implementation="static" + CompileConfig() (Inductor), on the CPU
    moecc      the same with CompileConfig(backend="moecc"): TVM kernels for the MoE layers
    moecc P    the same with options={"precision": P} for each of `--precisions` (the
               routed experts in int8 / int4, weight-only or with int8 activations; its
               floor counts the experts at the format's bytes per weight, scales included);
               "P+linears" also sets quantize_linears (attention and LM head packed too,
               counted at the format's bytes as well)
    llama.cpp  llama-cpp-python on a GGUF written from the same weights (F16, Q8_0,
               Q4_K_M), every batch (B sequences in one context); only when llama-cpp-python and gguf are installed (an
               optional peer, never in CI: bench/llamacpp_peer.py). GGUF files are kept
               in $MOECC_CACHE_DIR/gguf (default ~/.cache/moecc/gguf): Q4_K_M
               quantisation of the 4-layer model takes minutes.

ms per decode step: the median interval between consecutive logits-processor calls of a
greedy generate() after a warm-up generate() of the same length (compilation happens
there), the first `skip_steps` intervals dropped. generate()'s own per-step Python work is
included for the torch variants, as a user sees it.

The floor: weight bytes one decode step reads (every non-expert weight, B rows of the
embedding, and per MoE layer the distinct experts the step's routing selects, from an
eager run with hooks) over the read bandwidth (torch.sum over 1 GiB with the same thread
count), measured right before every worker process in the same run. Each variant's
fraction uses the sample taken just before its own process (the machine's bandwidth
moved between 22 and 31 GB/s within one run on the shared build VM); the row's floor
column shows the run's median.

The MoE op guard: in the moecc process the TVM op's per-call time inside the model
(a timer around moecc.backends.tvm.moe_layer during the timed generate) is compared with
the same op called alone on the same layers' weights with fresh hidden states; the ratio
is reported (it was ~1.8 before the TVM kernels moved onto torch's OpenMP threads).
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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from moecc.roofline import cpu_read_bandwidth

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TORCH_VARIANTS = ("eager", "static", "moecc")
LLAMA_QUANTS = ("F16", "Q8_0", "Q4_K_M")
QWEN3_30B_A3B_WIDTHS = dict(
    hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
    norm_topk_prob=True, num_attention_heads=32, num_key_value_heads=4, head_dim=128, rms_norm_eps=1e-6,
    max_position_embeddings=4096, tie_word_embeddings=False)


@dataclass(frozen=True)
class CPUDecodeConfig:
    layers: int = 4
    vocab: int = 4096
    batches: tuple[int, ...] = (1, 8)
    dtypes: tuple[str, ...] = ("fp32", "bf16")
    variants: tuple[str, ...] = (*TORCH_VARIANTS, "llama.cpp")
    rounds: int = 1
    prompt_len: int = 16
    new_tokens: int = 24
    skip_steps: int = 4
    threads: int = 0  # 0: torch's default
    precisions: tuple[str, ...] = ()  # each adds a "moecc <precision>" variant
    seed: int = 0
    widths: dict = field(default_factory=lambda: dict(QWEN3_30B_A3B_WIDTHS))


def build_model(cfg: CPUDecodeConfig, dtype: torch.dtype):
    """The benchmark model with weights from cfg.seed (identical in every process)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("qwen3_moe", vocab_size=cfg.vocab, num_hidden_layers=cfg.layers, **cfg.widths)
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # same draws in every dtype
    return model.to(dtype).eval()


def prompt_ids(cfg: CPUDecodeConfig, batch: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(cfg.seed + 7 * batch)
    return torch.randint(1, cfg.vocab, (batch, cfg.prompt_len), generator=gen)  # [B, P]


# ---------------------------------------------------------------- worker processes

class _OpTimer:
    """Wraps moecc.backends.tvm.moe_layer (what the moecc::moe_layer_tvm op calls) with a clock."""

    def __init__(self):
        import moecc.backends.tvm as tvm_backend

        self.module, self.inner, self.calls = tvm_backend, tvm_backend.moe_layer, []
        self.layers: dict = {}  # data_ptr of gate_up -> (weights, spec) as the op received them
        self.active = False

    def __enter__(self):
        def timed(hidden, weights, spec, config=None):
            t0 = time.perf_counter()
            out = self.inner(hidden, weights, spec, config)
            if self.active:
                self.calls.append((hidden.shape[0], time.perf_counter() - t0))
                self.layers.setdefault(weights.gate_up.data_ptr(), (weights, spec))
            return out

        self.module.moe_layer = timed
        return self

    def __exit__(self, *exc):
        self.module.moe_layer = self.inner


def _isolated_op_ms(layers: list, batch: int, calls: int, seed: int) -> float:
    """Median ms of the TVM op alone on the layers the model ran, cycled, fresh hidden states."""
    import moecc.backends.tvm as tvm_backend

    gen = torch.Generator().manual_seed(seed)
    spec0, dtype = layers[0][1], layers[0][0].router_weight.dtype  # the model dtype (experts may be packed)
    xs = [torch.randn(batch, spec0.experts.hidden_size, generator=gen).to(dtype) for _ in range(8)]
    for w, spec in layers:
        tvm_backend.moe_layer(xs[0], w, spec)  # kernels loaded
    times = []
    for i in range(max(calls, 2 * len(layers))):
        w, spec = layers[i % len(layers)]
        t0 = time.perf_counter()
        tvm_backend.moe_layer(xs[i % len(xs)], w, spec)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def torch_worker(variant: str, dtype_name: str, cfg: CPUDecodeConfig) -> dict:
    """ms/step of one torch variant ("eager", "static", "moecc", "moecc <precision>") at
    every batch size (one model build)."""
    from moecc.bench.e2e_decode import (E2EConfig, _generate, _new_compile_report, _report_summary, _StepClock,
                                        _variant_kwargs, expert_bytes_per_step, routing_stats, weight_bytes_per_step)

    model = build_model(cfg, DTYPES[dtype_name])
    variant, _, precision = variant.partition(" ")
    precision, linears = precision.removesuffix("+linears"), precision.endswith("+linears")
    e2e_cfg = E2EConfig(device="cpu", compile_all_devices=True,
                        moecc_options=((("precision", precision),) if precision else ())
                        + ((("quantize_linears", True),) if linears else ()))
    out = {}
    for batch in cfg.batches:
        ids = prompt_ids(cfg, batch)
        mask = torch.ones_like(ids)
        rec: dict = {}
        if variant == "eager":
            hit = routing_stats(model, ids, mask)
            rec.update(experts_hit_per_layer=hit, weight_bytes_per_step=weight_bytes_per_step(model, batch, hit),
                       expert_bytes_per_step=expert_bytes_per_step(model, hit),
                       linear_bytes_per_step=_linear_bytes(model))
        torch._dynamo.reset()  # each batch compiles from scratch, as in a fresh process
        report = _new_compile_report() if variant == "moecc" else None
        kw = _variant_kwargs(variant, None, e2e_cfg, report)
        t0 = time.perf_counter()
        _generate(model, ids, mask, cfg.new_tokens, **kw)
        rec["warmup_s"] = time.perf_counter() - t0
        clock = _StepClock(torch.device("cpu"))
        timer = _OpTimer() if variant == "moecc" else None
        if timer:
            with timer:
                timer.active = True
                _generate(model, ids, mask, cfg.new_tokens, clock=clock, **kw)
        else:
            _generate(model, ids, mask, cfg.new_tokens, clock=clock, **kw)
        steps = clock.intervals_ms()[cfg.skip_steps:]
        rec.update(step_ms=statistics.median(steps), min_step_ms=min(steps), steps=len(steps))
        if variant == "moecc":
            rec.update(_report_summary(report))
            decode_calls = [s * 1e3 for m, s in timer.calls if m == batch]
            if decode_calls:
                rec["op_in_model_ms"] = statistics.median(decode_calls)
                rec["op_isolated_ms"] = _isolated_op_ms(list(timer.layers.values()), batch, len(decode_calls),
                                                        cfg.seed)
        out[batch] = rec
    return out


def gguf_folder() -> Path:
    """Where GGUF files of the benchmark model are kept between runs (quantising takes minutes)."""
    root = os.environ.get("MOECC_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "moecc") / "gguf"


def llama_worker(cfg: CPUDecodeConfig) -> dict:
    """llama.cpp decode of the same weights and prompts: F16 / Q8_0 / Q4_K_M (files cached),
    every batch in `cfg.batches` (batch 1 through `Llama`, larger batches through the
    low-level batch API, one sequence per prompt). Keys "QTYPE/BATCH"."""
    from moecc.bench import llamacpp_peer as peer

    folder = gguf_folder()
    folder.mkdir(parents=True, exist_ok=True)
    f16 = folder / f"qwen3moe-{cfg.layers}l-v{cfg.vocab}-s{cfg.seed}-F16.gguf"
    if not f16.exists():
        peer.write_gguf(build_model(cfg, torch.float32), f16, dtype="f16", progress=False)
    threads = cfg.threads or torch.get_num_threads()
    out: dict = {"F16_tensor_bytes": peer.gguf_tensor_bytes(f16)}
    for q in LLAMA_QUANTS:
        path = f16 if q == "F16" else f16.with_name(f16.name.replace("-F16", f"-{q}"))
        for batch in cfg.batches:
            prompts = prompt_ids(cfg, batch).tolist()
            try:
                if not path.exists():
                    peer.quantize_gguf(f16, path, q, progress=False)
                res = (peer.decode_ms_per_step(path, prompts[0], cfg.new_tokens, threads) if batch == 1 else
                       peer.decode_batch_ms_per_step(path, prompts, cfg.new_tokens, threads))
            except peer.LlamaCppUnavailable as exc:  # e.g. quantised files on a build with AMX kernels
                out[f"{q}_unavailable"] = str(exc)
                break
            steps = list(res["step_ms"])[cfg.skip_steps:]
            out[f"{q}/{batch}"] = {"step_ms": statistics.median(steps), "min_step_ms": min(steps),
                                   "steps": len(steps), "tensor_bytes": peer.gguf_tensor_bytes(path)}
    return out


# ---------------------------------------------------------------- the parent

def llama_available() -> str | None:
    """None when the llama.cpp peer can run, else why not."""
    import importlib.util

    missing = [m for m in ("llama_cpp", "gguf") if importlib.util.find_spec(m) is None]
    if missing:
        return f"not installed: pip install {' '.join('llama-cpp-python' if m == 'llama_cpp' else m for m in missing)}"
    return None


def _run_worker(args: list[str], threads: int) -> dict:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "moecc.bench.cpu_decode", "--worker", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {done.stderr.strip()[-1500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(cfg: CPUDecodeConfig, out_dir: str | os.PathLike, command: str = "moecc bench --cpu --e2e",
        log=lambda s: print(s, file=sys.stderr, flush=True)) -> dict:
    """Every variant in its own process, `rounds` times interleaved; results.json-style dict."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg_json = json.dumps(asdict(cfg))
    bandwidths: list[float] = []
    best: dict = {}  # (variant, dtype) -> batch -> record
    notes: list[str] = []
    jobs = [(v, d) for d in cfg.dtypes for v in (*cfg.variants, *_precision_variants(cfg)) if _is_torch_variant(v)]
    llama_reason = llama_available() if "llama.cpp" in cfg.variants else "not asked for"
    if "llama.cpp" in cfg.variants:
        if llama_reason is None:
            jobs.append(("llama.cpp", "-"))
        else:
            notes.append(f"llama.cpp peer skipped: {llama_reason}")
    started = time.perf_counter()
    for rnd in range(cfg.rounds):
        for variant, dtype_name in jobs:
            bandwidths.append(cpu_read_bandwidth())
            log(f"[cpu-decode] round {rnd + 1}/{cfg.rounds} {variant:<9} {dtype_name:<4} "
                f"(read bandwidth now {bandwidths[-1] / 1e9:.1f} GB/s, {time.perf_counter() - started:.0f} s so far)")
            try:
                res = _run_worker([variant, dtype_name, cfg_json, str(out)], cfg.threads)
            except RuntimeError as exc:
                notes.append(f"round {rnd + 1} {variant} {dtype_name}: {exc}"[:2000])
                log(f"[cpu-decode]   failed: {str(exc)[-400:]}")
                continue
            slot = best.setdefault((variant, dtype_name), {})
            for key, rec in res.items():
                if key.endswith("_unavailable"):
                    notes.append(f"llama.cpp {key.split('_unavailable')[0]}: {rec}"[:600])
                elif not isinstance(rec, dict):
                    slot[key] = rec
                elif key not in slot or rec["step_ms"] < slot[key]["step_ms"]:
                    slot[key] = dict(rec, read_bandwidth=bandwidths[-1])  # measured just before this process
    return _assemble(cfg, best, bandwidths, notes, time.perf_counter() - started, command)


def _assemble(cfg: CPUDecodeConfig, best: dict, bandwidths: list[float], notes: list[str], elapsed: float,
              command: str) -> dict:
    """Rows of (dtype, batch). Each variant's fraction divides its bytes per step by the bandwidth
    measured right before its own process (the conditions it ran under); the row's floor
    column uses the run's median bandwidth."""
    bw_median = statistics.median(bandwidths) if bandwidths else float("nan")

    def with_fraction(rec: dict, nbytes: float) -> dict:
        floor_ms = nbytes / rec["read_bandwidth"] * 1e3
        return dict(rec, floor_ms=floor_ms, fraction=floor_ms / rec["step_ms"])

    rows = []
    for dtype_name in cfg.dtypes:
        eager = best.get(("eager", dtype_name), {})
        for batch in cfg.batches:
            wbytes = eager.get(str(batch), {}).get("weight_bytes_per_step")
            row = {"dtype": dtype_name, "batch": batch, "weight_bytes_per_step": wbytes,
                   "floor_ms": wbytes / bw_median * 1e3 if wbytes else None, "variants": {}}
            for variant in (*TORCH_VARIANTS, *_precision_variants(cfg)):
                rec = best.get((variant, dtype_name), {}).get(str(batch))
                if rec:
                    nbytes = wbytes and _variant_bytes(variant, eager.get(str(batch), {}), DTYPES[dtype_name])
                    row["variants"][variant] = with_fraction(rec, nbytes) if nbytes else rec
            rows.append(row)
    llama = best.get(("llama.cpp", "-"), {})
    for batch in cfg.batches:
        with_bytes = [r for r in rows if r["batch"] == batch and r["weight_bytes_per_step"]]
        if not llama or not with_bytes:
            continue
        # llama.cpp reads the same tensors in another encoding: its bytes per step are the
        # 16-bit bytes per step scaled by the file's tensor bytes over the F16 file's.
        row = next((r for r in with_bytes if r["dtype"] == "bf16"), with_bytes[0])
        bytes16 = row["weight_bytes_per_step"] * 2 / DTYPES[row["dtype"]].itemsize
        for q in LLAMA_QUANTS:
            rec = llama.get(f"{q}/{batch}")
            if rec:
                qbytes = bytes16 * rec["tensor_bytes"] / llama["F16_tensor_bytes"]
                row["variants"][f"llama.cpp {q}"] = with_fraction(dict(rec, weight_bytes_per_step=qbytes), qbytes)
    return {"schema_version": 2, "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": command, "environment": environment(), "config": asdict(cfg), "read_bandwidth_gbps": {
                "max": max(bandwidths) / 1e9 if bandwidths else None,
                "min": min(bandwidths) / 1e9 if bandwidths else None,
                "median": bw_median / 1e9, "samples": [b / 1e9 for b in bandwidths]},
            "rows": rows, "notes": notes, "elapsed_s": elapsed}


def _precision_variants(cfg: CPUDecodeConfig) -> tuple[str, ...]:
    return tuple(f"moecc {p}" for p in cfg.precisions)


def _is_torch_variant(variant: str) -> bool:
    return variant in TORCH_VARIANTS or variant.startswith("moecc ")


def _linear_bytes(model) -> float:
    """Bytes of the linear layers outside the MoE blocks (attention, LM head): what
    quantize_linears packs. The routers live under `.mlp.` and stay in the model dtype."""
    return float(sum(m.weight.numel() * m.weight.element_size() for name, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear) and ".mlp." not in f".{name}."))


def _variant_bytes(variant: str, eager_rec: dict, dtype: torch.dtype) -> float | None:
    """Weight bytes one step of `variant` reads: the eager model's, with the routed experts
    (and for "P+linears" the linears outside the MoE blocks) at the precision's bytes per
    weight (int8 1, int4 0.5, plus one fp32 scale per group; per-row scales counted at one
    per 768 weights, the expert width) for "moecc P"."""
    total = eager_rec.get("weight_bytes_per_step")
    if not total or not variant.startswith("moecc "):
        return total
    from moecc.precision import parse_precision

    name = variant.split(" ", 1)[1]
    cfg = parse_precision(name.removesuffix("+linears"))
    packed = eager_rec["expert_bytes_per_step"] + (eager_rec["linear_bytes_per_step"]
                                                   if name.endswith("+linears") else 0.0)
    per_value = (0.5 if cfg.weight_format == "int4" else 1.0) + 4.0 / (cfg.group_size or QWEN3_30B_A3B_WIDTHS[
        "moe_intermediate_size"])
    return total - packed + packed / dtype.itemsize * per_value


def environment() -> dict:
    import importlib.metadata as md

    def version(name, module=None):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            pass
        if module:  # importable without package metadata (a build on PYTHONPATH)
            try:
                return getattr(__import__(module), "__version__", None)
            except Exception:  # noqa: BLE001 - a broken optional peer is just "unknown"
                return None
        return None

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": version("transformers"), "apache-tvm": version("apache-tvm"),
            "llama-cpp-python": version("llama_cpp_python", "llama_cpp"), "python": platform.python_version()}


def format_table(results: dict) -> str:
    """Markdown: ms per step (fraction of the read-bandwidth floor) per variant, then the op guard."""
    bw = results["read_bandwidth_gbps"]
    cols = list(dict.fromkeys(v for r in results["rows"] for v in r["variants"]))
    lines = [f"read bandwidth (torch.sum, 1 GiB, before each process): median {bw['median']:.1f} GB/s, "
             f"min {bw['min'] or 0:.1f}, max {bw['max'] or 0:.1f} over {len(bw['samples'])} samples; floor column at "
             "the median; each variant's fraction (in parentheses) against the bandwidth measured just before it ran",
             "", "| weights | batch | MB read / step | floor (ms) | " + " | ".join(cols) + " |",
             "|---|---|---|---|" + "---|" * len(cols)]
    for r in results["rows"]:
        cells = []
        for c in cols:
            rec = r["variants"].get(c)
            cells.append(f"{rec['step_ms']:.1f} ({100 * rec['fraction']:.0f}%)" if rec and rec.get("fraction")
                         else (f"{rec['step_ms']:.1f}" if rec else "-"))
        mb = f"{r['weight_bytes_per_step'] / 1e6:.0f}" if r["weight_bytes_per_step"] else "-"
        floor = f"{r['floor_ms']:.1f}" if r["floor_ms"] else "-"
        lines.append(f"| {r['dtype']} | {r['batch']} | {mb} | {floor} | " + " | ".join(cells) + " |")
    guard = [(r["dtype"], r["batch"], r["variants"]["moecc"]) for r in results["rows"]
             if "op_in_model_ms" in r["variants"].get("moecc", {})]
    if guard:
        lines += ["", "| weights | batch | MoE op in the model (ms/call) | same op alone (ms/call) | ratio |",
                  "|---|---|---|---|---|"]
        lines += [f"| {d} | {b} | {m['op_in_model_ms']:.2f} | {m['op_isolated_ms']:.2f} | "
                  f"{m['op_in_model_ms'] / m['op_isolated_ms']:.2f} |" for d, b, m in guard]
    for n in results["notes"]:
        lines.append(f"\nnote: {n}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", nargs=4, metavar=("VARIANT", "DTYPE", "CONFIG_JSON", "OUT"), required=True)
    a = p.parse_args(argv)
    variant, dtype_name, cfg_json, out = a.worker
    raw = json.loads(cfg_json)
    cfg = CPUDecodeConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    res = llama_worker(cfg) if variant == "llama.cpp" else torch_worker(variant, dtype_name, cfg)
    print(json.dumps({str(k): v for k, v in res.items()}))


if __name__ == "__main__":
    main()
