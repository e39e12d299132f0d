"""One MLA attention layer's decode step: moecc's absorbed op vs transformers' path (issue 11).

    PYTHONPATH=. python bench/mla_decode.py [--widths v3 v2-lite] [--contexts 512 2048 8192]
                                            [--reps 3] [--no-layer] [--json out.json]

For each width set and context L (the static cache holds L live tokens, one new token is
decoded, batch 1, fp32, random weights):
  core   the attention over the cache alone: transformers' `expand_kv` (kv_b_proj over the
         whole latent cache, K = [k_nope | rope]) + SDPA, vs moecc::mla_attention (absorbed).
  layer  the whole attention module (DeepseekV3Attention: q/kv projections, rope, the
         static-cache write, attention, o_proj) eager, vs the same module compiled with
         backend="moecc" (rest of the graph eager), where passes/mla_absorb.py replaced the
         attention; the CompileReport is checked for the rewrite.
Both variants of a row run on the same inputs, interleaved, after one warm-up each: at least
`--reps` timed calls, more for fast calls (about 1 s of them, at most 50); median and best
reported; the outputs are compared (fp32 tolerance). Peak temporary
memory: the highest sum of live torch CPU allocations during one call (torch.profiler with
profile_memory), i.e. what the step allocates on top of weights and cache.
Floor (absorbed core): max(bytes / read bandwidth, flops / GEMM rate), both measured in the
same run (torch.sum over 1 GiB; a 2048^3 fp32 matmul); bytes = the latent + rope cache read
twice (scores, context) and kv_b_proj's weight once, flops = 2 * H * L * (2R + Dr) + the
absorption. The machine is shared by other jobs: few repetitions, numbers under contention.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

WIDTHS = {
    # name: (hidden, heads, q_lora_rank, kv_lora_rank, rope, nope, value)
    "v3": (7168, 128, 1536, 512, 64, 128, 128),
    "v2-lite": (2048, 16, None, 512, 64, 128, 128),
}


def _config(name: str):
    from transformers import DeepseekV3Config

    hidden, heads, q_lora, rank, rope, nope, value = WIDTHS[name]
    config = DeepseekV3Config(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=heads,
                              q_lora_rank=q_lora, kv_lora_rank=rank, qk_rope_head_dim=rope,
                              qk_nope_head_dim=nope, v_head_dim=value, num_hidden_layers=1,
                              max_position_embeddings=16384, vocab_size=256, rope_interleave=True)
    config._attn_implementation = "sdpa"
    return config


def peak_temporary_bytes(fn) -> int:
    """Highest sum of live torch CPU allocations made during fn() (freed ones subtracted)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def _time_pair(fns: dict, reps: int) -> tuple[dict, dict]:
    """(median, best) ms of each fn, calls interleaved (contention hits both alike), one
    warm-up each. Other jobs only ever add time, so the best call is the less noisy one."""
    counts = {}
    for k, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        counts[k] = int(min(50, max(reps, 1.0 / max(time.perf_counter() - t0, 1e-4))))  # ~1 s of calls
    samples = {k: [] for k in fns}
    for r in range(max(counts.values())):
        for k, fn in fns.items():
            if r < counts[k]:
                t0 = time.perf_counter()
                fn()
                samples[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in samples.items()}, {k: min(v) for k, v in samples.items()}


def _gemm_rate() -> float:
    a = torch.randn(2048, 2048)
    a @ a
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t0)
    return 2 * 2048 ** 3 / best


def core_row(name: str, ctx: int, reps: int, bandwidth: float, gemm: float) -> dict:
    import moecc.mla  # noqa: F401  (defines moecc::mla_attention)

    _, h, _, r, dr, dn, dv = WIDTHS[name]
    g = torch.Generator().manual_seed(ctx)
    q = torch.randn(1, h, 1, dn + dr, generator=g)  # [B, H, S, Dn+Dr]
    latent = torch.randn(1, 1, ctx, r, generator=g)  # [B, 1, L, R]
    rope = torch.randn(1, 1, ctx, dr, generator=g)  # [B, 1, L, Dr]
    w = torch.randn(h * (dn + dv), r, generator=g) / r ** 0.5  # kv_b_proj.weight
    mask = torch.ones(1, 1, 1, ctx, dtype=torch.bool)
    scale = (dn + dr) ** -0.5

    def transformers_path():  # modeling_deepseek_v3.expand_kv + sdpa_attention_forward
        kv = F.linear(latent, w).view(1, ctx, -1, dn + dv).transpose(1, 2)
        k_nope, v = torch.split(kv, [dn, dv], dim=-1)
        k = kv.new_empty(*kv.shape[:-1], dn + dr)
        k[..., :dn].copy_(k_nope)
        k[..., dn:].copy_(rope.expand(-1, h, -1, -1))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)

    def moecc_path():
        return torch.ops.moecc.mla_attention(q, latent, rope, w, mask, scale, False, dn, dv)

    torch.testing.assert_close(moecc_path(), transformers_path(), rtol=1e-4, atol=1e-5)
    ms, best = _time_pair({"transformers": transformers_path, "moecc": moecc_path}, reps)
    moved = 4 * (2 * ctx * (r + dr) + w.numel())
    flops = 2 * h * ctx * (2 * r + dr) + 2 * h * r * (dn + dv)
    floor_ms = max(moved / bandwidth, flops / gemm) * 1e3
    return {"widths": name, "part": "core", "context": ctx, "transformers_ms": ms["transformers"],
            "moecc_ms": ms["moecc"], "speedup": ms["transformers"] / ms["moecc"],
            "transformers_best_ms": best["transformers"], "moecc_best_ms": best["moecc"],
            "transformers_peak_mib": peak_temporary_bytes(transformers_path) / 2 ** 20,
            "moecc_peak_mib": peak_temporary_bytes(moecc_path) / 2 ** 20,
            "floor_ms": floor_ms, "fraction_of_floor": floor_ms / best["moecc"]}


