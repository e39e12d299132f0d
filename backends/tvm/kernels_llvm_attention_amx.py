"""GQA decode attention on AMX tiles (`tdpbf16ps`) for bf16 caches.

    gqa_decode_partial(qt [B, Hkv, D/32, 16, R] int32, k [B, Hkv, Lmax, D/2] int32, v [B, Hkv, Lmax, Dv/2] int32,
                       bias [B, S, n] fp32, lo, n, chunk, scale,
                       po [B, Hkv, NC, R, Dv] fp32, pm [B, Hkv, NC, R] fp32, pl [B, Hkv, NC, R] fp32,
                       ws [B*Hkv*NC, WS] int32)

Same task split, online softmax, chunk outputs and combine as kernels_llvm_attention.py
(legend there); the two products run on the AMX unit, one block of BL = 16 slots at a time:
  - QK: C[slot, r] = sum_d K[slot, d] q[r, d]. A = 16 K rows straight from the cache (the
    cache row stride), B = the query rows transposed into AMX's pair layout once per call
    on the host (qt[b, h, dc, p, r] = bf16 pair (q[r, 32 dc + 2p], q[r, 32 dc + 2p + 1])),
    D/32 tile products. The [16, R] fp32 scores are stored to the stack, scaled, masked.
  - softmax over the R lanes of each slot (vectors of rows) as in the fp32 kernel.
  - PV: out[r, x] += sum_slot p[r, slot] v[slot, x]. A = the probabilities rounded to bf16
    (RNE), rows r, slot pairs as int32 (the pairs packed by `vcvtneps2bf16`); B = V in
    AMX's pair layout: the two V rows of a slot pair zipped 16-bit-wise (`vpermt2w`) into
    the workspace ws (Dv/16 tiles of 8 pair rows x 64 bytes). C = the chunk's output rows
    po (rescaled in memory by exp(m_old - m_new) first, only when a row's max moved).
Per slot this leaves ~4 K-row tile loads' worth of work, the softmax, and the V zip (4
loads, 4 shuffles, 4 stores per slot at Dv = 128), instead of ~64 FMAs (or 32 `vdpbf16ps`)
plus the score shuffle tree.

The last (partial) block of a chunk copies its K rows (clamped to the chunk's last slot,
as the other kernels read) into the workspace, so a tile never reads past the chunk's
range or the buffer. Tiles (palette 1): t0 C_qk [16, R fp32], t1 A_k [16, 64 B],
t2 B_q [16, R pairs], t3 / t6 C_pv [R, 16 fp32], t4 A_p [R, 8 pairs], t5 / t7 B_v [8 pairs, 16 x].
Each task loads the tile configuration (`ldtilecfg`) and releases the tiles at its end.
The helpers are LLVM IR (`pragma_import_llvm`, inlined): TVM has no AMX types, and the
tile intrinsics take immediate tile numbers. Needs AMX-BF16, the process's AMX permission
(arch_prctl(ARCH_REQ_XCOMP_PERM), attention.py asks once), LLVM >= 17, R in (2, 4, 8),
D and Dv multiples of 32.
"""

from __future__ import annotations

VEC = 16
BL = 16  # slots per block: the A_k tile's rows


def supported(rows: int, d: int, dv: int) -> bool:
    """Shapes this kernel is written for ([BL, R] fp32 scores stay under the 1 KiB stack limit at R <= 8)."""
    return rows in (2, 4, 8) and d % 32 == 0 and dv % 32 == 0 and d <= 256 and dv < 256


