"""The two grouped GEMMs of kernels_llvm.py for packed int8 / int4 expert weights (llvm).

Same tasks, blocks, epilogues and entry-point names as kernels_llvm.py (read its
docstring first); only the weight load differs. Weights arrive in the layout of
backends/reference/quantized.py:

    gate_up  uint8 [E, 2, N, K/P]   scales fp32 [E, 2, N, K/G]
    down     uint8 [E, K, N/P]      scales fp32 [E, K, N/G]

P = 1 (int8, q + 128) or 2 (int4, q + 8, low nibble = even column); G the group size
(the whole row when the spec says 0). Dequantisation is fused into the inner loop:
each `vec`-lane step reads vec/P contiguous bytes, widens them to fp32, subtracts the
implied zero point and multiplies by the one scale of its group (vec divides G, so a
step never straddles two groups; the scale is a broadcast scalar). Why not accumulate
per group and scale at the group's end: that needs a second register array per output
and a reduction at every group boundary, while one extra multiply per weight is free
in a loop bound by reading the weights (1 or 0.5 bytes per multiply-add here, against
2-4 dense).

int4: a step's vec/2 bytes hold columns c0 .. c0+vec-1 as (even, odd) nibble pairs.
The low nibbles (even columns) accumulate into lanes [0, vec/2), the high nibbles (odd
columns) into lanes [vec/2, vec); the activations are read at stride 2 to match. The
lane sum in the epilogue makes the lane order irrelevant.
"""

from __future__ import annotations

from moecc.backends.tvm.key import KernelKey
from moecc.backends.tvm.tir_scalars import ScalarOps


