"""Expert-weight formats the Triton GEMMs read, and the tiles each format allows (host side).

The layouts are moecc's one packed layout (backends/reference/quantized.py, the
semantics); for a stack w [E, R, C] (gate_up: R = 2N, C = K; down: R = K, C = N):

    dense   w in the compute dtype                      [E, R, C]
    int8    uint8 q [E, R, C],   fp32 scales [E, R, C/G]   w = (q - 128) * s[e, r, c // G]
    int4    uint8 q [E, R, C/2], fp32 scales [E, R, C/G]   low nibble = even column, Z = 8
    fp8     e4m3fn  [E, R, C],   fp32 scales [E, ceil(R/B), ceil(C/B)]   w = q * s[e, r // B, c // B]

G = group_size (0: one group per row, G = C); B = group_size for fp8 (the square block).
The kernels load one scale per output column and BLOCK_K step, so a step must stay
inside one group: BLOCK_K divides G (or G = C, per-row: any BLOCK_K). tl.dot needs
BLOCK_K >= 16, so groups of fewer than 16 values (or not a multiple of 16) cannot run
on these kernels; `unfit_reason` says so and the lowering keeps such layers on the
reference op. Dynamic int8 activations (w8a8 / w4a8) are not implemented here: the
kernels are weight-only (activations stay fp32 / fp16 / bf16).

Pure Python (no triton import): heuristics, the op's checks and aot.py use it.
"""

from __future__ import annotations

from typing import NamedTuple

from moecc.spec import ExpertSpec

WEIGHT_FORMATS = {"dense": 0, "int8": 1, "int4": 2, "fp8": 3}
MIN_BLOCK_K = 16  # tl.dot's smallest reduction tile
NO_LIMIT = 1 << 30


class FormatParams(NamedTuple):
    """Compile-time parameters of the weight load for one stack (see weight_load.py)."""

    code: int  # WEIGHT_FORMATS value
    pack: int  # values per stored byte along the reduction axis (int4: 2)
    group_k: int  # values per scale along the reduction axis; 0 = the whole row
    scale_rows: int  # weight rows per scale row (fp8: B; else 1)


def format_params(experts: ExpertSpec) -> FormatParams:
    fmt, g = experts.weight_format, experts.group_size
    if fmt not in WEIGHT_FORMATS:
        raise ValueError(f"the Triton kernels read weight formats {tuple(WEIGHT_FORMATS)}, got {fmt!r}")
    if fmt == "fp8":
        return FormatParams(WEIGHT_FORMATS[fmt], 1, g, g)
    return FormatParams(WEIGHT_FORMATS[fmt], 2 if fmt == "int4" else 1, g if fmt != "dense" else 0, 1)


def max_block_k(experts: ExpertSpec) -> int:
    """The largest power-of-two BLOCK_K whose steps stay inside one scale group (NO_LIMIT for
    dense and per-row formats; 0 when not even MIN_BLOCK_K fits)."""
    p = format_params(experts)
    if p.group_k == 0:
        return NO_LIMIT
    bk = p.group_k & -p.group_k  # the largest power of two dividing the group
    return bk if bk >= MIN_BLOCK_K else 0


def unfit_reason(experts: ExpertSpec) -> str:
    """Why the Triton kernels cannot run this layer's weight format ('' when they can)."""
    if experts.weight_format == "dense":
        return ""
    if experts.activations != "float":
        return (f"{experts.activations} activations (w8a8 / w4a8): the Triton kernels are weight-only "
                "(activations stay fp32 / fp16 / bf16)")
    if max_block_k(experts) == 0:
        return (f"{experts.weight_format} group size {experts.group_size}: each BLOCK_K step must stay inside one "
                f"group and tl.dot needs BLOCK_K >= {MIN_BLOCK_K}, so the group must be a multiple of {MIN_BLOCK_K}")
    return ""


def block_k_reason(block_k: int, experts: ExpertSpec) -> str:
    """Why `block_k` cannot run this layer's format ('' when it can)."""
    why = unfit_reason(experts)
    if why:
        return why
    limit = max_block_k(experts)
    if block_k > limit or (limit != NO_LIMIT and limit % block_k):
        return (f"block_k={block_k} crosses a {experts.weight_format} scale group of {experts.group_size} values; "
                f"use a block_k that divides {limit} (at most {limit})")
    return ""
