"""The two grouped GEMMs of kernels_llvm.py for fp8 (e4m3fn) block-scaled expert weights (llvm).

Same tasks, blocks, epilogues and entry-point names as kernels_llvm.py and
kernels_llvm_quantized.py (read their docstrings first). Weights arrive in DeepSeek-V3's
checkpoint layout (backends/reference/quantized.py), the fp8 bytes viewed as int8:

    gate_up  int8 [E, 2, N, K]   scales fp32 [E, ceil(2N/B), ceil(K/B)]
    down     int8 [E, K, N]      scales fp32 [E, ceil(K/B), ceil(N/B)]

B the (square) block edge. CPUs have no fp8 arithmetic, so each vector step decodes V
bytes to fp32 in registers and multiply-adds them into this column block's partial
sums; the block's scale multiplies those sums once at the block's end (never per weight).
Row r of a stack uses scale row r // B (gate/up: r = h * N + n, h = 0 gate, 1 up). The last
column block of a row may be shorter than B (K or N not a multiple of B): its trip count
is min(B, C - g * B) / V, so V must divide B, K and N (op.fit_groups).

Decoders (`decode`; e4m3fn: sign bit 7, exponent bits 6-3 with bias 7, mantissa bits
2-0, exponent 0 subnormal; 0x7f / 0xff are NaN and never occur in quantised weights):

  "f16"  integer bits to an fp16 pattern, then the hardware's fp16 -> fp32 conversion:
         h = (sext16(byte) << 7) & 0xBF80 puts the sign in fp16's sign bit, the 4-bit
         exponent in the low 4 bits of fp16's 5-bit exponent and the mantissa in its top
         3 bits, so h is 2^(e-15)(1 + m/8) (normal) or m 2^-17 (fp16 subnormal, exact);
         the missing 2^8 joins the block scale. Three integer ops and one vcvtph2ps.
  "bits" integer bits straight to fp32: (|byte| << 20) + (120 << 23) for normal values,
         m * 2^-9 selected where the exponent is 0, then the sign or-ed in (fp32
         subnormals never appear, so no slow denormal arithmetic).
  "lut"  a 256-entry fp32 table, filled per task, indexed by the byte (a gather).

Measured (docs/precision.md, "fp8"): DEFAULT_DECODE is the fastest on this machine.
"""

from __future__ import annotations

from moecc.backends.tvm.key import KernelKey
from moecc.backends.tvm.tir_scalars import ScalarOps, llvm_prefetch

DECODES = ("f16", "bits", "lut")
DEFAULT_DECODE = "f16"


