"""The two grouped GEMMs of kernels_llvm.py on integer dot products (w8a8 / w4a8, llvm).

For quantised expert stacks whose spec says `activations="int8"`: the token rows and
the activated rows are int8 (quantised by op.py with
backends/reference/quantized.quantize_activations, one scale per row and weight group),
the weights stay packed as in kernels_llvm_quantized.py, and the products are exact
integer dot products, x86's VNNI `vpdpbusd` (unsigned byte x signed byte, four
products summed into each int32 lane; 64 per instruction on 512-bit registers). This
is how CPUs read 8- and 4-bit weights at memory speed: kernels_llvm_quantized.py's fp32
path spends four to five vector instructions per 16 weights (widen, convert, multiply-
add) and is bound by instruction issue on two cores; here one instruction covers 64.

Layouts (Shape legend of kernels_llvm.py; G the group size, whole row when 0; P = 1
int8, 2 int4; L = config.vec int32 lanes, VB = 4 L bytes per step, S = P VB columns):

    xq   int8  [T, K]            token rows (int4: in nibble order, below), read via
    tok  int32 [NB, BM]          align.py's token of each block row
    xs   fp32  [T, K/G]          their scales
    xz   int32 [T, K/G, L]       Z times the lane sums of xq per group (zero-point term)
    w    uint8 [E, 2, N, K/P]    scales fp32 [E, 2, N, K/G]  (gate/up)
    out  fp32  [NB, BM, N]       activated rows (int4: nibble order, for the down GEMM)

The weights' bytes are unsigned (q + Z), which is the operand `vpdpbusd` wants
unsigned: sum(u * xq) = sum((q + Z) * xq), so each group subtracts Z sum(xq), lane by
lane (xz, computed with the quantisation), before its int32 lanes become fp32 and are
scaled once by s_w * s_x. int4: a step's VB bytes hold 2 VB columns, low nibbles the
even ones; the activations come in the same order (kernels_llvm_quantized.
tir_scalars.nibble_order with half = VB), so the low and the high nibbles each meet a
contiguous VB-byte vector of activations.

`moe_quantize_x` (hidden states [T, K] in the model dtype, reordered for int4) and
`moe_quantize_act` (the activated rows [NB * BM, N], fp32, already in order) produce
xq / xs / xz in one pass each, exactly as quantize_activations does (round half to
even, clamp to [-127, 127], scale = absmax / 127).

Needs a CPU with AVX512-VNNI (op.py checks, lowering keeps other CPUs on the reference).
"""

from __future__ import annotations

from moecc.backends.tvm.key import KernelKey
from moecc.backends.tvm.tir_scalars import ScalarOps, llvm_prefetch, nibble_order

_VPDPBUSD = {16: "llvm.x86.avx512.vpdpbusd.512", 8: "llvm.x86.avx512.vpdpbusd.256",
             4: "llvm.x86.avx512.vpdpbusd.128"}  # int32 lanes -> LLVM intrinsic


