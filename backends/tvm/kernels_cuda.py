"""The MoE kernels for NVIDIA GPUs (TVM target `cuda`): TensorIR with its GPU schedule.

Same three entry points, signatures and semantics as kernels_llvm.py (read its legend):
    moe_gate_up_act    act[b, m, :] = act(xg[b, m] @ gate_up[e].T + bias)        [NB, BM, N]
    moe_down_weighted  y[b, m, :] = (act[b, m] @ down[e].T + bias) * row_w[b, m] [NB, BM, K]
    moe_combine        out[t, :] = sum_j y[row[t, j]]                           [T, K]

Schedule: one CTA per (output tile, expert) pair; TN (= tile_n) threads, each owning one
output column (gate and up of that column for the first GEMM) for all BM rows of a block.
Per reduction step the CTA stages RT (= red_tile) reduction elements of its BM token
rows and of its TN weight rows in shared memory (coalesced global reads along the
contiguous reduction axis; the weight tile padded by one element per row so the
column-per-thread reads are bank-conflict free), then every thread accumulates in
registers. An expert without tokens has no CTA. CUDA cores, fp32 accumulation; tensor
cores (mma) are not used yet (see docs/backends.md).
"""

from __future__ import annotations

from moecc.backends.tvm.key import KernelKey
from moecc.backends.tvm.tir_scalars import ScalarOps

COMBINE_THREADS = 128