def layer_row(name: str, ctx: int, reps: int) -> dict:
    import moecc
    from transformers import StaticCache
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (DeepseekV3Attention,
                                                                      DeepseekV3RotaryEmbedding)

    config = _config(name)
    torch.manual_seed(ctx)
    attn = DeepseekV3Attention(config, layer_idx=0).eval()
    rotary = DeepseekV3RotaryEmbedding(config)
    x = torch.randn(1, 1, config.hidden_size)  # [B, S, D]: the new token
    pos = torch.tensor([[ctx]])
    position_embeddings = rotary(x, pos)
    mask = torch.ones(1, 1, 1, ctx + 1, dtype=torch.bool)  # L live slots + the new one
    cache = StaticCache(config=config, max_cache_len=ctx + 1)
    with torch.no_grad():  # fill L slots with random latents (as a prefill would)
        cache.update(torch.randn(1, 1, ctx, config.kv_lora_rank), torch.randn(1, 1, ctx, config.qk_rope_head_dim), 0)
    length = cache.layers[0].cumulative_length
    report = moecc.CompileReport()
    compiled = torch.compile(attn, backend="moecc", options={"report": report, "rest_of_graph": "eager"})

    def step(module):
        def run():
            length.fill_(ctx)  # decode the same position every call
            with torch.no_grad():
                return module(x, position_embeddings, mask, cache=cache)[0]
        return run

    eager, moecc_step = step(attn), step(compiled)
    torch.testing.assert_close(moecc_step(), eager(), rtol=1e-4, atol=1e-5)
    if report.pass_counter("mla_absorb", "rewritten") != 1:
        raise RuntimeError(f"the moecc graph did not get the MLA op:\n{report.format()}")
    ms, best = _time_pair({"transformers": eager, "moecc": moecc_step}, reps)
    row = {"widths": name, "part": "layer", "context": ctx, "transformers_ms": ms["transformers"],
           "moecc_ms": ms["moecc"], "speedup": ms["transformers"] / ms["moecc"],
           "transformers_best_ms": best["transformers"], "moecc_best_ms": best["moecc"],
           "transformers_peak_mib": peak_temporary_bytes(eager) / 2 ** 20,
           "moecc_peak_mib": peak_temporary_bytes(moecc_step) / 2 ** 20}
    torch._dynamo.reset()
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", nargs="+", default=list(WIDTHS), choices=list(WIDTHS))
    p.add_argument("--contexts", nargs="+", type=int, default=[512, 2048, 8192])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--no-layer", action="store_true", help="time the attention core only")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    from moecc.roofline import cpu_read_bandwidth

    bandwidth, gemm = cpu_read_bandwidth(), _gemm_rate()
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), fp32, batch 1; "
          f"read {bandwidth / 1e9:.1f} GB/s, fp32 GEMM {gemm / 1e9:.0f} GFLOP/s (measured now); "
          f"load average {os.getloadavg()[0]:.1f} (other jobs share the cores)")
    print("| widths | part | context | transformers ms median (best) | moecc ms median (best) | speedup median (best) "
          "| transformers peak MiB | moecc peak MiB | floor / moecc best |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for name in args.widths:
        for ctx in args.contexts:
            parts = [core_row(name, ctx, args.reps, bandwidth, gemm)]
            if not args.no_layer:
                parts.append(layer_row(name, ctx, args.reps))
            for row in parts:
                rows.append(row)
                floor = f"{row['fraction_of_floor']:.0%}" if "fraction_of_floor" in row else "-"
                print(f"| {name} | {row['part']} | {ctx} | {row['transformers_ms']:.1f} ({row['transformers_best_ms']:.1f}) "
                      f"| {row['moecc_ms']:.1f} ({row['moecc_best_ms']:.1f}) | {row['speedup']:.1f}x "
                      f"({row['transformers_best_ms'] / row['moecc_best_ms']:.1f}x) | {row['transformers_peak_mib']:.1f} "
                      f"| {row['moecc_peak_mib']:.2f} | {floor} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bandwidth_bytes_per_s": bandwidth, "gemm_flops_per_s": gemm, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
