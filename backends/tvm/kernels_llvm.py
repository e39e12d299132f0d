"""The MoE kernels for CPUs (TVM target `llvm`): TensorIR written with its CPU schedule.

Three functions, one IRModule (names are the module's entry points):

    moe_gate_up_act    act[b, m, :] = act(xg[b, m] @ gate_up[e].T + bias)        [NB, BM, N]
    moe_down_weighted  y[b, m, :] = (act[b, m] @ down[e].T + bias) * row_w[b, m] [NB, BM, K]
    moe_combine        out[t, :] = sum_j y[row[t, j]]                           [T, K]

Shape legend (moecc/spec.py): T tokens, K hidden, N intermediate, E = E' experts in the
stack (routed + shared), k' = rows per token (top_k + shared), NB expert blocks of BM
rows (block_m), U experts with at least one block; NB, U and T are symbolic, so one
build serves every token count. `experts` and `block_ptr` come from align.py: block b
belongs to expert experts[u] for block_ptr[u] <= b < block_ptr[u+1]; xg [NB, BM, K] are
the blocks' token rows (x gathered by align.py's `tok`, pad rows repeat token 0).

Schedule (why it looks like this): both GEMMs contract over the axis that is contiguous
in both operands (gate_up [E, 2N, K], down [E, K, N]: "NT" GEMMs read straight from the
model's layout, no repacking). So the reduction axis is the vectorised one: each task
keeps BM x tiles x `vec`-lane fp32 accumulators in registers, streams one weight tile
exactly once per block, and reduces the lanes in the epilogue, where the activation,
biases and routing weight are applied (fused: no [*, 2N] intermediate ever hits memory).
Parallel tasks are (expert, output tile) pairs, expert-major, so each core streams whole
expert matrices front to back (tile-major ordering measured 2x slower: every task then
jumps to another expert and the prefetchers lose the stream); an expert without tokens
has no blocks and no task, so its weights are never read. Accumulators are stack arrays
small enough for TVM to alloca them (config.fitted), so LLVM keeps them in registers. Weights stay in their dtype and are widened to fp32 on load.
Quantised expert stacks (key.weight_format int8 / int4) use the two GEMMs of
kernels_llvm_quantized.py instead (dequantisation fused into the weight load), and with
int8 activations those of kernels_llvm_vnni.py (integer dot products); the combine is
shared.
"""

from __future__ import annotations

from moecc.backends.tvm.key import KernelKey
from moecc.backends.tvm.tir_scalars import ScalarOps, llvm_prefetch


