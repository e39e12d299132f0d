"""GQA decode attention with AVX512-BF16 dot products (`vdpbf16ps`) for bf16 caches.

    gqa_decode_partial(qp [B, Hkv, R, D/2] int32, k [B, Hkv, Lmax, D/2] int32, v [B, Hkv, Lmax, Dv/2] int32,
                       bias [B, S, n] fp32, lo, n, chunk, scale,
                       po [B, Hkv, NC, R, Dv] fp32, pm [B, Hkv, NC, R] fp32, pl [B, Hkv, NC, R] fp32)

Same task split, online softmax, chunk outputs and combine as kernels_llvm_attention.py
(its docstring has the legend); what differs is the arithmetic. The query rows (bf16, not
pre-scaled: the scale multiplies the fp32 scores) and the K / V caches are passed as int32
views: each int32 lane holds two adjacent bf16 values, which is the operand layout of
`vdpbf16ps` (per fp32 lane: acc += a.lo * b.lo + a.hi * b.hi, products exact, fp32 sums).
  - QK reduces over D: adjacent pairs along D are already the K row's layout, so one
    instruction does 32 multiply-adds of one K vector (16 lanes) into one query row's
    accumulator, half the instructions of widening to fp32 and FMA-ing (and no widening).
  - PV reduces over the slots: the pair is two adjacent slots (j, j+1). The probabilities
    of the two slots are rounded to bf16 (RNE, as torch's flash kernel and SDPA in bf16
    do) and packed into one int32 per row; the two V rows are zipped 16-bit-wise (one
    `vpermt2w` per 16 output lanes), so out[r, x] += p[j, r] v[j, x] + p[j+1, r] v[j+1, x]
    is again one instruction per row and 16 output lanes.
TVM 0.27 legalises every bf16 vector to fp32 before code generation, so bf16 never appears
in the TIR: the three helpers below are LLVM IR (`pragma_import_llvm`, linked into the
module and inlined: `alwaysinline`) over int32 vectors that bitcast to `<32 x bfloat>` at
the LLVM level. Needs LLVM >= 17 (the intrinsic's bf16 operands are `<32 x bfloat>` there)
and a target with `+avx512bf16`; attention.py checks the CPU and falls back to the
widening kernel otherwise.
"""

from __future__ import annotations

VEC = 16  # fp32 lanes of one AVX-512 register; also int32 lanes = 32 bf16


def helpers_llvm_ir(rows: int) -> str:
    """LLVM IR of the three inlined helpers, for R = `rows` (the pair-packing width)."""
    zip_lo = ", ".join(f"i32 {i}, i32 {32 + i}" for i in range(16))
    zip_hi = ", ".join(f"i32 {16 + i}, i32 {48 + i}" for i in range(16))
    two_r = 2 * rows
    return f"""
declare <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float>, <32 x bfloat>, <32 x bfloat>)

define internal <16 x float> @moecc_dpbf16ps(<16 x float> %c, <16 x i32> %a, <16 x i32> %b) alwaysinline {{
  %x = bitcast <16 x i32> %a to <32 x bfloat>
  %y = bitcast <16 x i32> %b to <32 x bfloat>
  %r = call <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float> %c, <32 x bfloat> %x, <32 x bfloat> %y)
  ret <16 x float> %r
}}

define internal <16 x i32> @moecc_zip_lo(<16 x i32> %a, <16 x i32> %b) alwaysinline {{
  %x = bitcast <16 x i32> %a to <32 x i16>
  %y = bitcast <16 x i32> %b to <32 x i16>
  %z = shufflevector <32 x i16> %x, <32 x i16> %y, <32 x i32> <{zip_lo}>
  %r = bitcast <32 x i16> %z to <16 x i32>
  ret <16 x i32> %r
}}

define internal <16 x i32> @moecc_zip_hi(<16 x i32> %a, <16 x i32> %b) alwaysinline {{
  %x = bitcast <16 x i32> %a to <32 x i16>
  %y = bitcast <16 x i32> %b to <32 x i16>
  %z = shufflevector <32 x i16> %x, <32 x i16> %y, <32 x i32> <{zip_hi}>
  %r = bitcast <32 x i16> %z to <16 x i32>
  ret <16 x i32> %r
}}

define internal <{rows} x i32> @moecc_bf16_pairs(<{two_r} x float> %p) alwaysinline {{
  %h = fptrunc <{two_r} x float> %p to <{two_r} x bfloat>
  %r = bitcast <{two_r} x bfloat> %h to <{rows} x i32>
  ret <{rows} x i32> %r
}}
"""


