"""Packed int8 / int4 expert weights: the layout, quantisation and dequantisation.

This module is the semantics of moecc's quantised expert stacks; every kernel that reads
them is tested against `dequantize`.

Layout (the one onnxruntime's QMoE / MatMulNBits and vLLM's wna16 MoE kernels use, so an
export needs no repacking). For a stack w [E, R, C] (gate_up: R = 2N, C = K; down:
R = K, C = N), C the reduction axis, G the group size (0 = C: one group per row):
    packed  uint8 [E, R, C/P]   P = 1 (int8) or 2 (int4: low nibble = even column first)
    scales  fp32  [E, R, C/G]
    value   w[e, r, c] ~= (q[e, r, c] - Z) * scales[e, r, c // G]
with the zero point Z implied by symmetric quantisation: Z = 128 for int8 (q - 128 in
[-127, 127]) and Z = 8 for int4 (q - 8 in [-8, 7]; absmax maps to 7).

Dynamic int8 activations (spec.experts.activations "int8", w8a8 / w4a8): an expert's
input rows x [t, C] are quantised when they are used, per row and weight group:
    s = absmax(x[t, group]) / 127,  xq = round(x / s) clamped to [-127, 127] (int8),
and the expert computes with xq * s in place of x (`fake_quantize_activations`). The
integer kernels compute the same products exactly as sum(xq * (q - Z)) * s * scale.

fp8 (DeepSeek-V3's checkpoint format), block B (square, B x B values per scale):
    packed  float8_e4m3fn [E, R, C]
    scales  fp32 [E, ceil(R/B), ceil(C/B)]
    value   w[e, r, c] = float(q[e, r, c]) * scales[e, r // B, c // B]
scale = absmax(block) / 448 (e4m3fn's largest finite value), q = round-to-nearest-even
of w / scale in e4m3fn. A block at the end of a row or column range that B does not
divide is shorter (the ceil-sized grids; as DeepSeek-V3 pads its 7168 x 2048 / 128
grids); its scale is its own elements' absmax. Quantised values are finite: e4m3fn's NaN
bytes (0x7f, 0xff) never occur, so kernels may decode without checking for them.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple

import torch

BITS = {"int8": 8, "int4": 4, "fp8": 8}
PER_BYTE = {"int8": 1, "int4": 2, "fp8": 1}
ZERO_POINT = {"int8": 128, "int4": 8}
QMAX = {"int8": 127, "int4": 7}
FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_DTYPE = torch.float8_e4m3fn


class QuantizedStack(NamedTuple):
    packed: torch.Tensor  # uint8 [E, R, C/P]
    scales: torch.Tensor  # fp32 [E, R, C/G]


def group_fits(fmt: str, columns: int, group_size: int) -> str:
    """'' when `fmt` with `group_size` fits a reduction axis of `columns`, else why not
    (fp8 blocks always fit: the last one is shorter)."""
    if fmt == "fp8":
        return "" if group_size > 0 else "fp8 needs a positive block size"
    g = group_size or columns
    if columns % g:
        return f"group size {g} does not divide the reduction axis {columns}"
    if g % PER_BYTE[fmt]:
        return f"{fmt} needs an even group size, got {g}"
    return ""


def quantize_rows(w: torch.Tensor, fmt: str, group_size: int) -> QuantizedStack:
    """w [..., R, C] (any float dtype) -> packed uint8 [..., R, C/P], scales fp32 [..., R, C/G]
    (fp8: packed e4m3fn [..., R, C], scales [..., ceil(R/B), ceil(C/B)], B = group_size)."""
    if fmt == "fp8":
        return quantize_fp8(w, group_size)
    *lead, c = w.shape
    g = group_size or c
    why = group_fits(fmt, c, g)
    if why:
        raise ValueError(why)
    groups = w.float().reshape(*lead, c // g, g)  # [..., R, C/G, G]
    absmax = groups.abs().amax(dim=-1, keepdim=True)  # [..., R, C/G, 1]
    scales = absmax / QMAX[fmt]
    # An all-zero group keeps scale 0 (its values dequantise to exactly 0); divide by 1 there.
    q = torch.round(groups / torch.where(scales > 0, scales, torch.ones_like(scales)))
    q = (q.clamp(-QMAX[fmt] - (fmt == "int4"), QMAX[fmt]) + ZERO_POINT[fmt]).to(torch.uint8)
    q = q.reshape(*lead, c)  # [..., R, C]
    if fmt == "int4":
        q = q[..., 0::2] | (q[..., 1::2] << 4)  # [..., R, C/2], low nibble = even column
    return QuantizedStack(q.contiguous(), scales.reshape(*lead, c // g).contiguous())


def quantize_fp8(w: torch.Tensor, block: int) -> QuantizedStack:
    """w [..., R, C] -> e4m3fn [..., R, C], fp32 block scales [..., ceil(R/B), ceil(C/B)]."""
    *lead, r, c = w.shape
    rb, cb = -(-r // block), -(-c // block)
    # Zero-pad to whole blocks: padding never raises an absmax, and is cut off again.
    padded = torch.nn.functional.pad(w.float(), (0, cb * block - c, 0, rb * block - r))  # [..., RB*B, CB*B]
    blocks = padded.reshape(*lead, rb, block, cb, block)  # [..., RB, B, CB, B]
    scales = blocks.abs().amax(dim=(-3, -1)) / FP8_MAX  # [..., RB, CB]
    # An all-zero block keeps scale 0 (its values decode to exactly 0); divide by 1 there.
    div = torch.where(scales > 0, scales, torch.ones_like(scales))[..., :, None, :, None]
    q = (blocks / div).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)  # round to nearest even
    q = q.reshape(*lead, rb * block, cb * block)[..., :r, :c]
    return QuantizedStack(q.contiguous(), scales.contiguous())


def dequantize_fp8(packed: torch.Tensor, scales: torch.Tensor, block: int,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """e4m3fn [..., R, C], scales [..., ceil(R/B), ceil(C/B)] -> w [..., R, C] in `dtype`
    (computed in fp32). B must be given: the grids' sizes do not determine it."""
    *lead, r, c = packed.shape
    if block < 1 or tuple(scales.shape[-2:]) != (-(-r // block), -(-c // block)):
        raise ValueError(f"fp8 block {block} does not match weights [{r}, {c}] with block scales "
                         f"{tuple(scales.shape[-2:])}")
    s = scales.float().repeat_interleave(block, dim=-2).repeat_interleave(block, dim=-1)[..., :r, :c]
    return (packed.float() * s).to(dtype)


def dequantize(packed: torch.Tensor, scales: torch.Tensor, fmt: str, dtype: torch.dtype = torch.float32,
               group_size: int = 0) -> torch.Tensor:
    """packed uint8 [..., R, C/P], scales [..., R, C/G] -> w [..., R, C] in `dtype` (computed in fp32).
    fp8: packed e4m3fn [..., R, C], block scales [..., RB, CB], group_size = the block edge."""
    if fmt == "fp8":
        return dequantize_fp8(packed, scales, group_size, dtype)
    if fmt == "int4":
        lo, hi = packed & 15, packed >> 4
        q = torch.stack([lo, hi], dim=-1).flatten(-2)  # [..., R, C]
    elif fmt == "int8":
        q = packed
    else:
        raise ValueError(f"unknown quantised weight format {fmt!r}; valid: {tuple(BITS)}")
    values = q.float() - ZERO_POINT[fmt]  # [..., R, C]
    *lead, c = values.shape
    groups = scales.shape[-1]
    w = values.reshape(*lead, groups, c // groups) * scales.float().unsqueeze(-1)  # [..., R, C/G, G]
    return w.reshape(*lead, c).to(dtype)


def quantize_activations(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., C] (float) -> xq int8 [..., C], scales fp32 [..., C/G]; G = group_size or C."""
    c = x.shape[-1]
    g = group_size or c
    if c % g:
        raise ValueError(f"activation group {g} does not divide the reduction axis {c}")
    groups = x.float().reshape(*x.shape[:-1], c // g, g)  # [..., C/G, G]
    scales = groups.abs().amax(dim=-1, keepdim=True) / 127.0  # [..., C/G, 1]
    # An all-zero group keeps scale 0; divide by 1 there (its values quantise to 0).
    q = torch.round(groups / torch.where(scales > 0, scales, torch.ones_like(scales))).clamp(-127, 127)
    return q.to(torch.int8).reshape(x.shape), scales.squeeze(-1)


def fake_quantize_activations(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """x [..., C] -> the values the int8-activation kernels compute with (fp32): xq * s."""
    q, scales = quantize_activations(x, group_size)
    g = group_size or x.shape[-1]
    return (q.float().reshape(*x.shape[:-1], -1, g) * scales.unsqueeze(-1)).reshape(x.shape)


def sqnr_db(x: torch.Tensor, y: torch.Tensor) -> float:
    """20*log10(|x| / |x - y|) in dB (inf when equal; NaN anywhere gives -inf, never a pass)."""
    x, y = x.double(), y.double()
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        return float("-inf")
    signal, noise = x.norm().item(), (x - y).norm().item()
    if noise == 0:
        return float("inf")
    if signal == 0:
        return float("-inf")
    return 20.0 * torch.log10(torch.tensor(signal / noise)).item()


def quantize_stack(stack: torch.Tensor, fmt: str, group_size: int) -> Iterator[tuple[int, QuantizedStack, float]]:
    """Quantise [E, R, C] expert by expert: yields (e, its packed/scales, its weight SQNR dB).

    One expert at a time so the fp32 temporaries are one expert's worth, not the stack's.
    """
    for e in range(stack.shape[0]):
        q = quantize_rows(stack[e], fmt, group_size)
        yield e, q, sqnr_db(stack[e], dequantize(q.packed, q.scales, fmt, group_size=group_size))