def llvm_module(key: KernelKey):
    """The IRModule of the three kernels for `key` (key.config already fitted)."""
    import tvm
    from tvm.script import tirx as T

    cfg = key.config
    E, N, K, KP = key.num_experts, key.n, key.k, key.top_k
    BM, TN, TK, V, PF = cfg.block_m, cfg.tile_n, cfg.tile_k, cfg.vec, cfg.prefetch
    DT = key.dtype
    N_TILES, K_TILES = N // TN, K // TK
    assert N % TN == 0 and K % TK == 0 and N % V == 0 and K % V == 0, "config not fitted"

    # Accumulators must be stack arrays so LLVM keeps them in registers: TVM 0.27 lowers
    # an allocation to a stack alloca only for scope "global" and fewer than 1024 bytes
    # (config.fitted keeps them smaller); anything else becomes a heap workspace whose
    # stores LLVM cannot prove disjoint from the loads (measured 2-3x slower).
    ACC = "global"

    ops = ScalarOps(key)

    prefetch = llvm_prefetch

    f32, to_dt, act = ops.f32, ops.to_dt, ops.act
    gate_up_bias, down_bias = ops.gate_up_bias, ops.down_bias

    @T.prim_func
    def moe_gate_up_act(x_h: T.handle, ex_h: T.handle, ptr_h: T.handle,
                        w_h: T.handle, bias_h: T.handle, out_h: T.handle):
        T.func_attr({"global_symbol": "moe_gate_up_act", "tir.noalias": True})
        nb = T.int64()
        u = T.int64()
        eb = T.int64()
        x = T.match_buffer(x_h, (nb, BM, K), DT)  # [NB, BM, K] token rows, grouped by expert
        experts = T.match_buffer(ex_h, (u,), "int32")  # [U] expert of each block range
        ptr = T.match_buffer(ptr_h, (u + 1,), "int32")  # [U+1] block ranges
        w = T.match_buffer(w_h, (E, 2, N, K), DT)  # [E, 2N, K] as gate/up halves
        bias = T.match_buffer(bias_h, (eb, 2, N), DT)  # [E, 2N] or a [1, 2N] placeholder
        a = T.match_buffer(out_h, (nb, BM, N), "float32")  # [NB, BM, N] activated rows
        for it in T.parallel(N_TILES * u):
            acc_g = T.alloc_buffer((BM, TN, V), "float32", scope=ACC)  # gate accumulators
            acc_u = T.alloc_buffer((BM, TN, V), "float32", scope=ACC)  # up accumulators
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
                    if PF > 0:
                        for j in T.unroll(TN):
                            T.evaluate(prefetch(w, e, 0, nt * TN + j, ko * V + PF))
                            T.evaluate(prefetch(w, e, 1, nt * TN + j, ko * V + PF))
                    for m in T.unroll(BM):
                        for j in T.unroll(TN):
                            for v in T.vectorized(V):
                                acc_g[m, j, v] = acc_g[m, j, v] + f32(x[b, m, ko * V + v]) * f32(
                                    w[e, 0, nt * TN + j, ko * V + v])
                                acc_u[m, j, v] = acc_u[m, j, v] + f32(x[b, m, ko * V + v]) * f32(
                                    w[e, 1, nt * TN + j, ko * V + v])
                for m in T.unroll(BM):
                    for j in T.unroll(TN):
                        lanes[0] = gate_up_bias(bias, e, 0, nt * TN + j)
                        lanes[1] = gate_up_bias(bias, e, 1, nt * TN + j)
                        for v in T.unroll(V):
                            lanes[0] = lanes[0] + acc_g[m, j, v]
                            lanes[1] = lanes[1] + acc_u[m, j, v]
                        a[b, m, nt * TN + j] = act(lanes[0], lanes[1])

    @T.prim_func
    def moe_down_weighted(a_h: T.handle, rw_h: T.handle, ex_h: T.handle, ptr_h: T.handle,
                          w_h: T.handle, bias_h: T.handle, y_h: T.handle):
        T.func_attr({"global_symbol": "moe_down_weighted", "tir.noalias": True})
        nb = T.int64()
        u = T.int64()
        eb = T.int64()
        a = T.match_buffer(a_h, (nb, BM, N), "float32")  # [NB, BM, N] activated rows
        rw = T.match_buffer(rw_h, (nb, BM), "float32")  # [NB, BM] routing weight (0 on pads)
        experts = T.match_buffer(ex_h, (u,), "int32")  # [U]
        ptr = T.match_buffer(ptr_h, (u + 1,), "int32")  # [U+1]
        w = T.match_buffer(w_h, (E, K, N), DT)  # [E, K, N] down projections
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
                    if PF > 0:
                        for j in T.unroll(TK):
                            T.evaluate(prefetch(w, e, kt * TK + j, no * V + PF))
                    for m in T.unroll(BM):
                        for j in T.unroll(TK):
                            for v in T.vectorized(V):
                                acc[m, j, v] = acc[m, j, v] + a[b, m, no * V + v] * f32(w[e, kt * TK + j, no * V + v])
                for m in T.unroll(BM):
                    for j in T.unroll(TK):
                        lanes[0] = down_bias(bias, e, kt * TK + j)
                        for v in T.unroll(V):
                            lanes[0] = lanes[0] + acc[m, j, v]
                        y[b, m, kt * TK + j] = lanes[0] * rw[b, m]

    @T.prim_func
    def moe_combine(y_h: T.handle, rows_h: T.handle, out_h: T.handle):
        T.func_attr({"global_symbol": "moe_combine", "tir.noalias": True})
        nb = T.int64()
        t = T.int64()
        y = T.match_buffer(y_h, (nb, BM, K), "float32")  # [NB, BM, K] weighted rows
        rows = T.match_buffer(rows_h, (t, KP), "int32")  # [T, k'] row of each (token, slot)
        out = T.match_buffer(out_h, (t, K), DT)  # [T, K]
        for ti in T.parallel(t):
            acc = T.alloc_buffer((V,), "float32", scope=ACC)
            for kc in range(K // V):
                for v in T.vectorized(V):
                    acc[v] = T.float32(0)
                for j in range(KP):
                    for v in T.vectorized(V):
                        acc[v] = acc[v] + y[rows[ti, j] // BM, rows[ti, j] % BM, kc * V + v]
                for v in T.vectorized(V):
                    out[ti, kc * V + v] = to_dt(acc[v])

    extra = {}
    if key.activations == "int8":  # w8a8 / w4a8: integer dot products
        from moecc.backends.tvm.kernels_llvm_vnni import vnni_gemms, vnni_quantizers

        moe_gate_up_act, moe_down_weighted = vnni_gemms(key)
        extra = dict(zip(("moe_quantize_x", "moe_quantize_act"), vnni_quantizers(key)))
    elif key.weight_format == "fp8":  # fp8 block-scaled weights: decoding GEMMs
        from moecc.backends.tvm.kernels_llvm_fp8 import fp8_gemms

        moe_gate_up_act, moe_down_weighted = fp8_gemms(key)
    elif key.weight_format != "dense":  # packed int8 / int4 weights: dequantising GEMMs
        from moecc.backends.tvm.kernels_llvm_quantized import quantized_gemms

        moe_gate_up_act, moe_down_weighted = quantized_gemms(key)
    return tvm.IRModule({"moe_gate_up_act": moe_gate_up_act, "moe_down_weighted": moe_down_weighted,
                         "moe_combine": moe_combine, **extra})
