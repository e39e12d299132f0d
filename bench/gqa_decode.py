"""One GQA attention decode step over a static KV cache: moecc's op vs transformers' paths (issue 11).

    PYTHONPATH=. python bench/gqa_decode.py [--dtypes fp32 bf16] [--batches 1 8]
                                            [--contexts 512 2048 8192] [--max-len 8704]
                                            [--reps 5] [--no-eager] [--json out.json]

Qwen3-30B-A3B attention widths (Hq=32, Hkv=4, D=128), one new query token per sequence, a
static cache of `--max-len` slots of which `context` are live (the rest is padding, as in
`generate(..., cache_implementation="static")` with a longer max length), random values.
Variants, all over the same cache tensors:
  hf_sdpa     transformers' sdpa path as captured on the CPU: repeat_kv (K/V copied to Hq
              heads) + SDPA over all max-len slots under the bool mask
  hf_eager    transformers' eager path: repeat_kv, matmul * scale + additive mask, softmax
              in fp32, matmul (GPT-OSS's attention is this plus the sink column)
  sdpa_gqa    torch SDPA with enable_gqa over the cache cut to the live slots (a candidate)
  moecc       moecc::gqa_decode_attention (moecc/gqa.py): live-range cut by one host read
              of the mask, then its CPU kernel ("auto"): moecc's TVM kernel where TVM is
              installed (backends/tvm/kernels_llvm_attention.py; bf16 only from 8 MiB of
              live K/V, moecc/gqa.py says why), else torch's flash CPU kernel
  moecc_flash the same op forced onto torch's flash CPU kernel (the kernel before the TVM one)
  kv_sum      torch.sum over the same valid K/V slices: the read rate of these bytes now
Floor: the valid KV bytes (2 * B * Hkv * context * D * element size) over the read
bandwidth measured just before each row (moecc.roofline.cpu_read_bandwidth: torch.sum
over 1 GiB on 2 MiB pages; the caches are on 2 MiB pages too, moecc/huge_pages.py). So that the cache is read from DRAM, as in a model whose layers each stream their
own cache, each call uses the next of several cache copies (>= 1 GiB in all, at most 24).
Calls are interleaved across variants (contention hits all alike), one warm-up each;
median and best over >= `--reps` calls are reported (the best is the less noisy one on a
shared machine: other jobs only ever add time). Outputs are compared with hf_sdpa.
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

HQ, HKV, D = 32, 4, 128  # Qwen3-30B-A3B
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _repeat_kv(x: torch.Tensor, n: int) -> torch.Tensor:
    b, h, l, d = x.shape
    return x[:, :, None].expand(b, h, n, l, d).reshape(b, h * n, l, d)


def _variants(q, mask, additive, scale, ctx):
    g = HQ // HKV

    def hf_sdpa(k, v):
        return F.scaled_dot_product_attention(q, _repeat_kv(k, g), _repeat_kv(v, g), attn_mask=mask, scale=scale)

    def hf_eager(k, v):
        w = torch.matmul(q, _repeat_kv(k, g).transpose(2, 3)) * scale + additive
        p = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(p, _repeat_kv(v, g))

    def sdpa_gqa(k, v):
        return F.scaled_dot_product_attention(q, k[:, :, :ctx], v[:, :, :ctx], attn_mask=mask[..., :ctx],
                                              scale=scale, enable_gqa=True)

    def moecc_op(k, v):
        return torch.ops.moecc.gqa_decode_attention(q, k, v, mask, None, scale, False)

    def moecc_flash(k, v):
        from moecc.gqa import gqa_decode_attention_reference

        return gqa_decode_attention_reference(q, k, v, mask, None, scale, kernel="flash")

    def kv_sum(k, v):  # the valid K/V bytes read once by torch.sum: the read rate right now
        return k[:, :, :ctx].sum() + v[:, :, :ctx].sum()

    return {"hf_sdpa": hf_sdpa, "hf_eager": hf_eager, "sdpa_gqa": sdpa_gqa, "moecc": moecc_op, "moecc_flash": moecc_flash,
            "kv_sum": kv_sum}


def _time_interleaved(fns: dict, caches: list, reps: int) -> tuple[dict, dict]:
    """(median, best) ms per variant; each call on the next cache copy (read from DRAM)."""
    counts = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn(*caches[0])
        counts[name] = int(min(40, max(reps, 0.5 / max(time.perf_counter() - t0, 1e-4))))  # ~0.5 s of calls
    samples = {name: [] for name in fns}
    for r in range(max(counts.values())):
        for i, (name, fn) in enumerate(fns.items()):
            if r < counts[name]:
                k, v = caches[(r * len(fns) + i) % len(caches)]
                t0 = time.perf_counter()
                fn(k, v)
                samples[name].append((time.perf_counter() - t0) * 1e3)
    return ({n: statistics.median(s) for n, s in samples.items()}, {n: min(s) for n, s in samples.items()})


def row(dtype_name: str, batch: int, ctx: int, max_len: int, reps: int, eager: bool) -> dict:
    import moecc.gqa  # noqa: F401  (defines moecc::gqa_decode_attention)
    from moecc.huge_pages import collapse
    from moecc.roofline import cpu_read_bandwidth
    from moecc.tolerances import check_close

    dtype = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(ctx + batch)
    cache_bytes = 2 * batch * HKV * max_len * D * dtype.itemsize
    copies = max(2, min(24, -(-2 ** 30 // cache_bytes)))
    caches = [(torch.randn(batch, HKV, max_len, D, generator=g).to(dtype),
               torch.randn(batch, HKV, max_len, D, generator=g).to(dtype)) for _ in range(copies)]
    # On 2 MiB pages, as the huge_pages pass puts a compiled model's static cache and as the
    # floor's bandwidth is measured (every variant reads these same tensors).
    collapse(t for kv in caches for t in kv)
    q = torch.randn(batch, HQ, 1, D, generator=g).to(dtype)  # [B, Hq, 1, D]: the new token
    mask = torch.zeros(batch, 1, 1, max_len, dtype=torch.bool)  # [B, 1, 1, Lmax]: live slots
    mask[..., :ctx] = True
    additive = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)
    scale = D ** -0.5
    fns = _variants(q, mask, additive, scale, ctx)
    if not eager:
        fns.pop("hf_eager")
    expected = fns["hf_sdpa"](*caches[0])
    for name, fn in fns.items():
        if name != "kv_sum":
            check_close(fn(*caches[0]), expected, dtype=dtype)
    bandwidth = cpu_read_bandwidth()  # just before this row: contention changes it by the minute
    median, best = _time_interleaved(fns, caches, reps)
    floor_ms = 2 * batch * HKV * ctx * D * dtype.itemsize / bandwidth * 1e3
    return {"dtype": dtype_name, "batch": batch, "context": ctx, "max_len": max_len, "copies": copies,
            "bandwidth_bytes_per_s": bandwidth, "median_ms": median, "best_ms": best, "floor_ms": floor_ms,
            "moecc_fraction_of_floor": floor_ms / best["moecc"],
            "moecc_fraction_of_floor_median": floor_ms / median["moecc"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--contexts", nargs="+", type=int, default=[512, 2048, 8192])
    p.add_argument("--max-len", type=int, default=8704, help="static cache slots (>= every context)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--no-eager", action="store_true", help="skip transformers' eager path (slow at batch 8)")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    if max(args.contexts) > args.max_len:
        p.error(f"--max-len {args.max_len} is shorter than context {max(args.contexts)}")
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads); Hq={HQ} Hkv={HKV} "
          f"D={D}, static cache {args.max_len} slots; load average {os.getloadavg()[0]:.1f} "
          "(other jobs share the cores)")
    names = ["hf_sdpa"] + ([] if args.no_eager else ["hf_eager"]) + ["sdpa_gqa", "moecc", "moecc_flash", "kv_sum"]
    print("| dtype | batch | context | " + " | ".join(f"{n} ms median (best)" for n in names)
          + " | read GB/s | floor ms | moecc vs hf_sdpa (median) | floor / moecc best (median) |")
    print("|---" * (len(names) + 7) + "|")
    rows = []
    for dtype_name in args.dtypes:
        for batch in args.batches:
            for ctx in args.contexts:
                r = row(dtype_name, batch, ctx, args.max_len, args.reps, not args.no_eager)
                rows.append(r)
                med, best = r["median_ms"], r["best_ms"]
                cells = " | ".join(f"{med[n]:.2f} ({best[n]:.2f})" for n in names)
                print(f"| {dtype_name} | {batch} | {ctx} | {cells} | {r['bandwidth_bytes_per_s'] / 1e9:.1f} "
                      f"| {r['floor_ms']:.2f} | "
                      f"{med['hf_sdpa'] / med['moecc']:.1f}x | {r['moecc_fraction_of_floor']:.0%} "
                      f"({r['moecc_fraction_of_floor_median']:.0%}) |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
