"""The one place expert-weight tiles are loaded: where quantised formats plug in.

Every expert GEMM reads its weight tile through `load_weight_tile`, which returns the
tile as fp32-exact values (dense: the stored dtype) with zeros outside `mask`; the GEMM
casts it to the activation dtype for tl.dot. Formats (layouts: weight_formats.py, the
semantics: backends/reference/quantized.py):

    0 dense  the tile as stored.
    1 int8   (byte - 128) * scale                     (fp32, then the caller's cast:
    2 int4   (nibble - 8) * scale, low nibble first     exactly the reference's
    3 fp8    e4m3fn decoded by bits * scale             dequantise-then-cast)

The scale is one fp32 per output column for the whole BLOCK_K step (`scale_ptrs`
[1, BN]), which is why BLOCK_K must not cross a scale group (weight_formats.py checks
it on the host). fp8 is decoded by moving its sign, exponent and mantissa bits into an
fp16 and multiplying by 2^8 (the exponent-bias difference 15 - 7): exact for every
finite e4m3fn value including subnormals, on every arch (no fp8 instructions needed:
this is w8a16 on sm_86 as on sm_90) and under the interpreter, whose fp8 casts are wrong.
Quantised values are finite (the reference never produces e4m3fn NaN bytes).
"""

from __future__ import annotations

import triton
import triton.language as tl

from moecc.backends.triton.weight_formats import WEIGHT_FORMATS  # noqa: F401  (re-exported)


@triton.jit
def scale_column(k0, GROUP_K: tl.constexpr):
    """Index of the scale group holding reduction index k0 (GROUP_K 0: one group per row)."""
    if GROUP_K == 0:
        return 0
    else:
        return k0 // GROUP_K


@triton.jit
def _decode_fp8_e4m3fn(raw):
    """uint8 e4m3fn bytes [BK, BN] -> fp32 values (exact; NaN bytes are not handled)."""
    bits = raw.to(tl.int32)
    half = ((bits & 0x80) << 8) | ((bits & 0x7F) << 7)  # sign, then exponent+mantissa under fp16's
    return half.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32) * 256.0


@triton.jit
def load_weight_tile(
    ptrs,  # [BK, BN] pointers: the element (k, n), or for int4 the byte holding it (k // 2)
    mask,  # [BK, BN] in-bounds mask
    scale_ptrs,  # [1, BN] this step's scale per column (quantised formats only)
    scale_mask,  # [1, BN]
    WEIGHT_FORMAT: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """A weight tile [BK, BN], zeros outside `mask`: dense as stored, quantised in fp32."""
    if WEIGHT_FORMAT == 0:
        return tl.load(ptrs, mask=mask, other=0.0)
    else:
        raw = tl.load(ptrs, mask=mask, other=0)  # [BK, BN] uint8
        scale = tl.load(scale_ptrs, mask=scale_mask, other=0.0)  # [1, BN] fp32
        if WEIGHT_FORMAT == 1:
            values = (raw.to(tl.int32) - 128).to(tl.float32)
        elif WEIGHT_FORMAT == 2:
            # Row k of the tile holds column k0 + k; k0 is a multiple of BLOCK_K, so k's parity
            # is the column's: even columns are the low nibble.
            shift = ((tl.arange(0, BLOCK_K) % 2) * 4)[:, None]  # [BK, 1]
            values = (((raw.to(tl.int32) >> shift) & 15) - 8).to(tl.float32)
        else:
            values = _decode_fp8_e4m3fn(raw)
        return tl.where(mask, values * scale, 0.0)