def quantized_gemms(key: KernelKey):
    """(moe_gate_up_act, moe_down_weighted) prim_funcs for a quantised `key`."""
    from tvm import tirx
    from tvm.script import tirx as T

    cfg = key.config
    E, N, K = key.num_experts, key.n, key.k
    BM, TN, TK, V = cfg.block_m, cfg.tile_n, cfg.tile_k, cfg.vec
    DT = key.dtype
    P = 2 if key.weight_format == "int4" else 1
    Z = 8.0 if key.weight_format == "int4" else 128.0
    G_GU = key.group_size or K  # gate_up groups run along K
    G_DN = key.group_size or N  # down groups run along N
    VH = V // P  # bytes per step
    N_TILES, K_TILES = N // TN, K // TK
    assert N % TN == 0 and K % TK == 0 and G_GU % V == 0 and G_DN % V == 0 and V % P == 0, "config not fitted"
    ACC = "global"  # stack arrays: see kernels_llvm.py

    ops = ScalarOps(key)
    f32, act = ops.f32, ops.act
    gate_up_bias, down_bias = ops.gate_up_bias, ops.down_bias

    zero = tirx.const(Z, "float32")

    def lo(byte):  # the weight value of an int8 byte, or of an int4 byte's low nibble (fp32)
        if P == 1:
            return tirx.Cast("float32", byte) - zero
        return tirx.Cast("float32", tirx.bitwise_and(byte, tirx.const(15, "uint8"))) - zero

    def hi(byte):  # int4: the high nibble (odd column)
        return tirx.Cast("float32", tirx.shift_right(byte, tirx.const(4, "uint8"))) - zero

    @T.prim_func
    def moe_gate_up_act(x_h: T.handle, ex_h: T.handle, ptr_h: T.handle, w_h: T.handle, s_h: T.handle,
                        bias_h: T.handle, out_h: T.handle):
        T.func_attr({"global_symbol": "moe_gate_up_act", "tir.noalias": True})
        nb = T.int64()
        u = T.int64()
        eb = T.int64()
        x = T.match_buffer(x_h, (nb, BM, K), DT)  # [NB, BM, K] token rows, grouped by expert
        experts = T.match_buffer(ex_h, (u,), "int32")  # [U]
        ptr = T.match_buffer(ptr_h, (u + 1,), "int32")  # [U+1]
        w = T.match_buffer(w_h, (E, 2, N, K // P), "uint8")  # [E, 2N, K/P] packed gate/up
        s = T.match_buffer(s_h, (E, 2, N, K // G_GU), "float32")  # [E, 2N, K/G] scales
        bias = T.match_buffer(bias_h, (eb, 2, N), DT)  # [E, 2N] or a [1, 2N] placeholder
        a = T.match_buffer(out_h, (nb, BM, N), "float32")  # [NB, BM, N] activated rows
        for it in T.parallel(N_TILES * u):
            acc_g = T.alloc_buffer((BM, TN, V), "float32", scope=ACC)
            acc_u = T.alloc_buffer((BM, TN, V), "float32", scope=ACC)
            lanes = T.alloc_buffer((2,), "float32", scope=ACC)
            nt: T.let[T.int64] = it % N_TILES
            ui: T.let[T.int64] = it // N_TILES
            e: T.let[T.int32] = experts[ui]
            for b in range(ptr[ui], ptr[ui + 1]):
                for m in T.unroll(BM):
                    for j in T.unroll(TN):
                        for v in T.vectorized(V):
                            acc_g[m, j, v] = T.float32(0)
                            acc_u[m, j, v] = T.float32(0)
                for ko in range(K // V):
                    for m in T.unroll(BM):
                        for j in T.unroll(TN):
                            for v in T.vectorized(VH):
                                acc_g[m, j, v] = acc_g[m, j, v] + f32(x[b, m, ko * V + P * v]) * lo(
                                    w[e, 0, nt * TN + j, ko * VH + v]) * s[e, 0, nt * TN + j, ko * V // G_GU]
                                acc_u[m, j, v] = acc_u[m, j, v] + f32(x[b, m, ko * V + P * v]) * lo(
                                    w[e, 1, nt * TN + j, ko * VH + v]) * s[e, 1, nt * TN + j, ko * V // G_GU]
                            if P == 2:
                                for v in T.vectorized(VH):
                                    acc_g[m, j, VH + v] = acc_g[m, j, VH + v] + f32(x[b, m, ko * V + 2 * v + 1]) * hi(
                                        w[e, 0, nt * TN + j, ko * VH + v]) * s[e, 0, nt * TN + j, ko * V // G_GU]
                                    acc_u[m, j, VH + v] = acc_u[m, j, VH + v] + f32(x[b, m, ko * V + 2 * v + 1]) * hi(
                                        w[e, 1, nt * TN + j, ko * VH + v]) * s[e, 1, nt * TN + j, ko * V // G_GU]
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
        w = T.match_buffer(w_h, (E, K, N // P), "uint8")  # [E, K, N/P] packed down
        s = T.match_buffer(s_h, (E, K, N // G_DN), "float32")  # [E, K, N/G] scales
        bias = T.match_buffer(bias_h, (eb, K), DT)  # [E, K] or a [1, K] placeholder
        y = T.match_buffer(y_h, (nb, BM, K), "float32")  # [NB, BM, K] weighted rows
        for it in T.parallel(K_TILES * u):
            acc = T.alloc_buffer((BM, TK, V), "float32", scope=ACC)
            lanes = T.alloc_buffer((1,), "float32", scope=ACC)
            kt: T.let[T.int64] = it % K_TILES
            ui: T.let[T.int64] = it // K_TILES
            e: T.let[T.int32] = experts[ui]
            for b in range(ptr[ui], ptr[ui + 1]):
                for m in T.unroll(BM):
                    for j in T.unroll(TK):
                        for v in T.vectorized(V):
                            acc[m, j, v] = T.float32(0)
                for no in range(N // V):
                    for m in T.unroll(BM):
                        for j in T.unroll(TK):
                            for v in T.vectorized(VH):
                                acc[m, j, v] = acc[m, j, v] + a[b, m, no * V + P * v] * lo(
                                    w[e, kt * TK + j, no * VH + v]) * s[e, kt * TK + j, no * V // G_DN]
                            if P == 2:
                                for v in T.vectorized(VH):
                                    acc[m, j, VH + v] = acc[m, j, VH + v] + a[b, m, no * V + 2 * v + 1] * hi(
                                        w[e, kt * TK + j, no * VH + v]) * s[e, kt * TK + j, no * V // G_DN]
                for m in T.unroll(BM):
                    for j in T.unroll(TK):
                        lanes[0] = down_bias(bias, e, kt * TK + j)
                        for v in T.unroll(V):
                            lanes[0] = lanes[0] + acc[m, j, v]
                        y[b, m, kt * TK + j] = lanes[0] * rw[b, m]

    return moe_gate_up_act, moe_down_weighted