def vnni_gemms(key: KernelKey):
    """(moe_gate_up_act, moe_down_weighted) prim_funcs for a w8a8 / w4a8 `key`."""
    from tvm import tirx
    from tvm.script import tirx as T

    cfg = key.config
    E, N, K = key.num_experts, key.n, key.k
    BM, TN, TK, L, PF = cfg.block_m, cfg.tile_n, cfg.tile_k, cfg.vec, cfg.prefetch
    DT = key.dtype
    P = 2 if key.weight_format == "int4" else 1
    Z = 8 if key.weight_format == "int4" else 128
    G_GU = key.group_size or K
    G_DN = key.group_size or N
    VB = 4 * L  # bytes per step
    S = P * VB  # columns per step
    N_TILES, K_TILES = N // TN, K // TK
    assert L in _VPDPBUSD and N % TN == 0 and K % TK == 0 and G_GU % S == 0 and G_DN % S == 0, \
        "config not fitted"
    dot = _VPDPBUSD[L]
    ACC = "global"  # stack arrays: see kernels_llvm.py

    ops = ScalarOps(key)
    act = ops.act
    gate_up_bias, down_bias = ops.gate_up_bias, ops.down_bias

    prefetch = llvm_prefetch

    def vec(buffer, *index):  # VB contiguous bytes from `index` (the last axis is the vector one)
        *lead, last = index
        return tirx.BufferLoad(buffer, [*lead, tirx.Ramp(last, 1, VB)])

    def lanes():
        return tirx.Ramp(0, 1, L)

    def weight_bytes(buffer, *index):  # [(weight bytes as int8xVB, activation column offset)]
        raw = vec(buffer, *index)
        if P == 1:
            return [(tirx.reinterpret(f"int8x{VB}", raw), 0)]
        low = tirx.bitwise_and(raw, tirx.Broadcast(tirx.const(15, "uint8"), VB))
        high = tirx.shift_right(raw, tirx.Broadcast(tirx.const(4, "uint8"), VB))
        return [(tirx.reinterpret(f"int8x{VB}", low), 0), (tirx.reinterpret(f"int8x{VB}", high), VB)]

    def dot_step(acc, acc_index, w_buf, w_index, x_buf, x_index):
        """acc[acc_index, lanes] + sum over the step's bytes of w * x (int32xL)."""
        *x_lead, x_col = x_index
        total = tirx.BufferLoad(acc, [*acc_index, lanes()])
        for w_bytes, offset in weight_bytes(w_buf, *w_index):
            total = T.call_llvm_pure_intrin(f"int32x{L}", dot, total, w_bytes, vec(x_buf, *x_lead, x_col + offset))
        return total

    def to_float(acc, acc_index, xz, xz_index):  # (int32 lanes - zero-point term) as fp32xL
        return tirx.Cast(f"float32x{L}", tirx.BufferLoad(acc, [*acc_index, lanes()])
                         - tirx.BufferLoad(xz, [*xz_index, lanes()]))

    def a_col(n):  # where the activated column n is stored (the order the down GEMM reads)
        return n if P == 1 else nibble_order(n, VB)

    @T.prim_func
    def moe_gate_up_act(xq_h: T.handle, xs_h: T.handle, xz_h: T.handle, tok_h: T.handle, ex_h: T.handle,
                        ptr_h: T.handle, w_h: T.handle, s_h: T.handle, bias_h: T.handle, out_h: T.handle):
        T.func_attr({"global_symbol": "moe_gate_up_act", "tir.noalias": True})
        nb = T.int64()
        t = T.int64()
        u = T.int64()
        eb = T.int64()
        xq = T.match_buffer(xq_h, (t, K), "int8")  # [T, K] token rows (int4: nibble order)
        xs = T.match_buffer(xs_h, (t, K // G_GU), "float32")  # [T, K/G] row scales
        xz = T.match_buffer(xz_h, (t, K // G_GU, L), "int32")  # [T, K/G, L] Z * lane sums
        tok = T.match_buffer(tok_h, (nb, BM), "int32")  # [NB, BM] token of each block row
        experts = T.match_buffer(ex_h, (u,), "int32")  # [U]
        ptr = T.match_buffer(ptr_h, (u + 1,), "int32")  # [U+1]
        w = T.match_buffer(w_h, (E, 2, N, K // P), "uint8")  # [E, 2N, K/P] packed gate/up
        s = T.match_buffer(s_h, (E, 2, N, K // G_GU), "float32")  # [E, 2N, K/G] scales
        bias = T.match_buffer(bias_h, (eb, 2, N), DT)  # [E, 2N] or a [1, 2N] placeholder
        a = T.match_buffer(out_h, (nb, BM, N), "float32")  # [NB, BM, N] activated rows (int4: nibble order)
        for it in T.parallel(N_TILES * u):
            acc_g = T.alloc_buffer((BM, TN, L), "float32", scope=ACC)
            acc_u = T.alloc_buffer((BM, TN, L), "float32", scope=ACC)
            dot_g = T.alloc_buffer((BM, TN, L), "int32", scope=ACC)  # this group's integer sums
            dot_u = T.alloc_buffer((BM, TN, L), "int32", scope=ACC)
            sums = T.alloc_buffer((2,), "float32", scope=ACC)
            nt: T.let[T.int64] = it % N_TILES
            ui: T.let[T.int64] = it // N_TILES
            e: T.let[T.int32] = experts[ui]
            for b in range(ptr[ui], ptr[ui + 1]):
                for m in T.unroll(BM):
                    for j in T.unroll(TN):
                        for v in T.vectorized(L):
                            acc_g[m, j, v] = T.float32(0)
                            acc_u[m, j, v] = T.float32(0)
                for g in range(K // G_GU):
                    for m in T.unroll(BM):
                        for j in T.unroll(TN):
                            for v in T.vectorized(L):
                                dot_g[m, j, v] = 0
                                dot_u[m, j, v] = 0
                    for ks in range(G_GU // S):
                        if PF > 0:
                            for j in T.unroll(TN):
                                T.evaluate(prefetch(w, e, 0, nt * TN + j, (g * G_GU + ks * S) // P + PF))
                                T.evaluate(prefetch(w, e, 1, nt * TN + j, (g * G_GU + ks * S) // P + PF))
                        for m in T.unroll(BM):
                            for j in T.unroll(TN):
                                dot_g[m, j, T.ramp(0, 1, L)] = dot_step(
                                    dot_g, (m, j), w, (e, 0, nt * TN + j, (g * G_GU + ks * S) // P),
                                    xq, (tok[b, m], g * G_GU + ks * S))
                                dot_u[m, j, T.ramp(0, 1, L)] = dot_step(
                                    dot_u, (m, j), w, (e, 1, nt * TN + j, (g * G_GU + ks * S) // P),
                                    xq, (tok[b, m], g * G_GU + ks * S))
                    for m in T.unroll(BM):
                        for j in T.unroll(TN):
                            acc_g[m, j, T.ramp(0, 1, L)] = acc_g[m, j, T.ramp(0, 1, L)] + to_float(
                                dot_g, (m, j), xz, (tok[b, m], g)) * T.Broadcast(
                                s[e, 0, nt * TN + j, g] * xs[tok[b, m], g], L)
                            acc_u[m, j, T.ramp(0, 1, L)] = acc_u[m, j, T.ramp(0, 1, L)] + to_float(
                                dot_u, (m, j), xz, (tok[b, m], g)) * T.Broadcast(
                                s[e, 1, nt * TN + j, g] * xs[tok[b, m], g], L)
                for m in T.unroll(BM):
                    for j in T.unroll(TN):
                        sums[0] = gate_up_bias(bias, e, 0, nt * TN + j)
                        sums[1] = gate_up_bias(bias, e, 1, nt * TN + j)
                        for v in T.unroll(L):
                            sums[0] = sums[0] + acc_g[m, j, v]
                            sums[1] = sums[1] + acc_u[m, j, v]
                        a[b, m, a_col(nt * TN + j)] = act(sums[0], sums[1])

    @T.prim_func
    def moe_down_weighted(aq_h: T.handle, as_h: T.handle, az_h: T.handle, rw_h: T.handle, ex_h: T.handle,
                          ptr_h: T.handle, w_h: T.handle, s_h: T.handle, bias_h: T.handle, y_h: T.handle):
        T.func_attr({"global_symbol": "moe_down_weighted", "tir.noalias": True})
        nb = T.int64()
        u = T.int64()
        eb = T.int64()
        aq = T.match_buffer(aq_h, (nb, BM, N), "int8")  # [NB, BM, N] activated rows (int4: nibble order)
        a_s = T.match_buffer(as_h, (nb, BM, N // G_DN), "float32")  # [NB, BM, N/G] row scales
        az = T.match_buffer(az_h, (nb, BM, N // G_DN, L), "int32")  # [NB, BM, N/G, L] Z * lane sums
        rw = T.match_buffer(rw_h, (nb, BM), "float32")  # [NB, BM] routing weight (0 on pads)
        experts = T.match_buffer(ex_h, (u,), "int32")  # [U]
        ptr = T.match_buffer(ptr_h, (u + 1,), "int32")  # [U+1]
        w = T.match_buffer(w_h, (E, K, N // P), "uint8")  # [E, K, N/P] packed down
        s = T.match_buffer(s_h, (E, K, N // G_DN), "float32")  # [E, K, N/G] scales
        bias = T.match_buffer(bias_h, (eb, K), DT)  # [E, K] or a [1, K] placeholder
        y = T.match_buffer(y_h, (nb, BM, K), "float32")  # [NB, BM, K] weighted rows
        for it in T.parallel(K_TILES * u):
            acc = T.alloc_buffer((BM, TK, L), "float32", scope=ACC)
            part = T.alloc_buffer((BM, TK, L), "int32", scope=ACC)
            sums = T.alloc_buffer((1,), "float32", scope=ACC)
            kt: T.let[T.int64] = it % K_TILES
            ui: T.let[T.int64] = it // K_TILES
            e: T.let[T.int32] = experts[ui]
            for b in range(ptr[ui], ptr[ui + 1]):
                for m in T.unroll(BM):
                    for j in T.unroll(TK):
                        for v in T.vectorized(L):
                            acc[m, j, v] = T.float32(0)
                for g in range(N // G_DN):
                    for m in T.unroll(BM):
                        for j in T.unroll(TK):
                            for v in T.vectorized(L):
                                part[m, j, v] = 0
                    for ns in range(G_DN // S):
                        if PF > 0:
                            for j in T.unroll(TK):
                                T.evaluate(prefetch(w, e, kt * TK + j, (g * G_DN + ns * S) // P + PF))
                        for m in T.unroll(BM):
                            for j in T.unroll(TK):
                                part[m, j, T.ramp(0, 1, L)] = dot_step(
                                    part, (m, j), w, (e, kt * TK + j, (g * G_DN + ns * S) // P),
                                    aq, (b, m, g * G_DN + ns * S))
                    for m in T.unroll(BM):
                        for j in T.unroll(TK):
                            acc[m, j, T.ramp(0, 1, L)] = acc[m, j, T.ramp(0, 1, L)] + to_float(
                                part, (m, j), az, (b, m, g)) * T.Broadcast(s[e, kt * TK + j, g] * a_s[b, m, g], L)
                for m in T.unroll(BM):
                    for j in T.unroll(TK):
                        sums[0] = down_bias(bias, e, kt * TK + j)
                        for v in T.unroll(L):
                            sums[0] = sums[0] + acc[m, j, v]
                        y[b, m, kt * TK + j] = sums[0] * rw[b, m]

    return moe_gate_up_act, moe_down_weighted


def vnni_quantizers(key: KernelKey):
    """(moe_quantize_x, moe_quantize_act) prim_funcs: rows -> xq int8, xs fp32, xz int32."""
    from tvm import tirx
    from tvm.script import tirx as T

    K, N, L = key.k, key.n, key.config.vec
    P = 2 if key.weight_format == "int4" else 1
    Z = 8 if key.weight_format == "int4" else 128
    VB = 4 * L

    def build(name: str, in_dtype: str, C: int, reorder: bool):
        G = key.group_size or C

        def dst(c):  # where column c is stored: the int4 nibble order, or in place
            return c if not reorder or P == 1 else nibble_order(c, VB)

        def value(v):
            return tirx.Cast("float32", v) if in_dtype != "float32" else v

        @T.prim_func
        def quantize(x_h: T.handle, q_h: T.handle, s_h: T.handle, z_h: T.handle):
            T.func_attr({"global_symbol": name, "tir.noalias": True})
            r = T.int64()
            x = T.match_buffer(x_h, (r, C), in_dtype)  # [R, C] rows to quantise
            q = T.match_buffer(q_h, (r, C), "int8")  # [R, C] int8 (int4: nibble order when reordering)
            s = T.match_buffer(s_h, (r, C // G), "float32")  # [R, C/G] scales
            z = T.match_buffer(z_h, (r, C // G, L), "int32")  # [R, C/G, L] Z * lane sums
            for i in T.parallel(r):
                amax = T.alloc_buffer((1,), "float32", scope="global")
                qv = T.alloc_buffer((1,), "float32", scope="global")
                sums = T.alloc_buffer((L,), "int32", scope="global")
                for g in range(C // G):
                    amax[0] = T.float32(0)
                    for c in range(G):
                        amax[0] = T.max(amax[0], T.fabs(value(x[i, g * G + c])))
                    s[i, g] = amax[0] / T.float32(127)
                    for lane in range(L):
                        sums[lane] = 0
                    for c in range(G):
                        # x / scale as the reference divides (not x * 127 / amax): same roundings.
                        qv[0] = T.if_then_else(amax[0] > T.float32(0), T.max(T.min(
                            T.nearbyint(value(x[i, g * G + c]) / s[i, g]), T.float32(127)), T.float32(-127)),
                            T.float32(0))
                        q[i, dst(g * G + c)] = T.Cast("int8", qv[0])
                        sums[(dst(g * G + c) % VB) // 4] = sums[(dst(g * G + c) % VB) // 4] + T.Cast("int32", qv[0])
                    for lane in range(L):
                        z[i, g, lane] = sums[lane] * Z

        return quantize

    return build("moe_quantize_x", key.dtype, K, True), build("moe_quantize_act", "float32", N, False)
