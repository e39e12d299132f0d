"""One MoE layer at Qwen3-30B-A3B widths on the CPU, every expert weight format side by side.

    python -m moecc.bench.quantized_layer_cpu [--tokens 1 4 16] [--layers 3] [--json OUT]
    python -m moecc.bench.quantized_layer_cpu --linear   # one [2048 -> 4096] linear instead
    python -m moecc.bench.quantized_layer_cpu --formats bf16 int8 "fp8 b128" --fp8-decoders
    python -m moecc.bench.quantized_layer_cpu --fp8-decoders-in-cache   # the decoders' own cost

E = 128, N = 768, K = 2048, top-8, bf16 hidden states, moecc's TVM (llvm) op in each
format: bf16 (dense), int8 per-row and int4 g128 weight-only (dequantised in the
kernel), fp8 e4m3 with 128 x 128 block scales, weight-only (decoded in the kernel;
`--fp8-decoders` also times each decoder of kernels_llvm_fp8.py), w8a8 and w4a8 g128
(int8 activations, integer dot products); and torch's own
CPU weight-only matmuls applied expert by expert as the peer a torch user has
(`aten._weight_int8pack_mm`, `aten._weight_int4pack_mm_for_cpu`, bf16). Weights are
random (speed does not depend on values); `--layers` copies are cycled call by call and
each call routes fresh hidden states, so weights come from DRAM as in a decode step.
Floor: unique experts hit x bytes per expert (scales included) / the read bandwidth
measured in the same run (moecc.roofline.cpu_read_bandwidth). Median of 2 x 24 calls
(`--interleave`: the formats take turns call by call; for a machine others share).

A benchmark, not a test: numbers go to docs/precision.md with the machine and date.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

E, N, K, TOP, GROUP = 128, 768, 2048, 8, 128
FORMATS = ("bf16", "int8", "int4 g128", "fp8 b128", "w8a8", "w4a8 g128", "torch int8pack", "torch int4pack g128")
FP8_BLOCK = 128


def expert_bytes(name: str) -> int:
    """Bytes one expert's three matrices occupy in `name`'s format (scales included)."""
    values = 3 * N * K
    if name == "bf16":
        return values * 2
    if name in ("int8", "w8a8"):
        return values + 3 * N * 4 + 3 * K * 4  # per-row fp32 scales (gate, up, down rows)
    if name.startswith("fp8"):  # e4m3 bytes + fp32 block scales
        blocks = -(-2 * N // FP8_BLOCK) * -(-K // FP8_BLOCK) + -(-K // FP8_BLOCK) * -(-N // FP8_BLOCK)
        return values + blocks * 4
    if name == "torch int8pack":
        return values + (2 * N + K) * 2  # bf16 per-row scales
    if name == "torch int4pack g128":
        return values // 2 + values // GROUP * 4  # bf16 scale + zero per group
    return values // 2 + values // GROUP * 4  # int4 g128: fp32 scales


def _tvm_layers(layers: int, gen: torch.Generator):
    """{format: [(weights, spec)] * layers}; packed stacks shared between weight-only and a8."""
    from moecc.spec import ExpertSpec, MoELayerSpec, RouterSpec
    from moecc.weights import make_weights

    router = RouterSpec(E, TOP, renormalize=True)
    out = {name: [] for name in ("bf16", "int8", "int4 g128", "fp8 b128", "w8a8", "w4a8 g128")}
    for _ in range(layers):
        rw = (torch.randn(E, K, generator=gen) * K ** -0.5).to(torch.bfloat16)
        dense = make_weights(router_weight=rw,
                             gate_up=(torch.randn(E, 2 * N, K, generator=gen) * 0.02).to(torch.bfloat16),
                             down=(torch.randn(E, K, N, generator=gen) * 0.02).to(torch.bfloat16))
        out["bf16"].append((dense, MoELayerSpec(router, ExpertSpec(K, N))))
        for fmt, group, names in (("int8", 0, ("int8", "w8a8")), ("int4", GROUP, ("int4 g128", "w4a8 g128"))):
            per = 2 if fmt == "int4" else 1
            w = make_weights(
                router_weight=rw,
                gate_up=torch.randint(0, 256, (E, 2 * N, K // per), dtype=torch.uint8, generator=gen),
                down=torch.randint(0, 256, (E, K, N // per), dtype=torch.uint8, generator=gen),
                gate_up_scale=torch.rand(E, 2 * N, K // (group or K), generator=gen) * 1e-3,
                down_scale=torch.rand(E, K, N // (group or N), generator=gen) * 1e-3)
            for name, acts in zip(names, ("float", "int8")):
                spec = MoELayerSpec(router, ExpertSpec(K, N, weight_format=fmt, group_size=group, activations=acts))
                out[name].append((w, spec))
            if fmt == "int8":  # fp8 b128: int8's random bytes as e4m3 (NaN bytes 0x7f / 0xff made 0x7e / 0xfe)
                def fp8(t):
                    t[(t & 0x7F) == 0x7F] -= 1
                    return t.view(torch.float8_e4m3fn)
                b = FP8_BLOCK
                out["fp8 b128"].append((make_weights(
                    router_weight=rw, gate_up=fp8(w.gate_up), down=fp8(w.down),
                    gate_up_scale=torch.rand(E, -(-2 * N // b), -(-K // b), generator=gen) * 1e-3,
                    down_scale=torch.rand(E, -(-K // b), -(-N // b), generator=gen) * 1e-3),
                    MoELayerSpec(router, ExpertSpec(K, N, weight_format="fp8", group_size=b))))
    return out


def _fp8_decoder_calls(layers, folder):
    """{"fp8 b128 <decode>": call(x, i)} for each decoder of kernels_llvm_fp8.py: the op's
    path (router, routing, the three kernels) with that decoder's module."""
    from moecc.backends.reference.routing import route
    from moecc.backends.tvm.align import with_shared_experts
    from moecc.backends.tvm.kernels_llvm_fp8 import DECODES, build_with_decode
    from moecc.backends.tvm.op import _router_logits, kernel_key, run_kernels
    from moecc.backends.tvm.runtime import device_key, target_for, use_torch_thread_count

    target = target_for("cpu", 0)
    dev_key = device_key(target, 0)
    use_torch_thread_count()

    def make(decode):
        built = {}

        def call(x, i):
            w, spec = layers[i % len(layers)]
            m = x.shape[0]
            if m not in built:
                key, _ = kernel_key(spec, x.dtype, target, None, m, False, False, dev_key)
                built[m] = (key, build_with_decode(key, decode, folder))
            key, kernels = built[m]
            topk_w, topk_ids = route(_router_logits(x, w, spec.router), spec.router, None)
            topk_w, topk_ids = with_shared_experts(topk_w, topk_ids, E, 0)
            return run_kernels(kernels, key, x, w, topk_w, topk_ids)
        return call
    return {f"fp8 b128 {d}": make(d) for d in DECODES}


