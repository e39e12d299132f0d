"""End to end at a long context: the 4-layer DeepSeek-V2-Lite-width model decoding on the CPU,
moecc vs transformers eager, ms per decode step (issue 11).

    PYTHONPATH=. python bench/mla_e2e.py [--context 2048] [--new-tokens 8] [--dtype bf16|fp32]
                                         [--layers 4] [--tiny] [--option NAME=JSON] [--json out.json]

Model: bench/e2e_decode.py's `deepseek-v2-lite-4l` (DeepSeek-V2-Lite widths: hidden 2048,
16 heads of MLA with kv_lora_rank 512 / rope 64 / nope 128 / v 128, 64 routed experts of
1408 top-6 + 2 shared, first layer dense, vocab 102400), random weights, batch 1, a random
prompt of `--context` tokens, then `--new-tokens` greedy tokens. Variants:
  eager  transformers' own generate (dynamic cache, no compilation): every step expands
         the whole latent cache through kv_b_proj (`expand_kv`)
  moecc  generate(cache_implementation="static", compile_config=CompileConfig(backend=
         "moecc")): the decode step compiled by moecc (MLA absorbed over the latent cache,
         passes/mla_absorb.py; MoE layers on moecc's kernels where captured; the rest of
         the graph eager, which compiles fast), prefill eager as transformers does; the
         CompileReport is checked for the MLA rewrite in every layer.
ms per step: a logits processor timestamps every step; the median (and best) interval
after the first two. Both variants prefill the same prompt first (not timed). One run,
few steps: on a shared machine say whether it was contended.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
SKIP = 2  # intervals dropped: the first compiled steps


def _decode_ms(model, ids, new_tokens: int, **kwargs) -> list[float]:
    from moecc.bench.e2e_decode import _generate, _StepClock

    clock = _StepClock(torch.device("cpu"))
    with torch.no_grad():
        _generate(model, ids, torch.ones_like(ids), new_tokens, clock=clock, **kwargs)
    return clock.intervals_ms()[SKIP:]


def run(context: int, new_tokens: int, dtype: torch.dtype, layers: int, tiny: bool = False,
        options: tuple = ()) -> dict:
    from moecc.bench.e2e_decode import E2EConfig, _new_compile_report, _variant_kwargs, build_model

    model = build_model("deepseek-v2-lite-4l", "cpu", dtype, layers, tiny)
    ids = torch.randint(1, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    eager = _decode_ms(model, ids, new_tokens, disable_compile=True)
    eager_s = time.perf_counter() - t0
    torch._dynamo.reset()
    report = _new_compile_report()
    cfg = E2EConfig(device="cpu", compile_all_devices=True, moecc_options=(("rest_of_graph", "eager"), *options))
    kw = _variant_kwargs("moecc", None, cfg, report)
    t0 = time.perf_counter()
    _decode_ms(model, ids, new_tokens, **kw)  # warm-up: compiles the decode step
    warmup_s = time.perf_counter() - t0
    moecc = _decode_ms(model, ids, new_tokens, **kw)
    rewritten = [g.passes for g in report.graphs]
    mla = sum(p.counters.get("rewritten", 0) for passes in rewritten for p in passes if p.name == "mla_absorb")
    if mla < layers:
        raise RuntimeError(f"moecc rewrote MLA in {mla} of {layers} layers:\n{report.format()}")
    return {"options": dict(options), "context": context, "new_tokens": new_tokens, "dtype": str(dtype), "layers": layers,
            "eager_ms": statistics.median(eager), "eager_best_ms": min(eager), "eager_steps": eager,
            "moecc_ms": statistics.median(moecc), "moecc_best_ms": min(moecc), "moecc_steps": moecc,
            "speedup": statistics.median(eager) / statistics.median(moecc), "mla_rewritten": mla,
            "moe_layers_captured": len(report.captured), "moecc_warmup_s": warmup_s, "eager_run_s": eager_s}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tiny", action="store_true", help="CPU-sized widths (smoke run of the script)")
    p.add_argument("--option", action="append", default=[], metavar="NAME=JSON",
                   help="an extra moecc option, e.g. decode_gemv=false (repeatable)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.new_tokens <= SKIP + 1:
        p.error(f"--new-tokens must be > {SKIP + 1} (the first {SKIP} intervals are dropped)")
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores, torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads), load average {os.getloadavg()[0]:.1f}")
    options = tuple((k, json.loads(v)) for k, v in (o.split("=", 1) for o in args.option))
    r = run(args.context, args.new_tokens, DTYPES[args.dtype], args.layers, args.tiny, options)
    print(f"deepseek-v2-lite widths, {args.layers} layers, {args.dtype}, batch 1, context {args.context}: "
          f"eager {r['eager_ms']:.1f} ms/step (best {r['eager_best_ms']:.1f}), moecc {r['moecc_ms']:.1f} "
          f"(best {r['moecc_best_ms']:.1f}): {r['speedup']:.1f}x; MLA rewritten in {r['mla_rewritten']} "
          f"layer(s), {r['moe_layers_captured']} MoE layer(s) captured; moecc warm-up {r['moecc_warmup_s']:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