def fp8_gemms(key: KernelKey, decode: str = DEFAULT_DECODE):
    """(moe_gate_up_act, moe_down_weighted) prim_funcs for an fp8 `key` (key.group_size = B)."""
    from tvm import tirx
    from tvm.script import tirx as T

    if decode not in DECODES:
        raise ValueError(f"fp8 decode {decode!r}; valid: {DECODES}")
    cfg = key.config
    E, N, K = key.num_experts, key.n, key.k
    BM, TN, TK, V, PF = cfg.block_m, cfg.tile_n, cfg.tile_k, cfg.vec, cfg.prefetch
    DT = key.dtype
    B = key.group_size
    RB_GU, CB_GU = -(-2 * N // B), -(-K // B)  # gate_up scale grid
    RB_DN, CB_DN = -(-K // B), -(-N // B)  # down scale grid
    N_TILES, K_TILES = N // TN, K // TK
    assert N % TN == 0 and K % TK == 0 and B % V == 0 and K % V == 0 and N % V == 0, "config not fitted"
    ACC = "global"  # stack arrays: see kernels_llvm.py
    # What the decoded value must still be multiplied by (folded into each block's scale).
    SCALE_FACTOR = 256.0 if decode == "f16" else 1.0
    LUT = 256 if decode == "lut" else 1  # the table (a 1-entry placeholder for the bit decoders)

    ops = ScalarOps(key)
    act = ops.act
    gate_up_bias, down_bias = ops.gate_up_bias, ops.down_bias
    prefetch = llvm_prefetch

    def i32(v):
        return tirx.const(v, "int32")

    def decode_bits(byte):  # int8 -> fp32, exact
        s = tirx.Cast("int32", byte)  # sign-extended: bit 31 is the sign
        a = tirx.bitwise_and(s, i32(0x7F))
        normal = tirx.reinterpret("float32", tirx.shift_left(a, i32(20)) + i32(120 << 23))
        sub = tirx.Cast("float32", a) * tirx.const(2.0 ** -9, "float32")
        mag = tirx.Select(a < i32(8), sub, normal)
        return tirx.reinterpret("float32", tirx.bitwise_or(tirx.reinterpret("int32", mag),
                                                           tirx.bitwise_and(s, i32(-(2 ** 31)))))

    def decode_f16(byte):  # int8 -> fp32 / 256, exact
        s = tirx.Cast("int16", byte)
        h = tirx.bitwise_and(tirx.shift_left(s, tirx.const(7, "int16")), tirx.const(-16512, "int16"))  # 0xBF80
        return tirx.Cast("float32", tirx.reinterpret("float16", h))

    def make_dec(lut):
        if decode == "f16":
            return decode_f16
        if decode == "bits":
            return decode_bits
        return lambda byte: lut[tirx.bitwise_and(tirx.Cast("int32", byte), i32(255))]

    @T.prim_func
    def moe_gate_up_act(x_h: T.handle, ex_h: T.handle, ptr_h: T.handle, w_h: T.handle, s_h: T.handle,
                        bias_h: T.handle, out_h: T.handle):
        T.func_attr({"global_symbol": "moe_gate_up_act", "tir.noalias": True})
        nb = T.int64()
        u = T.int64()
        eb = T.int64()
        x = T.match_buffer(x_h, (nb, BM, K), "float32")  # [NB, BM, K] token rows
        experts = T.match_buffer(ex_h, (u,), "int32")  # [U]
        ptr = T.match_buffer(ptr_h, (u + 1,), "int32")  # [U+1]
        w = T.match_buffer(w_h, (E, 2, N, K), "int8")  # [E, 2N, K] fp8 bytes
        s = T.match_buffer(s_h, (E, RB_GU, CB_GU), "float32")  # [E, ceil(2N/B), ceil(K/B)] block scales
        bias = T.match_buffer(bias_h, (eb, 2, N), DT)  # [E, 2N] or a [1, 2N] placeholder
        a = T.match_buffer(out_h, (nb, BM, N), "float32")  # [NB, BM, N] activated rows
        for it in T.parallel(N_TILES * u):
            acc_g = T.alloc_buffer((BM, TN, V), "float32", scope=ACC)
            acc_u = T.alloc_buffer((BM, TN, V), "float32", scope=ACC)
            part_g = T.alloc_buffer((BM, TN, V), "float32", scope=ACC)  # this block's sums
            part_u = T.alloc_buffer((BM, TN, V), "float32", scope=ACC)
            lanes = T.alloc_buffer((2,), "float32", scope=ACC)
            lut = T.alloc_buffer((LUT,), "float32", scope=ACC)
            if decode == "lut":
                for i in range(-128, 128):  # byte i as int8; stored at its unsigned index
                    lut[T.bitwise_and(i, 255)] = decode_bits(T.Cast("int8", i))
            nt: T.let[T.int64] = it % N_TILES
            ui: T.let[T.int64] = it // N_TILES
            e: T.let[T.int32] = experts[ui]
            for b in range(ptr[ui], ptr[ui + 1]):
                for m in T.unroll(BM):
                    for j in T.unroll(TN):
                        for v in T.vectorized(V):
                            acc_g[m, j, v] = T.float32(0)
                            acc_u[m, j, v] = T.float32(0)
                for g in range(CB_GU):
                    for m in T.unroll(BM):
                        for j in T.unroll(TN):
                            for v in T.vectorized(V):
                                part_g[m, j, v] = T.float32(0)
                                part_u[m, j, v] = T.float32(0)
                    for ks in range(T.min(B, K - g * B) // V):
                        if PF > 0:
                            for j in T.unroll(TN):
                                T.evaluate(prefetch(w, e, 0, nt * TN + j, g * B + ks * V + PF))
                                T.evaluate(prefetch(w, e, 1, nt * TN + j, g * B + ks * V + PF))
                        for m in T.unroll(BM):
                            for j in T.unroll(TN):
                                for v in T.vectorized(V):
                                    part_g[m, j, v] = part_g[m, j, v] + x[b, m, g * B + ks * V + v] * make_dec(lut)(
                                        w[e, 0, nt * TN + j, g * B + ks * V + v])
                                    part_u[m, j, v] = part_u[m, j, v] + x[b, m, g * B + ks * V + v] * make_dec(lut)(
                                        w[e, 1, nt * TN + j, g * B + ks * V + v])
                    for m in T.unroll(BM):
                        for j in T.unroll(TN):
                            for v in T.vectorized(V):
                                acc_g[m, j, v] = acc_g[m, j, v] + part_g[m, j, v] * (
                                    s[e, (nt * TN + j) // B, g] * T.float32(SCALE_FACTOR))
                                acc_u[m, j, v] = acc_u[m, j, v] + part_u[m, j, v] * (
                                    s[e, (N + nt * TN + j) // B, g] * T.float32(SCALE_FACTOR))
                for m in T.unroll(BM):
                    for j in T.unroll(TN):
                        lanes[0] = gate_up_bias(bias, e, 0, nt * TN + j)
                        lanes[1] = gate_up_bias(bias, e, 1, nt * TN + j)
                        for v in T.unroll(V):
                            lanes[0] = lanes[0] + acc_g[m, j, v]
                            lanes[1] = lanes[1] + acc_u[m, j, v]
                        a[b, m, nt * TN + j] = act(lanes[0], lanes[1])

    @T.prim_func
    def moe_down_weighted(a_h: T.handle, rw_h: T.handle, ex_h: T.handle, ptr_h: T.handle, w_h: T.handle,
                          s_h: T.handle, bias_h: T.handle, y_h: T.handle):
        T.func_attr({"global_symbol": "moe_down_weighted", "tir.noalias": True})
        nb = T.int64()
        u = T.int64()
        eb = T.int64()
        a = T.match_buffer(a_h, (nb, BM, N), "float32")  # [NB, BM, N] activated rows
        rw = T.match_buffer(rw_h, (nb, BM), "float32")  # [NB, BM] routing weight (0 on pads)
        experts = T.match_buffer(ex_h, (u,), "int32")  # [U]
        ptr = T.match_buffer(ptr_h, (u + 1,), "int32")  # [U+1]
        w = T.match_buffer(w_h, (E, K, N), "int8")  # [E, K, N] fp8 bytes
        s = T.match_buffer(s_h, (E, RB_DN, CB_DN), "float32")  # [E, ceil(K/B), ceil(N/B)] block scales
        bias = T.match_buffer(bias_h, (eb, K), DT)  # [E, K] or a [1, K] placeholder
        y = T.match_buffer(y_h, (nb, BM, K), "float32")  # [NB, BM, K] weighted rows
        for it in T.parallel(K_TILES * u):
            acc = T.alloc_buffer((BM, TK, V), "float32", scope=ACC)
            part = T.alloc_buffer((BM, TK, V), "float32", scope=ACC)
            lanes = T.alloc_buffer((1,), "float32", scope=ACC)
            lut = T.alloc_buffer((LUT,), "float32", scope=ACC)
            if decode == "lut":
                for i in range(-128, 128):  # byte i as int8; stored at its unsigned index
                    lut[T.bitwise_and(i, 255)] = decode_bits(T.Cast("int8", i))
            kt: T.let[T.int64] = it % K_TILES
            ui: T.let[T.int64] = it // K_TILES
            e: T.let[T.int32] = experts[ui]
            for b in range(ptr[ui], ptr[ui + 1]):
                for m in T.unroll(BM):
                    for j in T.unroll(TK):
                        for v in T.vectorized(V):
                            acc[m, j, v] = T.float32(0)
                for g in range(CB_DN):
                    for m in T.unroll(BM):
                        for j in T.unroll(TK):
                            for v in T.vectorized(V):
                                part[m, j, v] = T.float32(0)
                    for ns in range(T.min(B, N - g * B) // V):
                        if PF > 0:
                            for j in T.unroll(TK):
                                T.evaluate(prefetch(w, e, kt * TK + j, g * B + ns * V + PF))
                        for m in T.unroll(BM):
                            for j in T.unroll(TK):
                                for v in T.vectorized(V):
                                    part[m, j, v] = part[m, j, v] + a[b, m, g * B + ns * V + v] * make_dec(lut)(
                                        w[e, kt * TK + j, g * B + ns * V + v])
                    for m in T.unroll(BM):
                        for j in T.unroll(TK):
                            for v in T.vectorized(V):
                                acc[m, j, v] = acc[m, j, v] + part[m, j, v] * (
                                    s[e, (kt * TK + j) // B, g] * T.float32(SCALE_FACTOR))
                for m in T.unroll(BM):
                    for j in T.unroll(TK):
                        lanes[0] = down_bias(bias, e, kt * TK + j)
                        for v in T.unroll(V):
                            lanes[0] = lanes[0] + acc[m, j, v]
                        y[b, m, kt * TK + j] = lanes[0] * rw[b, m]

    return moe_gate_up_act, moe_down_weighted


def build_with_decode(key: KernelKey, decode: str, folder):
    """A KernelSet for fp8 `key` whose GEMMs use `decode` (for tests and the decoder
    measurement; the op itself loads DEFAULT_DECODE's module through the cache). The
    module is written to `folder` and is not part of the cache."""
    from pathlib import Path

    import tvm

    from moecc.backends.tvm.build import make_target
    from moecc.backends.tvm.cache import open_module
    from moecc.backends.tvm.kernels_llvm import llvm_module

    if key.weight_format != "fp8" or key.target.kind != "llvm":
        raise ValueError("build_with_decode takes an llvm fp8 KernelKey")
    funcs = {gv.name_hint: f for gv, f in llvm_module(key).functions.items()}
    funcs["moe_gate_up_act"], funcs["moe_down_weighted"] = fp8_gemms(key, decode)
    path = Path(folder) / f"{key.short_name()}-{decode}-{key.digest(tvm.__version__)}.so"
    if not path.exists():
        tvm.compile(tvm.IRModule(funcs), target=make_target(key.target)).export_library(str(path))
    return open_module(path, tvm.runtime.load_module)