def _torch_peer_layers(layers: int, gen: torch.Generator, tvm_layers):
    """torch's weight-only matmuls, per expert: {name: [(router weight, experts)] * layers}."""
    out = {"torch int8pack": [], "torch int4pack g128": []}
    for layer in range(layers):
        rw = tvm_layers["bf16"][layer][0].router_weight
        int8 = [(torch.randint(-127, 128, (2 * N, K), dtype=torch.int8, generator=gen),
                 (torch.rand(2 * N, generator=gen) * 1e-3).to(torch.bfloat16),
                 torch.randint(-127, 128, (K, N), dtype=torch.int8, generator=gen),
                 (torch.rand(K, generator=gen) * 1e-3).to(torch.bfloat16)) for _ in range(E)]
        out["torch int8pack"].append((rw, int8))
        int4 = []
        for _ in range(E):
            gu = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                torch.randint(0, 16, (2 * N, K), dtype=torch.int32, generator=gen), 1)
            dn = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                torch.randint(0, 16, (K, N), dtype=torch.int32, generator=gen), 1)
            int4.append((gu, (torch.rand(K // GROUP, 2 * N, 2, generator=gen) * 1e-3).to(torch.bfloat16),
                         dn, (torch.rand(N // GROUP, K, 2, generator=gen) * 1e-3).to(torch.bfloat16)))
        out["torch int4pack g128"].append((rw, int4))
    return out


def _torch_peer_call(name: str, x: torch.Tensor, router_weight: torch.Tensor, experts) -> torch.Tensor:
    """The MoE layer a torch user writes around the weight-only matmuls (softmax top-k, renorm)."""
    probs = torch.softmax(torch.nn.functional.linear(x, router_weight).float(), dim=-1)  # [M, E]
    w, ids = probs.topk(TOP, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    out = torch.zeros(x.shape[0], K, dtype=torch.float32)
    for e in ids.unique().tolist():
        tok, slot = (ids == e).nonzero(as_tuple=True)
        xe = x[tok]
        if name == "torch int8pack":
            gu, gu_s, dn, dn_s = experts[e]
            h = torch.ops.aten._weight_int8pack_mm(xe, gu, gu_s)
            a = torch.nn.functional.silu(h[:, :N]) * h[:, N:]
            y = torch.ops.aten._weight_int8pack_mm(a, dn, dn_s)
        else:
            gu, gu_sz, dn, dn_sz = experts[e]
            h = torch.ops.aten._weight_int4pack_mm_for_cpu(xe, gu, GROUP, gu_sz)
            a = torch.nn.functional.silu(h[:, :N]) * h[:, N:]
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(a, dn, GROUP, dn_sz)
        out.index_add_(0, tok, y.float() * w[tok, slot, None])
    return out.to(x.dtype)


def linear_main(copies: int = 24) -> dict:
    """One-row [K -> 2K] linear (an attention projection's shape), bf16 vs moecc::quantized_linear
    in each format; `copies` weights cycled so they come from DRAM. ms per call."""
    import moecc.quantized_linear  # noqa: F401  (defines moecc::quantized_linear)
    from moecc.backends.reference.quantized import quantize_rows

    gen = torch.Generator().manual_seed(0)
    n_out = 2 * K
    ws = [(torch.randn(n_out, K, generator=gen) * K ** -0.5).to(torch.bfloat16) for _ in range(copies)]
    x = torch.randn(1, K, generator=gen).to(torch.bfloat16)
    packed = {f: [quantize_rows(w, *f) for w in ws] for f in (("int8", 0), ("int4", GROUP))}

    def timed(call) -> float:
        for i in range(copies):
            call(i)
        times = []
        for i in range(3 * copies):
            t0 = time.perf_counter()
            call(i % copies)
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3

    out = {"bf16 torch.mv": timed(lambda i: torch.mv(ws[i], x[0])),
           "bf16 F.linear": timed(lambda i: torch.nn.functional.linear(x, ws[i]))}
    for (fmt, group), qs in packed.items():
        for acts in ("float", "int8"):
            name = f"{fmt}{' g' + str(group) if group else ''}{' a8' if acts == 'int8' else ''}"
            out[name] = timed(lambda i, qs=qs, fmt=fmt, group=group, acts=acts: torch.ops.moecc.quantized_linear(
                x, qs[i].packed, qs[i].scales, None, fmt, group, acts))
    print(f"one-row linear [{K} -> {n_out}], {copies} weights cycled: "
          + "; ".join(f"{k} {v:.3f} ms" for k, v in out.items()), flush=True)
    return out


def fp8_decoders_in_cache(calls: int = 300) -> dict:
    """Each fp8 decoder's cost when the weights are in cache (what the decode itself costs,
    not the DRAM read): E = 8 experts, N = 256, K = 1024, top-8 (every expert used), one
    token, fixed routing, 6 MiB of fp8 weights; the minimum of `calls` calls (robust to
    other processes taking the cores). int8 weight-only beside it (same bytes)."""
    import tempfile

    from moecc.backends.reference.routing import route, router_logits
    from moecc.backends.tvm.align import with_shared_experts
    from moecc.backends.tvm.cache import load_kernels
    from moecc.backends.tvm.kernels_llvm_fp8 import DECODES, build_with_decode
    from moecc.backends.tvm.op import kernel_key, run_kernels
    from moecc.backends.tvm.runtime import target_for, use_torch_thread_count
    from moecc.spec import ExpertSpec, MoELayerSpec, RouterSpec
    from moecc.weights import make_weights

    e, n, k = 8, 256, 1024
    gen = torch.Generator().manual_seed(0)
    router = RouterSpec(e, e, renormalize=True)
    raw = [torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen) for shape in ((e, 2 * n, k), (e, k, n))]
    for t in raw:
        t[(t & 0x7F) == 0x7F] -= 1  # no NaN bytes
    rw = torch.randn(e, k, generator=gen).to(torch.bfloat16)
    x = torch.randn(1, k, generator=gen).to(torch.bfloat16)
    layers = {
        "fp8": (make_weights(router_weight=rw, gate_up=raw[0].view(torch.float8_e4m3fn),
                             down=raw[1].view(torch.float8_e4m3fn),
                             gate_up_scale=torch.rand(e, 2 * n // 128, k // 128, generator=gen),
                             down_scale=torch.rand(e, k // 128, n // 128, generator=gen)),
                MoELayerSpec(router, ExpertSpec(k, n, weight_format="fp8", group_size=128))),
        "int8": (make_weights(router_weight=rw, gate_up=raw[0], down=raw[1],
                              gate_up_scale=torch.rand(e, 2 * n, 1, generator=gen),
                              down_scale=torch.rand(e, k, 1, generator=gen)),
                 MoELayerSpec(router, ExpertSpec(k, n, weight_format="int8"))),
    }
    target = target_for("cpu", 0)
    use_torch_thread_count()
    folder = tempfile.mkdtemp(prefix="moecc_fp8_")
    out = {}
    for name in ["int8"] + [f"fp8 {d}" for d in DECODES]:
        w, spec = layers[name.split()[0]]
        key, _ = kernel_key(spec, x.dtype, target, None, 1, False, False)
        kernels = build_with_decode(key, name.split()[1], folder) if name.startswith("fp8") else load_kernels(key)
        topk_w, topk_ids = route(router_logits(x, w.router_weight, None, router), router, None)
        topk_w, topk_ids = with_shared_experts(topk_w, topk_ids, e, 0)
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            run_kernels(kernels, key, x, w, topk_w, topk_ids)
            times.append(time.perf_counter() - t0)
        out[name] = min(times) * 1e6
    weights = 3 * e * n * k
    print(f"in cache, E={e} N={n} K={k} top-{e}, one token, min of {calls} calls: " + "; ".join(
        f"{name} {us:.0f} us ({us * 1e3 / weights:.3f} ns/weight)" for name, us in out.items()), flush=True)
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--linear", action="store_true", help="time one dense linear in each format instead")
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS,
                        help="which formats to time (bf16 always: the speed-ups are over it)")
    parser.add_argument("--interleave", action="store_true",
                        help="time the formats call by call in turn instead of one format after another")
    parser.add_argument("--fp8-decoders-in-cache", action="store_true",
                        help="time each fp8 decoder on a small layer whose weights stay in cache instead")
    parser.add_argument("--fp8-decoders", action="store_true",
                        help="also time each fp8 decoder (kernels_llvm_fp8.DECODES) on the fp8 b128 layers")
    args = parser.parse_args(argv)
    formats = ["bf16"] + [f for f in args.formats if f != "bf16"]
    if args.linear:
        return linear_main()
    if args.fp8_decoders_in_cache:
        return fp8_decoders_in_cache()

    import moecc.backends.tvm as tvm_backend
    from moecc.backends.reference.routing import route, router_logits
    from moecc.roofline import cpu_read_bandwidth

    gen = torch.Generator().manual_seed(0)
    print(f"building {args.layers} layers of weights per format ...", flush=True)
    tvm_layers = _tvm_layers(args.layers, gen)
    peers = _torch_peer_layers(args.layers, gen, tvm_layers) if any(f.startswith("torch") for f in formats) else {}
    decoders = {}
    if args.fp8_decoders:
        import tempfile

        decoders = _fp8_decoder_calls(tvm_layers["fp8 b128"], tempfile.mkdtemp(prefix="moecc_fp8_"))
    bw = cpu_read_bandwidth(1.0)
    print(f"threads {torch.get_num_threads()}, read bandwidth {bw / 1e9:.1f} GB/s", flush=True)
    results = {"date": time.strftime("%Y-%m-%d"), "interleave": args.interleave, "threads": torch.get_num_threads(), "read_bandwidth": bw,
               "shape": {"E": E, "N": N, "K": K, "top_k": TOP}, "rows": []}
    for m in args.tokens:
        xs = [torch.randn(m, K, generator=gen).to(torch.bfloat16) for _ in range(8)]
        spec0 = tvm_layers["bf16"][0][1]
        hit = statistics.mean(
            int(torch.unique(route(router_logits(xs[i % 8], tvm_layers["bf16"][i % args.layers][0].router_weight,
                                                 None, spec0.router), spec0.router)[1]).numel()) for i in range(24))
        row = {"tokens": m, "experts_hit": hit, "formats": {}}
        calls = {}
        for name in formats + list(decoders):
            if name in decoders:
                def call(i, name=name):
                    decoders[name](xs[i % 8], i % args.layers)
            elif name.startswith("torch"):
                def call(i, name=name):
                    rw, experts = peers[name][i % args.layers]
                    _torch_peer_call(name, xs[i % 8], rw, experts)
            else:
                def call(i, name=name):
                    w, spec = tvm_layers[name][i % args.layers]
                    tvm_backend.moe_layer(xs[i % 8], w, spec)
            for i in range(args.layers):
                call(i)  # build / load kernels, first touch
            calls[name] = call
        times = {name: [] for name in calls}
        # --interleave: one call of each format in turn, so every format sees the same
        # load from other processes (the ratios stay comparable on a shared machine).
        order = ([(i, name) for i in range(48) for name in calls] if args.interleave
                 else [(i, name) for name in calls for i in range(48)])
        for i, name in order:
            t0 = time.perf_counter()
            calls[name](i)
            times[name].append(time.perf_counter() - t0)
        for name in calls:
            ms = statistics.median(times[name]) * 1e3
            floor = hit * expert_bytes(name) / bw * 1e3
            row["formats"][name] = {"ms": ms, "floor_ms": floor, "fraction_of_floor": floor / ms}
        base = row["formats"]["bf16"]["ms"]
        print(f"M={m:2d} experts hit {hit:.1f}: " + "; ".join(
            f"{name} {r['ms']:.2f} ms ({r['fraction_of_floor']:.0%}, {base / r['ms']:.2f}x)"
            for name, r in row["formats"].items()), flush=True)
        results["rows"].append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
