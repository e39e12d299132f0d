"""GQA decode attention for CPUs (TVM target `llvm`): one pass over K and V per KV head.

    gqa_decode_partial(qs [B, Hkv, R, D] fp32, k [B, Hkv, Lmax, D], v [B, Hkv, Lmax, Dv],
                       bias [B, S, n] fp32, lo, n, chunk,
                       po [B, Hkv, NC, R, Dv] fp32, pm [B, Hkv, NC, R] fp32, pl [B, Hkv, NC, R] fp32)

Legend: B batch, Hkv KV heads, G query heads per KV head, S query tokens, R = G*S query
rows of one KV head (row r = g*S + s: the regrouped query of moecc/gqa.py, pre-scaled by
the softmax scale), Lmax static cache slots, D / Dv head widths, n = slots [lo, lo + n)
attended (the live range), NC = ceil(n / chunk) chunks. bias is the additive mask of the
live range (0 / -inf / finfo.min; shared by the G heads of a token). k / v in the model's
dtype (fp32, bf16, fp16), read in place from the static cache; widened to fp32 in
registers, fp32 accumulation throughout.

Split (flash-decoding): one parallel task per (b, h, chunk), so a batch-1 step still keeps
every core busy. A task streams its chunk of K and V once, block by block (BL slots),
with an online softmax: per block the R x BL scores, the running max m and sum l, the
rescaled partial output. It writes the chunk's unnormalised output and (m, l); the combine
(moecc/gqa.py, a few torch ops over [B, Hkv, NC, R, Dv]) joins the chunks and the sinks.

Why the loops look like this (per slot the arithmetic is ~2 R D FMAs for ~2 D elements
read, so at R = 8 the kernel must not waste vector instructions to stay at memory speed):
  - QK: K rows are contiguous along D, so D is the vector axis: each 16-wide K vector is
    loaded (and widened) once and multiplied into R accumulators. The R lane-sums are
    done together as a transposing shuffle tree (pairs of rows share one vector at each
    level), ~3 instructions per row and slot instead of ~8 for separate reductions; the
    tree leaves one vector of R scores, stored as the block's score row [BL, R].
  - softmax over R lanes at once (vectors of rows), exp as a Cephes polynomial (LLVM has
    no vector exp; libm calls per element cost 20x more).
  - PV: for each 16-wide output chunk, R accumulators in registers, the chunk's BL V
    vectors each loaded once (widened once) and FMA'd with the broadcast probabilities.
  - software prefetch of the K and V rows PF slots ahead (the hardware prefetcher sees a
    stride-changing pattern across the QK and PV phases).
Slots past the chunk's end inside the last block are read at the chunk's last slot (no
read past the valid range or the buffer) and masked to -inf.

Stack arrays stay under TVM's 1024-byte alloca limit (kernels_llvm.py says why), which is
what bounds BL * R; at R = 16 the R x 16 accumulators reach it and become a heap
workspace (correct, slower; not measured). Rows that see nothing (all -inf) keep m = -inf, l = 0, output 0.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

VEC = 16  # fp32 lanes of one AVX-512 register


@dataclass(frozen=True)
class AttentionKey:
    """What identifies one compiled module (the code hash and TVM version join in digest)."""

    rows: int  # R = G * S: 2, 4, 8 or 16
    s: int  # query tokens S (bias rows)
    d: int  # key width D (multiple of 16)
    dv: int  # value width Dv (multiple of 16)
    dtype: str  # K/V dtype: float32, bfloat16, float16
    mcpu: str  # LLVM CPU name
    out_dtype: str = "float32"  # the query's dtype: the combine writes the output in it
    block: int = 16  # BL slots per online-softmax block
    prefetch: int = 16  # slots ahead for software prefetch (0: none)
    dot: str = "fp32"  # "fp32": widen K/V, fp32 FMAs; "bf16": vdpbf16ps (kernels_llvm_attention_bf16.py);
    #                    "amx": AMX tiles (kernels_llvm_attention_amx.py)

    def digest(self, tvm_version: str) -> str:
        here = Path(__file__)
        code = hashlib.sha256(b"".join(here.with_name(f).read_bytes() for f in (
            here.name, "kernels_llvm_attention_bf16.py", "kernels_llvm_attention_amx.py"))
                              ).hexdigest()[:16]
        payload = repr((sorted(asdict(self).items()), tvm_version, code))
        return hashlib.sha256(payload.encode()).hexdigest()[:24]

    def short_name(self) -> str:
        return f"gqa_decode_R{self.rows}_S{self.s}_D{self.d}_Dv{self.dv}_{self.dtype}_{self.dot}"


def supported(rows: int, d: int, dv: int) -> bool:
    """Shapes the kernel is written for (others use the op's other kernels)."""
    return rows in (2, 4, 8, 16) and d % VEC == 0 and dv % VEC == 0 and d <= 256 and dv < 256  # the combine's [Dv] row on the stack


def block_slots(rows: int) -> int:
    """BL: the score block [BL, R] fp32 and the R x 16 accumulators stay under 1024 bytes."""
    return max(1, min(16, 128 // rows))


def _tree_scores(acc, rows: int):
    """float32xR vector of the R lane-sums of acc [R, 16] (rows in order), by a shuffle tree.

    Each vector holds `width` lanes per row for a group of rows; combining two vectors
    keeps the first halves of every row's lanes in one operand and the second halves in
    the other, so one add halves the lanes per row for twice the rows."""
    from tvm import tirx

    # (expression, lane -> row, lanes per row); start: one vector per row, 16 lanes each
    vecs = [(tirx.BufferLoad(acc, [r, tirx.Ramp(0, 1, VEC)]), [r] * VEC, VEC) for r in range(rows)]
    while len(vecs) > 1:
        nxt = []
        for (a, ra, w), (b, rb, _) in zip(vecs[0::2], vecs[1::2]):
            lo_idx, hi_idx, rows_new = [], [], []
            for base, src in ((0, ra), (VEC, rb)):
                for g in range(0, VEC, w):  # one row's w lanes at g
                    lo_idx += [base + g + i for i in range(w // 2)]
                    hi_idx += [base + g + w // 2 + i for i in range(w // 2)]
                    rows_new += [src[g]] * (w // 2)
            x = tirx.Shuffle([a, b], [tirx.IntImm("int32", i) for i in lo_idx])
            y = tirx.Shuffle([a, b], [tirx.IntImm("int32", i) for i in hi_idx])
            nxt.append((x + y, rows_new, w // 2))
        vecs = nxt
    v, lane_rows, w = vecs[0]
    lanes = VEC
    while w > 1:  # one vector left: fold each row's w lanes within it
        lo_idx, hi_idx, rows_new = [], [], []
        for g in range(0, lanes, w):
            lo_idx += [g + i for i in range(w // 2)]
            hi_idx += [g + w // 2 + i for i in range(w // 2)]
            rows_new += [lane_rows[g]] * (w // 2)
        v = (tirx.Shuffle([v], [tirx.IntImm("int32", i) for i in lo_idx])
             + tirx.Shuffle([v], [tirx.IntImm("int32", i) for i in hi_idx]))
        lane_rows, lanes, w = rows_new, lanes // 2, w // 2
    if lane_rows != list(range(rows)):  # put the rows in order
        v = tirx.Shuffle([v], [tirx.IntImm("int32", lane_rows.index(r)) for r in range(rows)])
    return v


def fast_exp(x, lanes: int):
    """exp(x) for x <= 0 (or -inf / NaN) as TIR arithmetic (Cephes expf, ~1 ulp).

    -inf and anything below -87.3 give exactly 0; NaN stays NaN (the exponent is clamped
    with max, so no out-of-range float->int conversion reaches the result)."""
    from tvm import tirx

    f = "float32" if lanes == 1 else f"float32x{lanes}"
    i = "int32" if lanes == 1 else f"int32x{lanes}"

    def c(v):
        return tirx.const(v, "float32") if lanes == 1 else tirx.Broadcast(tirx.const(v, "float32"), lanes)

    n = tirx.floor(x * c(1.44269504088896341) + c(0.5))
    n = tirx.max(n, c(-127.0))
    r = x - n * c(0.693359375) - n * c(-2.12194440e-4)
    p = c(1.9875691500e-4)
    for coef in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        p = p * r + c(coef)
    p = p * r * r + r + c(1.0)
    two_n = tirx.reinterpret(f, tirx.shift_left(tirx.Cast(i, n) + tirx.Broadcast(tirx.const(127, "int32"), lanes)
                                                if lanes > 1 else tirx.Cast(i, n) + tirx.const(127, "int32"),
                                                tirx.Broadcast(tirx.const(23, "int32"), lanes)
                                                if lanes > 1 else tirx.const(23, "int32")))
    return tirx.Select(x < c(-87.3), c(0.0), p * two_n)


def attention_module(key: AttentionKey):
    """The IRModule with `gqa_decode_partial` for `key`."""
    import tvm
    from tvm import tirx
    from tvm.script import tirx as T

    from moecc.backends.tvm.tir_scalars import llvm_prefetch

    R, S, D, DV, DT, BL, PF = key.rows, key.s, key.d, key.dv, key.dtype, key.block, key.prefetch
    assert supported(R, D, DV) and R % S == 0 and BL * R * 4 < 1024
    ACC = "global"  # stack arrays (< 1024 bytes): kept in registers by LLVM
    NEG_INF = float("-inf")
    elem = 4 if DT == "float32" else 2
    k_lines = max(1, D * elem // 64)
    v_lines = max(1, DV * elem // 64)
    k_step = 64 // elem  # elements per cache line
    DC, VC = D // VEC, DV // VEC

    def f32(v):
        return tirx.Cast("float32", v) if DT != "float32" else v

    def rows_vec(buffer, *lead):
        return tirx.BufferLoad(buffer, [*lead, tirx.Ramp(0, 1, R)])

    def scores(acc):
        return _tree_scores(acc, R)

    def exp_rows(x):
        return fast_exp(x, R)

    @T.prim_func
    def gqa_decode_partial(q_h: T.handle, k_h: T.handle, v_h: T.handle, bias_h: T.handle,
                           lo: T.int64, n: T.int64, chunk: T.int64,
                           po_h: T.handle, pm_h: T.handle, pl_h: T.handle):
        T.func_attr({"global_symbol": "gqa_decode_partial", "tir.noalias": True})
        b_ = T.int64()
        hkv = T.int64()
        lmax = T.int64()
        nb = T.int64()
        nc = T.int64()
        qs = T.match_buffer(q_h, (b_, hkv, R, D), "float32")  # [B, Hkv, R, D] scaled query rows
        k = T.match_buffer(k_h, (b_, hkv, lmax, D), DT)  # [B, Hkv, Lmax, D] static cache
        v = T.match_buffer(v_h, (b_, hkv, lmax, DV), DT)  # [B, Hkv, Lmax, Dv]
        bias = T.match_buffer(bias_h, (b_, S, nb), "float32")  # [B, S, n] additive mask of the live range
        po = T.match_buffer(po_h, (b_, hkv, nc, R, DV), "float32")  # [B, Hkv, NC, R, Dv] unnormalised
        pm = T.match_buffer(pm_h, (b_, hkv, nc, R), "float32")  # [B, Hkv, NC, R] running max
        pl = T.match_buffer(pl_h, (b_, hkv, nc, R), "float32")  # [B, Hkv, NC, R] running sum
        for it in T.parallel(b_ * hkv * nc):
            acc = T.alloc_buffer((R, VEC), "float32", scope=ACC)  # QK lane partials / PV outputs
            sb = T.alloc_buffer((BL, R), "float32", scope=ACC)  # block scores, then probabilities
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
                            T.evaluate(llvm_prefetch(k, b, h, T.min(slot + PF, lmax - 1), ln * k_step))
                        for ln in T.unroll(v_lines):
                            T.evaluate(llvm_prefetch(v, b, h, T.min(slot + PF, lmax - 1), ln * k_step))
                    for r in T.unroll(R):
                        for x in T.vectorized(VEC):
                            acc[r, x] = T.float32(0)
                    for dc in T.unroll(DC):
                        for r in T.unroll(R):
                            for x in T.vectorized(VEC):
                                acc[r, x] = acc[r, x] + qs[b, h, r, dc * VEC + x] * f32(k[b, h, slot, dc * VEC + x])
                    sb[j, 0:R] = scores(acc)
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
                for vc in range(VC):
                    for r in T.unroll(R):
                        for x in T.vectorized(VEC):
                            acc[r, x] = po[b, h, c, r, vc * VEC + x] * alpha[r]
                    for j in T.unroll(BL):
                        for r in T.unroll(R):
                            for x in T.vectorized(VEC):
                                acc[r, x] = acc[r, x] + sb[j, r] * f32(v[b, h, T.min(l0 + j, end - 1), vc * VEC + x])
                    for r in T.unroll(R):
                        for x in T.vectorized(VEC):
                            po[b, h, c, r, vc * VEC + x] = acc[r, x]
            for r in T.vectorized(R):
                pm[b, h, c, r] = m_run[r]
                pl[b, h, c, r] = l_run[r]

    OUT = key.out_dtype

    def to_out(x):
        return tirx.Cast(OUT, x) if OUT != "float32" else x

    @T.prim_func
    def gqa_decode_combine(po_h: T.handle, pm_h: T.handle, pl_h: T.handle, sink_h: T.handle, out_h: T.handle):
        T.func_attr({"global_symbol": "gqa_decode_combine", "tir.noalias": True})
        b_ = T.int64()
        hkv = T.int64()
        nc = T.int64()
        po = T.match_buffer(po_h, (b_, hkv, nc, R, DV), "float32")
        pm = T.match_buffer(pm_h, (b_, hkv, nc, R), "float32")
        pl = T.match_buffer(pl_h, (b_, hkv, nc, R), "float32")
        sink = T.match_buffer(sink_h, (hkv, R), "float32")  # [Hkv, R] sink logit per row (-inf: none)
        out = T.match_buffer(out_h, (b_, hkv, R, DV), OUT)  # [B, Hkv, R, Dv] = [B, Hq, S, Dv]
        for bh in range(b_ * hkv):  # serial: tiny, and one parallel region less per step
            o = T.alloc_buffer((DV,), "float32", scope=ACC)
            st = T.alloc_buffer((3,), "float32", scope=ACC)  # max, its 0-for-empty form, total
            h: T.let[T.int64] = bh % hkv
            b: T.let[T.int64] = bh // hkv
            for r in range(R):
                st[0] = sink[h, r]
                for c in range(nc):
                    st[0] = T.max(st[0], pm[b, h, c, r])
                st[1] = T.if_then_else(st[0] == T.float32(NEG_INF), T.float32(0), st[0])
                st[2] = fast_exp(sink[h, r] - st[1], 1)
                for x in T.vectorized(DV):
                    o[x] = T.float32(0)
                for c in range(nc):
                    st[0] = fast_exp(pm[b, h, c, r] - st[1], 1)  # this chunk's weight (0 if it saw nothing)
                    st[2] = st[2] + st[0] * pl[b, h, c, r]
                    for x in T.vectorized(DV):
                        o[x] = o[x] + st[0] * po[b, h, c, r, x]
                # rows that saw nothing (total 0) give zeros; a NaN total stays NaN
                st[2] = T.if_then_else(st[2] == T.float32(0), T.float32(0), T.float32(1) / st[2])
                for x in T.vectorized(DV):
                    out[b, h, r, x] = to_out(o[x] * st[2])

    if key.dot == "bf16":  # same combine, the partial with bf16 dot products
        from moecc.backends.tvm.kernels_llvm_attention_bf16 import partial_func

        gqa_decode_partial = partial_func(key)
    elif key.dot == "amx":
        from moecc.backends.tvm.kernels_llvm_attention_amx import partial_func as amx_partial_func

        gqa_decode_partial = amx_partial_func(key)
    return tvm.IRModule({"gqa_decode_partial": gqa_decode_partial, "gqa_decode_combine": gqa_decode_combine})
