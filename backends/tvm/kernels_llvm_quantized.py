"""The two grouped GEMMs of kernels_llvm.py for packed int8 / int4 expert weights (llvm).

Same tasks, blocks, epilogues and entry-point names as kernels_llvm.py (read its
docstring first); the weight load and the activations' layout differ. Weights arrive in
the layout of backends/reference/quantized.py:

    gate_up  uint8 [E, 2, N, K/P]   scales fp32 [E, 2, N, K/G]
    down     uint8 [E, K, N/P]      scales fp32 [E, K, N/G]

P = 1 (int8, q + 128) or 2 (int4, q + 8, low nibble = even column); G the group size
(the whole row when the spec says 0). Decode is bound by arithmetic here, not by bytes
(int4 reads a quarter of bf16's), so the inner loop is kept to the fewest vector
instructions per weight:

- A step reads V bytes of a row (V fp32 lanes): V columns for int8, 2V for int4. The
  bytes are widened to int32, the zero point subtracted in integers (int4: the low
  nibble by a mask, the high one by a shift), converted to fp32 and multiply-added.
  No per-weight scale: each group's products accumulate into their own registers, and
  the group's scale multiplies them once at the group's end (acc += s_g * part_g).
- Activations are fp32 in the order the weights' bytes hold their columns, so every
  activation load is a contiguous vector: for int4, inside each chunk of 2V columns the
  even columns come first, then the odd ones (tir_scalars.nibble_order). The caller permutes
  the token rows once per call (op.py); the gate/up kernel writes its activated rows in
  that order, so the down kernel reads them as they are. For int8 the order is the
  identity.

So G must be a multiple of P*V (config fitting in op.py ensures it), and the register
budget is four BM x TN x V arrays in the gate/up kernel (gate, up, and their group
partials), two in the down kernel.
"""

from __future__ import annotations

from moecc.backends.tvm.key import KernelKey
from moecc.backends.tvm.tir_scalars import ScalarOps, llvm_prefetch, nibble_order