def cuda_module(key: KernelKey):
    """The IRModule of the three kernels for `key` (key.config already fitted)."""
    import tvm
    from tvm.script import tirx as T

    cfg = key.config
    E, N, K, KP = key.num_experts, key.n, key.k, key.top_k
    BM, TN, TK, RT = cfg.block_m, cfg.tile_n, cfg.tile_k, cfg.red_tile
    DT = key.dtype
    N_TILES, K_TILES = N // TN, K // TK
    X_LOADS = (BM * RT + TN - 1) // TN  # staging steps of the token rows, gate/up GEMM
    A_LOADS = (BM * RT + TK - 1) // TK  # staging steps of the activated rows, down GEMM
    TC = _largest_divisor(K, COMBINE_THREADS)
    RS = RT + 1  # shared-memory row stride of a weight tile: odd, so column reads hit 32 banks
    assert N % TN == 0 and K % TK == 0 and N % RT == 0 and K % RT == 0, "config not fitted"

    ops = ScalarOps(key)
    f32, to_dt, act = ops.f32, ops.to_dt, ops.act
    gate_up_bias, down_bias = ops.gate_up_bias, ops.down_bias

    @T.prim_func
    def moe_gate_up_act(x_h: T.handle, ex_h: T.handle, ptr_h: T.handle,
                        w_h: T.handle, bias_h: T.handle, out_h: T.handle):
        T.func_attr({"global_symbol": "moe_gate_up_act", "tir.noalias": True})
        nb = T.int64()
        u = T.int64()
        eb = T.int64()
        x = T.match_buffer(x_h, (nb, BM, K), DT)  # [NB, BM, K] token rows grouped by expert
        experts = T.match_buffer(ex_h, (u,), "int32")  # [U]
        ptr = T.match_buffer(ptr_h, (u + 1,), "int32")  # [U+1]
        w = T.match_buffer(w_h, (E, 2, N, K), DT)  # [E, 2N, K] as gate/up halves
        bias = T.match_buffer(bias_h, (eb, 2, N), DT)  # [E, 2N] or [1, 2N] placeholder
        a = T.match_buffer(out_h, (nb, BM, N), "float32")  # [NB, BM, N]
        for cta in T.thread_binding(N_TILES * u, thread="blockIdx.x"):
            for tx in T.thread_binding(TN, thread="threadIdx.x"):
                xs = T.alloc_buffer((BM, RT), "float32", scope="shared")  # token rows chunk
                ws = T.alloc_buffer((2 * TN * RS,), "float32", scope="shared")  # weight rows chunk, padded
                acc = T.alloc_buffer((BM, 2), "float32", scope="local")
                nt: T.let[T.int64] = cta // u
                ui: T.let[T.int64] = cta % u
                e: T.let[T.int32] = experts[ui]
                for b in range(ptr[ui], ptr[ui + 1]):
                    for m, g in T.grid(BM, 2):
                        acc[m, g] = T.float32(0)
                    for ko in range(K // RT):
                        for i in range(X_LOADS):
                            if i * TN + tx < BM * RT:
                                xs[(i * TN + tx) // RT, (i * TN + tx) % RT] = f32(
                                    x[b, (i * TN + tx) // RT, ko * RT + (i * TN + tx) % RT])
                        for i in range(2 * RT):  # 2 * TN * RT elements, TN threads
                            ws[((i * TN + tx) // RT) * RS + (i * TN + tx) % RT] = f32(
                                w[e, (i * TN + tx) // (TN * RT), nt * TN + (i * TN + tx) // RT % TN,
                                  ko * RT + (i * TN + tx) % RT])
                        T.tvm_storage_sync("shared")
                        for r in range(RT):
                            for m in T.unroll(BM):
                                for g in T.unroll(2):
                                    acc[m, g] = acc[m, g] + xs[m, r] * ws[(g * TN + tx) * RS + r]
                        T.tvm_storage_sync("shared")
                    for m in range(BM):
                        a[b, m, nt * TN + tx] = act(acc[m, 0] + gate_up_bias(bias, e, 0, nt * TN + tx),
                                                    acc[m, 1] + gate_up_bias(bias, e, 1, nt * TN + tx))

    @T.prim_func
    def moe_down_weighted(a_h: T.handle, rw_h: T.handle, ex_h: T.handle, ptr_h: T.handle,
                          w_h: T.handle, bias_h: T.handle, y_h: T.handle):
        T.func_attr({"global_symbol": "moe_down_weighted", "tir.noalias": True})
        nb = T.int64()
        u = T.int64()
        eb = T.int64()
        a = T.match_buffer(a_h, (nb, BM, N), "float32")  # [NB, BM, N]
        rw = T.match_buffer(rw_h, (nb, BM), "float32")  # [NB, BM]
        experts = T.match_buffer(ex_h, (u,), "int32")  # [U]
        ptr = T.match_buffer(ptr_h, (u + 1,), "int32")  # [U+1]
        w = T.match_buffer(w_h, (E, K, N), DT)  # [E, K, N]
        bias = T.match_buffer(bias_h, (eb, K), DT)  # [E, K] or [1, K] placeholder
        y = T.match_buffer(y_h, (nb, BM, K), "float32")  # [NB, BM, K]
        for cta in T.thread_binding(K_TILES * u, thread="blockIdx.x"):
            for tx in T.thread_binding(TK, thread="threadIdx.x"):
                xs = T.alloc_buffer((BM, RT), "float32", scope="shared")  # activated rows chunk
                ws = T.alloc_buffer((TK * RS,), "float32", scope="shared")  # weight rows chunk, padded
                acc = T.alloc_buffer((BM,), "float32", scope="local")
                kt: T.let[T.int64] = cta // u
                ui: T.let[T.int64] = cta % u
                e: T.let[T.int32] = experts[ui]
                for b in range(ptr[ui], ptr[ui + 1]):
                    for m in range(BM):
                        acc[m] = T.float32(0)
                    for no in range(N // RT):
                        for i in range(A_LOADS):
                            if i * TK + tx < BM * RT:
                                xs[(i * TK + tx) // RT, (i * TK + tx) % RT] = a[
                                    b, (i * TK + tx) // RT, no * RT + (i * TK + tx) % RT]
                        for i in range(RT):  # TK * RT elements, TK threads
                            ws[((i * TK + tx) // RT) * RS + (i * TK + tx) % RT] = f32(
                                w[e, kt * TK + (i * TK + tx) // RT, no * RT + (i * TK + tx) % RT])
                        T.tvm_storage_sync("shared")
                        for r in range(RT):
                            for m in T.unroll(BM):
                                acc[m] = acc[m] + xs[m, r] * ws[tx * RS + r]
                        T.tvm_storage_sync("shared")
                    for m in range(BM):
                        y[b, m, kt * TK + tx] = (acc[m] + down_bias(bias, e, kt * TK + tx)) * rw[b, m]

    @T.prim_func
    def moe_combine(y_h: T.handle, rows_h: T.handle, out_h: T.handle):
        T.func_attr({"global_symbol": "moe_combine", "tir.noalias": True})
        nb = T.int64()
        t = T.int64()
        y = T.match_buffer(y_h, (nb, BM, K), "float32")  # [NB, BM, K]
        rows = T.match_buffer(rows_h, (t, KP), "int32")  # [T, k']
        out = T.match_buffer(out_h, (t, K), DT)  # [T, K]
        for ti in T.thread_binding(t, thread="blockIdx.x"):
            for tx in T.thread_binding(TC, thread="threadIdx.x"):
                acc = T.alloc_buffer((1,), "float32", scope="local")
                for kc in range(K // TC):
                    acc[0] = T.float32(0)
                    for j in range(KP):
                        acc[0] = acc[0] + y[rows[ti, j] // BM, rows[ti, j] % BM, kc * TC + tx]
                    out[ti, kc * TC + tx] = to_dt(acc[0])

    return tvm.IRModule({"moe_gate_up_act": moe_gate_up_act, "moe_down_weighted": moe_down_weighted,
                         "moe_combine": moe_combine})


def _largest_divisor(n: int, at_most: int) -> int:
    for d in range(min(n, at_most), 0, -1):
        if n % d == 0:
            return d
    return 1