def supported(rows: int, d: int, dv: int) -> bool:
    """Shapes this kernel is written for: whole 32-element (one-register) pairs in D and Dv."""
    return rows in (2, 4, 8, 16) and d % 32 == 0 and dv % 32 == 0 and d <= 256 and dv < 256


def partial_func(key):
    """The `gqa_decode_partial` PrimFunc of `key` (an AttentionKey with dot == "bf16")."""
    from tvm import tirx
    from tvm.script import tirx as T

    from moecc.backends.tvm.kernels_llvm_attention import _tree_scores, fast_exp
    from moecc.backends.tvm.tir_scalars import llvm_prefetch

    R, S, D, DV, BL, PF = key.rows, key.s, key.d, key.dv, key.block, key.prefetch
    assert key.dtype == "bfloat16" and supported(R, D, DV) and R % S == 0 and BL % 2 == 0 and BL * R * 4 < 1024
    ACC = "global"  # stack arrays (< 1024 bytes): kept in registers by LLVM
    NEG_INF = float("-inf")
    LL = helpers_llvm_ir(R)
    DP, VP = D // 2, DV // 2  # int32 lanes (bf16 pairs) of a K / V row
    DC, VC = DP // VEC, VP // VEC  # 16-lane int32 vectors of a K / V row
    k_lines, v_lines = max(1, D * 2 // 64), max(1, DV * 2 // 64)
    line = 16  # int32 per cache line

    def ivec(buffer, *index):  # 16 lanes from buffer[index] along the last axis
        return tirx.BufferLoad(buffer, [*index[:-1], tirx.Ramp(index[-1], 1, VEC)])

    def fvec(buffer, r):  # row r of a [R, 16] accumulator
        return tirx.BufferLoad(buffer, [r, tirx.Ramp(0, 1, VEC)])

    def rows_vec(buffer, *lead):
        return tirx.BufferLoad(buffer, [*lead, tirx.Ramp(0, 1, R)])

    def dot(acc, a, b):
        return tirx.call_pure_extern("float32x16", "moecc_dpbf16ps", acc, a, b)

    def zip_lo(a, b):
        return tirx.call_pure_extern("int32x16", "moecc_zip_lo", a, b)

    def zip_hi(a, b):
        return tirx.call_pure_extern("int32x16", "moecc_zip_hi", a, b)

    def pairs(sb, j):  # int32xR: row r holds bf16(p[j, r]) (low half) and bf16(p[j + 1, r])
        both = tirx.Shuffle([rows_vec(sb, j), rows_vec(sb, j + 1)],
                            [tirx.IntImm("int32", i) for r in range(R) for i in (r, R + r)])
        return tirx.call_pure_extern(f"int32x{R}", "moecc_bf16_pairs", both)

    def bcast(x):
        return tirx.Broadcast(x, VEC)

    def scores(acc):
        return _tree_scores(acc, R)

    def exp_rows(x):
        return fast_exp(x, R)

    @T.prim_func
    def gqa_decode_partial(q_h: T.handle, k_h: T.handle, v_h: T.handle, bias_h: T.handle,
                           lo: T.int64, n: T.int64, chunk: T.int64, scale: T.float32,
                           po_h: T.handle, pm_h: T.handle, pl_h: T.handle):
        T.func_attr({"global_symbol": "gqa_decode_partial", "tir.noalias": True})
        b_ = T.int64()
        hkv = T.int64()
        lmax = T.int64()
        nb = T.int64()
        nc = T.int64()
        qp = T.match_buffer(q_h, (b_, hkv, R, DP), "int32")  # [B, Hkv, R, D/2] bf16 pairs of the query rows
        k = T.match_buffer(k_h, (b_, hkv, lmax, DP), "int32")  # [B, Hkv, Lmax, D/2] static cache, bf16 pairs
        v = T.match_buffer(v_h, (b_, hkv, lmax, VP), "int32")  # [B, Hkv, Lmax, Dv/2]
        bias = T.match_buffer(bias_h, (b_, S, nb), "float32")  # [B, S, n] additive mask of the live range
        po = T.match_buffer(po_h, (b_, hkv, nc, R, DV), "float32")  # [B, Hkv, NC, R, Dv] unnormalised
        pm = T.match_buffer(pm_h, (b_, hkv, nc, R), "float32")  # [B, Hkv, NC, R] running max
        pl = T.match_buffer(pl_h, (b_, hkv, nc, R), "float32")  # [B, Hkv, NC, R] running sum
        with T.attr(T.int32(0), "pragma_import_llvm", LL):
            for it in T.parallel(b_ * hkv * nc):
                acc = T.alloc_buffer((R, VEC), "float32", scope=ACC)  # QK lane partials / PV low 16 outputs
                acc_hi = T.alloc_buffer((R, VEC), "float32", scope=ACC)  # PV high 16 outputs of 32
                sb = T.alloc_buffer((BL, R), "float32", scope=ACC)  # block scores, then probabilities
                pp = T.alloc_buffer((BL // 2, R), "int32", scope=ACC)  # bf16 probability pairs (j, j + 1)
                m_run = T.alloc_buffer((R,), "float32", scope=ACC)
                l_run = T.alloc_buffer((R,), "float32", scope=ACC)
                m_new = T.alloc_buffer((R,), "float32", scope=ACC)
                m_use = T.alloc_buffer((R,), "float32", scope=ACC)
                alpha = T.alloc_buffer((R,), "float32", scope=ACC)
                c: T.let[T.int64] = it % nc
                h: T.let[T.int64] = (it // nc) % hkv
                b: T.let[T.int64] = it // (nc * hkv)
                start: T.let[T.int64] = lo + c * chunk
                end: T.let[T.int64] = T.min(start + chunk, lo + n)
                for r in T.vectorized(R):
                    m_run[r] = T.float32(NEG_INF)
                    l_run[r] = T.float32(0)
                for r, x in T.grid(R, DV):
                    po[b, h, c, r, x] = T.float32(0)
                for blk in range((end - start + BL - 1) // BL):
                    l0: T.let[T.int64] = start + blk * BL
                    for j in range(BL):
                        slot: T.let[T.int64] = T.min(l0 + j, end - 1)
                        if PF > 0:
                            for ln in T.unroll(k_lines):
                                T.evaluate(llvm_prefetch(k, b, h, T.min(slot + PF, lmax - 1), ln * line))
                            for ln in T.unroll(v_lines):
                                T.evaluate(llvm_prefetch(v, b, h, T.min(slot + PF, lmax - 1), ln * line))
                        for r in T.unroll(R):
                            for x in T.vectorized(VEC):
                                acc[r, x] = T.float32(0)
                        for dc in T.unroll(DC):
                            for r in T.unroll(R):
                                acc[r, 0:VEC] = dot(fvec(acc, r), ivec(qp, b, h, r, dc * VEC), ivec(k, b, h, slot, dc * VEC))
                        sb[j, 0:R] = scores(acc) * tirx.Broadcast(scale, R)
                        for r in T.vectorized(R):
                            sb[j, r] = T.if_then_else(l0 + j < end, sb[j, r] + bias[b, r % S, slot - lo],
                                                      T.float32(NEG_INF))
                    for r in T.vectorized(R):
                        m_new[r] = m_run[r]
                    for j in T.unroll(BL):
                        for r in T.vectorized(R):
                            m_new[r] = T.max(m_new[r], sb[j, r])
                    for r in T.vectorized(R):  # an all -inf row so far subtracts 0 (exp(-inf) = 0, no NaN)
                        m_use[r] = T.if_then_else(m_new[r] == T.float32(NEG_INF), T.float32(0), m_new[r])
                    alpha[0:R] = exp_rows(rows_vec(m_run) - rows_vec(m_use))  # rescale of the old partials
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
                    for vc in range(VC):  # 32 output lanes: 16 int32 of two V rows zipped into two vectors
                        for r in T.unroll(R):
                            acc[r, 0:VEC] = ivec(po, b, h, c, r, vc * 2 * VEC) * bcast(alpha[r])
                            acc_hi[r, 0:VEC] = ivec(po, b, h, c, r, vc * 2 * VEC + VEC) * bcast(alpha[r])
                        for jp in T.unroll(BL // 2):
                            for r in T.unroll(R):
                                acc[r, 0:VEC] = dot(fvec(acc, r), tirx.Broadcast(pp[jp, r], VEC),
                                                    zip_lo(ivec(v, b, h, T.min(l0 + 2 * jp, end - 1), vc * VEC),
                                                           ivec(v, b, h, T.min(l0 + 2 * jp + 1, end - 1), vc * VEC)))
                                acc_hi[r, 0:VEC] = dot(fvec(acc_hi, r), tirx.Broadcast(pp[jp, r], VEC),
                                                       zip_hi(ivec(v, b, h, T.min(l0 + 2 * jp, end - 1), vc * VEC),
                                                              ivec(v, b, h, T.min(l0 + 2 * jp + 1, end - 1), vc * VEC)))
                        for r in T.unroll(R):
                            po[b, h, c, r, vc * 2 * VEC:vc * 2 * VEC + VEC] = fvec(acc, r)
                            po[b, h, c, r, vc * 2 * VEC + VEC:vc * 2 * VEC + 2 * VEC] = fvec(acc_hi, r)
                for r in T.vectorized(R):
                    pm[b, h, c, r] = m_run[r]
                    pl[b, h, c, r] = l_run[r]

    return gqa_decode_partial