def quantized_gemms(key: KernelKey):
    """(moe_gate_up_act, moe_down_weighted) prim_funcs for a quantised `key`."""
    from tvm import tirx
    from tvm.script import tirx as T

    cfg = key.config
    E, N, K = key.num_experts, key.n, key.k
    BM, TN, TK, V, PF = cfg.block_m, cfg.tile_n, cfg.tile_k, cfg.vec, cfg.prefetch
    DT = key.dtype
    P = 2 if key.weight_format == "int4" else 1
    Z = 8 if key.weight_format == "int4" else 128
    G_GU = key.group_size or K  # gate_up groups run along K
    G_DN = key.group_size or N  # down groups run along N
    S = P * V  # columns per step
    N_TILES, K_TILES = N // TN, K // TK
    assert N % TN == 0 and K % TK == 0 and G_GU % S == 0 and G_DN % S == 0, "config not fitted"
    ACC = "global"  # stack arrays: see kernels_llvm.py

    ops = ScalarOps(key)
    act = ops.act
    gate_up_bias, down_bias = ops.gate_up_bias, ops.down_bias

    prefetch = llvm_prefetch

    def lo(byte):  # int8: the value; int4: the low nibble (even column); fp32
        w32 = tirx.Cast("int32", byte)
        if P == 2:
            w32 = tirx.bitwise_and(w32, tirx.const(15, "int32"))
        return tirx.Cast("float32", w32 - tirx.const(Z, "int32"))

    def hi(byte):  # int4: the high nibble (odd column)
        return tirx.Cast("float32", tirx.shift_right(tirx.Cast("int32", byte), tirx.const(4, "int32"))
                         - tirx.const(Z, "int32"))

    def a_col(n):  # where the activated column n is stored (the order the down GEMM reads)
        return n if P == 1 else nibble_order(n, V)

    @T.prim_func
    def moe_gate_up_act(x_h: T.handle, ex_h: T.handle, ptr_h: T.handle, w_h: T.handle, s_h: T.handle,
                        bias_h: T.handle, out_h: T.handle):
        T.func_attr({"global_symbol": "moe_gate_up_act", "tir.noalias": True})
        nb = T.int64()
        u = T.int64()
        eb = T.int64()
        x = T.match_buffer(x_h, (nb, BM, K), "float32")  # [NB, BM, K] token rows, int4 column order
        experts = T.match_buffer(ex_h, (u,), "int32")  # [U]
        ptr = T.match_buffer(ptr_h, (u + 1,), "int32")  # [U+1]
        w = T.match_buffer(w_h, (E, 2, N, K // P), "uint8")  # [E, 2N, K/P] packed gate/up
        s = T.match_buffer(s_h, (E, 2, N, K // G_GU), "float32")  # [E, 2N, K/G] scales
        bias = T.match_buffer(bias_h, (eb, 2, N), DT)  # [E, 2N] or a [1, 2N] placeholder
        a = T.match_buffer(out_h, (nb, BM, N), "float32")  # [NB, BM, N] activated rows, int4 order
        for it in T.parallel(N_TILES * u):
            acc_g = T.alloc_buffer((BM, TN, V), "float32", scope=ACC)
            acc_u = T.alloc_buffer((BM, TN, V), "float32", scope=ACC)
            part_g = T.alloc_buffer((BM, TN, V), "float32", scope=ACC)  # this group's sums
            part_u = T.alloc_buffer((BM, TN, V), "float32", scope=ACC)
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
                for g in range(K // G_GU):
                    for m in T.unroll(BM):
                        for j in T.unroll(TN):
                            for v in T.vectorized(V):
                                part_g[m, j, v] = T.float32(0)
                                part_u[m, j, v] = T.float32(0)
                    for ks in range(G_GU // S):
                        if PF > 0:
                            for j in T.unroll(TN):
                                T.evaluate(prefetch(w, e, 0, nt * TN + j, (g * G_GU + ks * S) // P + PF))
                                T.evaluate(prefetch(w, e, 1, nt * TN + j, (g * G_GU + ks * S) // P + PF))
                        for m in T.unroll(BM):
                            for j in T.unroll(TN):
                                for v in T.vectorized(V):
                                    part_g[m, j, v] = part_g[m, j, v] + x[b, m, g * G_GU + ks * S + v] * lo(
                                        w[e, 0, nt * TN + j, (g * G_GU + ks * S) // P + v])
                                    part_u[m, j, v] = part_u[m, j, v] + x[b, m, g * G_GU + ks * S + v] * lo(
                                        w[e, 1, nt * TN + j, (g * G_GU + ks * S) // P + v])
                                if P == 2:
                                    for v in T.vectorized(V):
                                        part_g[m, j, v] = part_g[m, j, v] + x[b, m, g * G_GU + ks * S + V + v] * hi(
                                            w[e, 0, nt * TN + j, (g * G_GU + ks * S) // P + v])
                                        part_u[m, j, v] = part_u[m, j, v] + x[b, m, g * G_GU + ks * S + V + v] * hi(
                                            w[e, 1, nt * TN + j, (g * G_GU + ks * S) // P + v])
                    for m in T.unroll(BM):
                        for j in T.unroll(TN):
                            for v in T.vectorized(V):
                                acc_g[m, j, v] = acc_g[m, j, v] + part_g[m, j, v] * s[e, 0, nt * TN + j, g]
                                acc_u[m, j, v] = acc_u[m, j, v] + part_u[m, j, v] * s[e, 1, nt * TN + j, g]
                for m in T.unroll(BM):
                    for j in T.unroll(TN):
                        lanes[0] = gate_up_bias(bias, e, 0, nt * TN + j)
                        lanes[1] = gate_up_bias(bias, e, 1, nt * TN + j)
                        for v in T.unroll(V):
                            lanes[0] = lanes[0] + acc_g[m, j, v]
                            lanes[1] = lanes[1] + acc_u[m, j, v]
                        a[b, m, a_col(nt * TN + j)] = act(lanes[0], lanes[1])

    @T.prim_func
    def moe_down_weighted(a_h: T.handle, rw_h: T.handle, ex_h: T.handle, ptr_h: T.handle, w_h: T.handle,
                          s_h: T.handle, bias_h: T.handle, y_h: T.handle):
        T.func_attr({"global_symbol": "moe_down_weighted", "tir.noalias": True})
        nb = T.int64()
        u = T.int64()
        eb = T.int64()
        a = T.match_buffer(a_h, (nb, BM, N), "float32")  # [NB, BM, N] activated rows, int4 order
        rw = T.match_buffer(rw_h, (nb, BM), "float32")  # [NB, BM] routing weight (0 on pads)
        experts = T.match_buffer(ex_h, (u,), "int32")  # [U]
        ptr = T.match_buffer(ptr_h, (u + 1,), "int32")  # [U+1]
        w = T.match_buffer(w_h, (E, K, N // P), "uint8")  # [E, K, N/P] packed down
        s = T.match_buffer(s_h, (E, K, N // G_DN), "float32")  # [E, K, N/G] scales
        bias = T.match_buffer(bias_h, (eb, K), DT)  # [E, K] or a [1, K] placeholder
        y = T.match_buffer(y_h, (nb, BM, K), "float32")  # [NB, BM, K] weighted rows
        for it in T.parallel(K_TILES * u):
            acc = T.alloc_buffer((BM, TK, V), "float32", scope=ACC)
            part = T.alloc_buffer((BM, TK, V), "float32", scope=ACC)
            lanes = T.alloc_buffer((1,), "float32", scope=ACC)
            kt: T.let[T.int64] = it % K_TILES
            ui: T.let[T.int64] = it // K_TILES
            e: T.let[T.int32] = experts[ui]
            for b in range(ptr[ui], ptr[ui + 1]):
                for m in T.unroll(BM):
                    for j in T.unroll(TK):
                        for v in T.vectorized(V):
                            acc[m, j, v] = T.float32(0)
                for g in range(N // G_DN):
                    for m in T.unroll(BM):
                        for j in T.unroll(TK):
                            for v in T.vectorized(V):
                                part[m, j, v] = T.float32(0)
                    for ns in range(G_DN // S):
                        if PF > 0:
                            for j in T.unroll(TK):
                                T.evaluate(prefetch(w, e, kt * TK + j, (g * G_DN + ns * S) // P + PF))
                        for m in T.unroll(BM):
                            for j in T.unroll(TK):
                                for v in T.vectorized(V):
                                    part[m, j, v] = part[m, j, v] + a[b, m, g * G_DN + ns * S + v] * lo(
                                        w[e, kt * TK + j, (g * G_DN + ns * S) // P + v])
                                if P == 2:
                                    for v in T.vectorized(V):
                                        part[m, j, v] = part[m, j, v] + a[b, m, g * G_DN + ns * S + V + v] * hi(
                                            w[e, kt * TK + j, (g * G_DN + ns * S) // P + v])
                    for m in T.unroll(BM):
                        for j in T.unroll(TK):
                            for v in T.vectorized(V):
                                acc[m, j, v] = acc[m, j, v] + part[m, j, v] * s[e, kt * TK + j, g]
                for m in T.unroll(BM):
                    for j in T.unroll(TK):
                        lanes[0] = down_bias(bias, e, kt * TK + j)
                        for v in T.unroll(V):
                            lanes[0] = lanes[0] + acc[m, j, v]
                        y[b, m, kt * TK + j] = lanes[0] * rw[b, m]

    return moe_gate_up_act, moe_down_weighted
