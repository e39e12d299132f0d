"""The demo model's decode step on the CPU: eager transformers, moecc, and onnxruntime's fused MoE.

    python -m moecc.bench.onnxruntime_decode --out DIR [--model qwen3-moe-stdlib] [--batches 1 4]
                                              [--rounds 2] [--new-tokens 32]
    python -m moecc.bench.onnxruntime_decode --out DIR --model qwen3-30b-a3b-widths --layers 1

Model: `moecc demo`'s (a trained model shipped with moecc, fp32), greedy decode of the demo
prompt (batch B: the prompt repeated B times, so every sequence routes alike); or
bench/cpu_decode.py's model at Qwen3-30B-A3B widths (random weights, `--layers` layers, its
B different 16-token prompts), where the expert weights, not the per-step overheads, decide. Variants, each in its own process (no
thread pool, graph or cache is inherited), `--rounds` times interleaved, best median kept:
    eager             model.generate() as transformers runs it
    moecc             generate() with the static cache and CompileConfig(backend="moecc")
    moecc step        the same compiled decode step called in a plain loop (static cache, argmax,
                      no generate()): what a serving loop around moecc pays, comparable with
                      onnxruntime's session.run loop
    onnxruntime       the decode step exported by moecc.onnx_export.export_onnx_decoder (MoE
                      layers as com.microsoft.MoE, the KV cache as inputs / outputs), run by
                      OnnxDecoder in one onnxruntime session, intra-op threads = torch's
    onnxruntime std   the same file with every MoE layer in standard ONNX ops
ms per decode step: torch variants, the median interval between consecutive logits-processor
calls of a greedy generate() after a warm-up one (as bench/cpu_decode.py); onnxruntime,
the median of argmax + session.run per step. The first `--skip-steps` steps are dropped.
Every variant's greedy tokens are compared with eager's (column "same tokens").

The floor: the weight bytes one decode step reads (bench/cpu_decode.py's count: every
non-expert weight, B embedding rows, the distinct experts the step's routing selects, from
the eager run with hooks) over the read bandwidth (torch.sum over 1 GiB) measured before
each process; the demo model's weights sit in the CPU caches, so its fraction can exceed
100%. A plain script, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from moecc.roofline import cpu_read_bandwidth

VARIANTS = ("eager", "moecc", "moecc step", "onnxruntime", "onnxruntime std")


@dataclass(frozen=True)
class DecodeBenchConfig:
    model: str = "qwen3-moe-stdlib"
    batches: tuple[int, ...] = (1, 4)
    variants: tuple[str, ...] = VARIANTS
    rounds: int = 2
    new_tokens: int = 32
    skip_steps: int = 4
    threads: int = 0  # 0: torch's default
    layers: int = 1  # WIDE_MODEL only


WIDE_MODEL = "qwen3-30b-a3b-widths"  # bench/cpu_decode.py's model (random weights), `layers` of them


def _model_and_prompt(cfg: DecodeBenchConfig, batch: int):
    """The model (fp32, eval) and the prompt ids [B, P]."""
    if cfg.model == WIDE_MODEL:
        from moecc.bench.cpu_decode import CPUDecodeConfig, build_model as build_wide, prompt_ids

        wide = CPUDecodeConfig(layers=cfg.layers)
        return build_wide(wide, torch.float32), prompt_ids(wide, batch)  # B different prompts
    from moecc.commands.demo import DEMO_PROMPT
    from moecc.models import build_model
    from moecc.tokenizer import ByteTokenizer

    model = build_model(cfg.model, dtype=torch.float32, device="cpu").eval()
    ids = ByteTokenizer()(DEMO_PROMPT, return_tensors="pt")["input_ids"].repeat(batch, 1)  # [B, P]
    return model, ids


def torch_worker(variant: str, cfg: DecodeBenchConfig) -> dict:
    from moecc.bench.e2e_decode import (E2EConfig, _generate, _StepClock, _variant_kwargs, routing_stats,
                                        weight_bytes_per_step)

    out = {}
    for batch in cfg.batches:
        model, ids = _model_and_prompt(cfg, batch)
        mask = torch.ones_like(ids)
        torch._dynamo.reset()
        kw = _variant_kwargs(variant, None, E2EConfig(device="cpu", compile_all_devices=True))
        with torch.no_grad():
            _generate(model, ids, mask, cfg.new_tokens, **kw)  # warm-up (compiles)
            clock = _StepClock(torch.device("cpu"))
            tokens = _generate(model, ids, mask, cfg.new_tokens, clock=clock, **kw)[:, ids.shape[1]:]
        steps = clock.intervals_ms()[cfg.skip_steps:]
        out[str(batch)] = {"step_ms": statistics.median(steps), "min_step_ms": min(steps), "steps": len(steps),
                           "tokens": tokens.tolist(),
                           "weight_bytes": weight_bytes_per_step(model, batch, routing_stats(model, ids, mask))
                           if variant == "eager" else None}
    return out


def moecc_step_worker(cfg: DecodeBenchConfig) -> dict:
    """The compiled decode step alone: prefill eagerly into a StaticCache, then one compiled
    forward (backend="moecc") + argmax per token."""
    from transformers import StaticCache

    from moecc.onnx_export.decoder import cache_argument

    out = {}
    for batch in cfg.batches:
        model, ids = _model_and_prompt(cfg, batch)
        torch._dynamo.reset()
        arg = cache_argument(model)
        step = torch.compile(model.forward, backend="moecc", fullgraph=True, dynamic=False)

        def greedy(clock: list):
            p = ids.shape[1]
            cache = StaticCache(config=model.config, max_cache_len=p + cfg.new_tokens)
            logits = model(input_ids=ids, use_cache=True, **{arg: cache}).logits[:, -1]
            tokens = []
            for i in range(cfg.new_tokens):
                t0 = time.perf_counter()
                tok = logits.argmax(-1, keepdim=True)  # [B, 1]
                tokens.append(tok)
                if i == cfg.new_tokens - 1:
                    break
                pos = torch.tensor([p + i])
                logits = step(input_ids=tok, position_ids=pos.expand(batch, 1), cache_position=pos, use_cache=True,
                              **{arg: cache}).logits[:, -1]
                clock.append((time.perf_counter() - t0) * 1e3)
            return torch.cat(tokens, 1)

        with torch.no_grad():
            greedy([])  # warm-up (compiles)
            clock: list = []
            tokens = greedy(clock)
        steps = clock[cfg.skip_steps:]
        out[str(batch)] = {"step_ms": statistics.median(steps), "min_step_ms": min(steps), "steps": len(steps),
                           "tokens": tokens.tolist()}
    return out


def onnxruntime_worker(variant: str, cfg: DecodeBenchConfig, out_dir: Path) -> dict:
    from moecc.onnx_export.decoder import OnnxDecoder, export_onnx_decoder

    standard = variant.endswith("std")
    path = out_dir / f"{cfg.model}-decoder{'-std' if standard else ''}.onnx"
    model, _ = _model_and_prompt(cfg, 1)
    route = None
    if not path.exists():  # the first round exports; later rounds reuse the file
        report = export_onnx_decoder(model, str(path), onnxruntime_ops=not standard)
        route = sorted({layer.route for layer in report.layers})
    decoder = OnnxDecoder(str(path), threads=cfg.threads or torch.get_num_threads())
    out = {}
    for batch in cfg.batches:
        _, ids = _model_and_prompt(cfg, batch)
        decoder.greedy(ids.numpy(), cfg.new_tokens)  # warm-up
        res = decoder.greedy(ids.numpy(), cfg.new_tokens)
        steps = res.step_ms[cfg.skip_steps:]  # one per decode step, like the torch clock's intervals
        out[str(batch)] = {"step_ms": statistics.median(steps), "min_step_ms": min(steps), "steps": len(steps),
                           "tokens": res.tokens.tolist(), "routes": route}
    return out


def _run_worker(variant: str, cfg: DecodeBenchConfig, out_dir: Path) -> dict:
    env = dict(os.environ)
    if cfg.threads:
        env["OMP_NUM_THREADS"] = str(cfg.threads)
    cmd = [sys.executable, "-m", "moecc.bench.onnxruntime_decode", "--worker", variant, json.dumps(asdict(cfg)),
           str(out_dir)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{variant} failed: {done.stderr.strip()[-1500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(cfg: DecodeBenchConfig, out_dir, log=lambda s: print(s, file=sys.stderr, flush=True)) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    best: dict = {}
    bandwidths, notes = [], []
    with tempfile.TemporaryDirectory(prefix="moecc-ort-") as files:
        for rnd in range(cfg.rounds):
            for variant in cfg.variants:
                bandwidths.append(cpu_read_bandwidth())
                log(f"[ort-decode] round {rnd + 1}/{cfg.rounds} {variant} (read bandwidth {bandwidths[-1] / 1e9:.1f} GB/s)")
                try:
                    res = _run_worker(variant, cfg, Path(files))
                except RuntimeError as exc:
                    notes.append(str(exc)[:1500])
                    continue
                for batch, rec in res.items():
                    slot = best.setdefault(variant, {})
                    if batch not in slot or rec["step_ms"] < slot[batch]["step_ms"]:
                        slot[batch] = dict(rec, read_bandwidth=bandwidths[-1])
    rows = []
    for batch in map(str, cfg.batches):
        eager = best.get("eager", {}).get(batch)
        wbytes = eager["weight_bytes"] if eager else None
        row = {"batch": int(batch), "weight_bytes": wbytes, "variants": {}}
        for variant in cfg.variants:
            rec = best.get(variant, {}).get(batch)
            if not rec:
                continue
            rec = dict(rec, same_tokens=(rec["tokens"] == eager["tokens"]) if eager else None)
            if wbytes:
                rec["fraction"] = wbytes / rec["read_bandwidth"] * 1e3 / rec["step_ms"]
            row["variants"][variant] = rec
        rows.append(row)
    return {"created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "config": asdict(cfg),
            "read_bandwidth_gbps": [b / 1e9 for b in bandwidths], "rows": rows, "notes": notes}


def format_table(res: dict) -> str:
    cols = list(res["config"]["variants"])
    bw = res["read_bandwidth_gbps"]
    lines = [f"model {res['config']['model']} (fp32), greedy decode, read bandwidth {min(bw):.1f}-{max(bw):.1f} GB/s; "
             "ms per step (fraction of the weight-streaming floor), same tokens as eager", "",
             "| batch | MB read / step | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for row in res["rows"]:
        cells = []
        for c in cols:
            rec = row["variants"].get(c)
            if not rec:
                cells.append("-")
                continue
            frac = f" ({100 * rec['fraction']:.0f}%)" if rec.get("fraction") else ""
            same = "" if rec.get("same_tokens") in (None, True) else ", tokens differ"
            cells.append(f"{rec['step_ms']:.2f}{frac}{same}")
        mb = f"{row['weight_bytes'] / 1e6:.1f}" if row["weight_bytes"] else "-"
        lines.append(f"| {row['batch']} | {mb} | " + " | ".join(cells) + " |")
    lines += [f"\nnote: {n}" for n in res["notes"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", nargs=3, metavar=("VARIANT", "CONFIG_JSON", "DIR"), help=argparse.SUPPRESS)
    p.add_argument("--out", default="bench_results/onnxruntime_decode")
    p.add_argument("--model", default=DecodeBenchConfig.model,
                   help=f"a built-in or trained model, or {WIDE_MODEL} (bench/cpu_decode.py's random-weight "
                        "model at Qwen3-30B-A3B widths, vocabulary 4096; --layers of them)")
    p.add_argument("--layers", type=int, default=DecodeBenchConfig.layers, help=f"{WIDE_MODEL} only")
    p.add_argument("--batches", nargs="+", type=int, default=list(DecodeBenchConfig.batches))
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--rounds", type=int, default=DecodeBenchConfig.rounds)
    p.add_argument("--new-tokens", type=int, default=DecodeBenchConfig.new_tokens)
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args(argv)
    if a.worker:
        variant, cfg_json, files = a.worker
        raw = json.loads(cfg_json)
        cfg = DecodeBenchConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        res = (onnxruntime_worker(variant, cfg, Path(files)) if variant.startswith("onnxruntime")
               else moecc_step_worker(cfg) if variant == "moecc step" else torch_worker(variant, cfg))
        print(json.dumps(res))
        return 0
    if a.new_tokens <= DecodeBenchConfig.skip_steps + 1 or min(a.batches) < 1 or a.rounds < 1:
        p.error(f"--new-tokens must exceed {DecodeBenchConfig.skip_steps + 1}; --batches and --rounds >= 1")
    cfg = DecodeBenchConfig(model=a.model, batches=tuple(a.batches), variants=tuple(a.variants), rounds=a.rounds,
                            new_tokens=a.new_tokens, threads=a.threads, layers=a.layers)
    res = run(cfg, a.out)
    Path(a.out, "onnxruntime_decode.json").write_text(json.dumps(res, indent=1))
    table = format_table(res)
    Path(a.out, "onnxruntime_decode.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