def workspace_int32(d: int, dv: int) -> int:
    """int32 per task of the workspace: zipped V tiles [Dv/16, BL/2, 16] + tail K rows [BL, D/2]."""
    return (dv // 16) * (BL // 2) * 16 + BL * (d // 2)


def helpers_llvm_ir(rows: int, d: int, dv: int) -> str:
    """LLVM IR of the tile helpers for R = rows, D = d, Dv = dv (all sizes immediate)."""
    from moecc.backends.tvm.kernels_llvm_attention_bf16 import helpers_llvm_ir as bf16_helpers

    cfg = [0] * 64
    cfg[0] = 1  # palette 1
    shapes = {0: (16, rows * 4), 1: (16, 64), 2: (16, rows * 4), 3: (rows, 64), 4: (rows, BL // 2 * 4), 5: (BL // 2, 64),
              6: (rows, 64), 7: (BL // 2, 64)}
    for t, (r, colsb) in shapes.items():
        cfg[16 + 2 * t], cfg[17 + 2 * t] = colsb & 255, colsb >> 8
        cfg[48 + t] = r
    cfg_bytes = "".join(f"\\{b:02X}" for b in cfg)
    qk = "\n".join(f"""  %ka{i} = getelementptr i8, ptr %k, i64 {64 * i}
  %qa{i} = getelementptr i8, ptr %q, i64 {16 * rows * 4 * i}
  call void @llvm.x86.tileloadd64(i8 1, ptr %ka{i}, i64 %kstride)
  call void @llvm.x86.tileloadd64(i8 2, ptr %qa{i}, i64 {rows * 4})
  call void @llvm.x86.tdpbf16ps(i8 0, i8 1, i8 2)""" for i in range(d // 32))
    # two (C, B) tile pairs, alternating: a tile is not renamed, so one pair would chain
    # every x-block's load -> product -> store behind the previous one
    pv = "\n".join(f"""  %pa{i} = getelementptr i8, ptr %po, i64 {64 * i}
  %va{i} = getelementptr i8, ptr %vz, i64 {BL // 2 * 64 * i}
  call void @llvm.x86.tileloadd64(i8 {(3, 6)[i % 2]}, ptr %pa{i}, i64 {dv * 4})
  call void @llvm.x86.tileloadd64(i8 {(5, 7)[i % 2]}, ptr %va{i}, i64 64)
  call void @llvm.x86.tdpbf16ps(i8 {(3, 6)[i % 2]}, i8 4, i8 {(5, 7)[i % 2]})
  call void @llvm.x86.tilestored64(i8 {(3, 6)[i % 2]}, ptr %pa{i}, i64 {dv * 4})""" for i in range(dv // 16))
    return bf16_helpers(rows) + f"""
@moecc_amx_cfg = internal constant [64 x i8] c"{cfg_bytes}", align 64
declare void @llvm.x86.ldtilecfg(ptr)
declare void @llvm.x86.tilerelease()
declare void @llvm.x86.tilezero(i8 immarg)
declare void @llvm.x86.tileloadd64(i8 immarg, ptr, i64)
declare void @llvm.x86.tilestored64(i8 immarg, ptr, i64)
declare void @llvm.x86.tdpbf16ps(i8 immarg, i8 immarg, i8 immarg)

define internal i32 @moecc_amx_begin() alwaysinline {{
  call void @llvm.x86.ldtilecfg(ptr @moecc_amx_cfg)
  ret i32 0
}}

define internal i32 @moecc_amx_end() alwaysinline {{
  call void @llvm.x86.tilerelease()
  ret i32 0
}}

define internal i32 @moecc_amx_qk(ptr %k, i64 %kstride, ptr %q, ptr %sc) alwaysinline {{
  call void @llvm.x86.tilezero(i8 0)
{qk}
  call void @llvm.x86.tilestored64(i8 0, ptr %sc, i64 {rows * 4})
  ret i32 0
}}

define internal i32 @moecc_amx_pv(ptr %po, ptr %ap, ptr %vz) alwaysinline {{
  call void @llvm.x86.tileloadd64(i8 4, ptr %ap, i64 {BL // 2 * 4})
{pv}
  ret i32 0
}}
"""


def partial_func(key):
    """The `gqa_decode_partial` PrimFunc of `key` (an AttentionKey with dot == "amx")."""
    from tvm import tirx
    from tvm.script import tirx as T

    from moecc.backends.tvm.kernels_llvm_attention import fast_exp
    from moecc.backends.tvm.tir_scalars import llvm_prefetch

    R, S, D, DV, PF = key.rows, key.s, key.d, key.dv, key.prefetch
    assert key.dtype == "bfloat16" and supported(R, D, DV) and R % S == 0
    ACC = "global"  # stack arrays (< 1024 bytes)
    NEG_INF = float("-inf")
    LL = helpers_llvm_ir(R, D, DV)
    DP, VP = D // 2, DV // 2  # int32 lanes (bf16 pairs) of a K / V row
    DC, VC = D // 32, DV // 32  # K tiles per block; 32-wide V chunks (two B_v tiles each)
    WS = workspace_int32(D, DV)
    KT = (DV // 16) * (BL // 2) * 16  # tail K rows' offset in the workspace
    k_lines, v_lines = max(1, D * 2 // 64), max(1, DV * 2 // 64)

    def ivec(buffer, *index):  # 16 int32 / fp32 lanes from buffer[index] along the last axis
        return tirx.BufferLoad(buffer, [*index[:-1], tirx.Ramp(index[-1], 1, VEC)])

    def rows_vec(buffer, *lead):
        return tirx.BufferLoad(buffer, [*lead, tirx.Ramp(0, 1, R)])

    def zip_lo(a, b):
        return tirx.call_pure_extern("int32x16", "moecc_zip_lo", a, b)

    def zip_hi(a, b):
        return tirx.call_pure_extern("int32x16", "moecc_zip_hi", a, b)

    def pairs(sb, j):  # int32xR: row r holds bf16(p[j, r]) (low half) and bf16(p[j + 1, r])
        both = tirx.Shuffle([rows_vec(sb, j), rows_vec(sb, j + 1)],
                            [tirx.IntImm("int32", i) for r in range(R) for i in (r, R + r)])
        return tirx.call_pure_extern(f"int32x{R}", "moecc_bf16_pairs", both)

    def exp_rows(x):
        return fast_exp(x, R)

    def call(name, *args):
        return tirx.call_extern("int32", name, *args)

    @T.prim_func
    def gqa_decode_partial(q_h: T.handle, k_h: T.handle, v_h: T.handle, bias_h: T.handle,
                           lo: T.int64, n: T.int64, chunk: T.int64, scale: T.float32,
                           po_h: T.handle, pm_h: T.handle, pl_h: T.handle, ws_h: T.handle):
        T.func_attr({"global_symbol": "gqa_decode_partial", "tir.noalias": True})
        b_ = T.int64()
        hkv = T.int64()
        lmax = T.int64()
        nb = T.int64()
        nc = T.int64()
        qt = T.match_buffer(q_h, (b_, hkv, DC, 16, R), "int32")  # [B, Hkv, D/32, 16, R] query in AMX B layout
        k = T.match_buffer(k_h, (b_, hkv, lmax, DP), "int32")  # [B, Hkv, Lmax, D/2] static cache, bf16 pairs
        v = T.match_buffer(v_h, (b_, hkv, lmax, VP), "int32")  # [B, Hkv, Lmax, Dv/2]
        bias = T.match_buffer(bias_h, (b_, S, nb), "float32")  # [B, S, n] additive mask of the live range
        po = T.match_buffer(po_h, (b_, hkv, nc, R, DV), "float32")  # [B, Hkv, NC, R, Dv] unnormalised
        pm = T.match_buffer(pm_h, (b_, hkv, nc, R), "float32")  # [B, Hkv, NC, R] running max
        pl = T.match_buffer(pl_h, (b_, hkv, nc, R), "float32")  # [B, Hkv, NC, R] running sum
        ws = T.match_buffer(ws_h, (b_ * hkv * nc, WS), "int32")  # per task: zipped V tiles, tail K rows
        with T.attr(T.int32(0), "pragma_import_llvm", LL):
            for it in T.parallel(b_ * hkv * nc):
                sb = T.alloc_buffer((BL, R), "float32", scope=ACC)  # block scores, then probabilities
                pp = T.alloc_buffer((BL // 2, R), "int32", scope=ACC)  # bf16 probability pairs (j, j + 1)
                ap = T.alloc_buffer((R, BL // 2), "int32", scope=ACC)  # A_p: the same, rows r
                m_run = T.alloc_buffer((R,), "float32", scope=ACC)
                l_run = T.alloc_buffer((R,), "float32", scope=ACC)
                m_new = T.alloc_buffer((R,), "float32", scope=ACC)
                m_use = T.alloc_buffer((R,), "float32", scope=ACC)
                alpha = T.alloc_buffer((R,), "float32", scope=ACC)
                moved = T.alloc_buffer((1,), "int32", scope=ACC)
                c: T.let[T.int64] = it % nc
                h: T.let[T.int64] = (it // nc) % hkv
                b: T.let[T.int64] = it // (nc * hkv)
                start: T.let[T.int64] = lo + c * chunk
                end: T.let[T.int64] = T.min(start + chunk, lo + n)
                T.evaluate(call("moecc_amx_begin"))
                for r in T.vectorized(R):
                    m_run[r] = T.float32(NEG_INF)
                    l_run[r] = T.float32(0)
                for r, x in T.grid(R, DV):
                    po[b, h, c, r, x] = T.float32(0)
                for blk in range((end - start + BL - 1) // BL):
                    l0: T.let[T.int64] = start + blk * BL
                    if PF > 0:
                        for j in range(BL):
                            for ln in T.unroll(k_lines):
                                T.evaluate(llvm_prefetch(k, b, h, T.min(l0 + j + PF, lmax - 1), ln * 16))
                            for ln in T.unroll(v_lines):
                                T.evaluate(llvm_prefetch(v, b, h, T.min(l0 + j + PF, lmax - 1), ln * 16))
                    if l0 + BL <= end:
                        T.evaluate(call("moecc_amx_qk", T.address_of(k[b, h, l0, 0]), T.int64(D * 2),
                                        T.address_of(qt[b, h, 0, 0, 0]), T.address_of(sb[0, 0])))
                    else:  # the chunk's last, partial block: its K rows (clamped) copied first
                        for j in range(BL):
                            for x in T.vectorized(DP):
                                ws[it, KT + j * DP + x] = k[b, h, T.min(l0 + j, end - 1), x]
                        T.evaluate(call("moecc_amx_qk", T.address_of(ws[it, KT]), T.int64(D * 2),
                                        T.address_of(qt[b, h, 0, 0, 0]), T.address_of(sb[0, 0])))
                    for j in T.unroll(BL):
                        for r in T.vectorized(R):
                            sb[j, r] = T.if_then_else(l0 + j < end, sb[j, r] * scale
                                                      + bias[b, r % S, T.min(l0 + j, end - 1) - lo], T.float32(NEG_INF))
                    for r in T.vectorized(R):
                        m_new[r] = m_run[r]
                    for j in T.unroll(BL):
                        for r in T.vectorized(R):
                            m_new[r] = T.max(m_new[r], sb[j, r])
                    for r in T.vectorized(R):  # an all -inf row so far subtracts 0 (exp(-inf) = 0, no NaN)
                        m_use[r] = T.if_then_else(m_new[r] == T.float32(NEG_INF), T.float32(0), m_new[r])
                    alpha[0:R] = exp_rows(rows_vec(m_run) - rows_vec(m_use))  # rescale of the old partials
                    moved[0] = 0
                    for r in range(R):
                        moved[0] = moved[0] + T.Cast("int32", m_new[r] != m_run[r])
                    for r in T.vectorized(R):
                        m_run[r] = m_new[r]
                    for j in T.unroll(BL):
                        sb[j, 0:R] = exp_rows(rows_vec(sb, j) - rows_vec(m_use))
                    for r in T.vectorized(R):
                        l_run[r] = l_run[r] * alpha[r]
                    for j in T.unroll(BL):
                        for r in T.vectorized(R):
                            l_run[r] = l_run[r] + sb[j, r]
                    for jp in T.unroll(BL // 2):
                        pp[jp, 0:R] = pairs(sb, 2 * jp)
                    for r, jp in T.grid(R, BL // 2):
                        ap[r, jp] = pp[jp, r]
                    if moved[0] > 0:  # a row's max moved: rescale its partial output (NaN rows: always)
                        for r in range(R):
                            for x in T.vectorized(DV):
                                po[b, h, c, r, x] = po[b, h, c, r, x] * alpha[r]
                    for vc in T.unroll(VC):  # V pairs zipped into the B_v tiles (x-blocks 2 vc, 2 vc + 1)
                        for jp in T.unroll(BL // 2):
                            ws[it, (2 * vc * (BL // 2) + jp) * VEC:(2 * vc * (BL // 2) + jp) * VEC + VEC] = zip_lo(
                                ivec(v, b, h, T.min(l0 + 2 * jp, end - 1), vc * VEC),
                                ivec(v, b, h, T.min(l0 + 2 * jp + 1, end - 1), vc * VEC))
                            ws[it, ((2 * vc + 1) * (BL // 2) + jp) * VEC:((2 * vc + 1) * (BL // 2) + jp) * VEC + VEC] = zip_hi(
                                ivec(v, b, h, T.min(l0 + 2 * jp, end - 1), vc * VEC),
                                ivec(v, b, h, T.min(l0 + 2 * jp + 1, end - 1), vc * VEC))
                    T.evaluate(call("moecc_amx_pv", T.address_of(po[b, h, c, 0, 0]), T.address_of(ap[0, 0]),
                                    T.address_of(ws[it, 0])))
                for r in T.vectorized(R):
                    pm[b, h, c, r] = m_run[r]
                    pl[b, h, c, r] = l_run[r]
                T.evaluate(call("moecc_amx_end"))

    return gqa_decode_partial
