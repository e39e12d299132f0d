"""Grouped-query attention (GQA) decode over the static KV cache: the op and its reference.

    moecc::gqa_decode_attention(query [B, Hq, S, D], key [B, Hkv, L, D], value [B, Hkv, L, Dv],
                                attn_mask?, sinks? [Hq], scale, is_causal) -> [B, Hq, S, Dv]

Legend: B batch, Hq query heads, Hkv KV heads, G = Hq / Hkv query heads per KV head,
S query tokens (few: decode), L cache slots (static: the maximum length), D / Dv head widths.

Semantics: exactly `scaled_dot_product_attention(q, repeat_kv(k, G), repeat_kv(v, G),
attn_mask, scale=scale, is_causal=is_causal)` of transformers' GQA modules (Qwen3-MoE,
Mixtral, Qwen2-MoE, ...; query head h reads KV head h // G), with two additions:
  - `sinks` [Hq] (GPT-OSS): one learned logit per head joins the softmax's denominator and
    is dropped afterwards, as modeling_gpt_oss.eager_attention_forward does:
        p = softmax([scale * q.k + mask, sink])[:-1]
  - sliding windows arrive as transformers passes them: inside the mask (a sliding layer's
    mask hides slots older than the window), so they need no parameter here.
attn_mask is a bool mask (True = attend) or an additive float mask (transformers' eager
masks use finfo(dtype).min for hidden slots), broadcastable to [B, Hq, S, L]. Softmax in
fp32; rows with no visible slot give zeros (as torch's SDPA does), also with sinks.

The KV cache is read where it is: no repeated heads are materialised; the query is regrouped
to [B, Hkv, G*S, D] (a view) so each KV head's cache is read once for its G query heads.

Valid length. On the CPU the op first reads the mask on the host (small reductions of
[.., S, L] booleans) and attends only over the slots [first, last] any query may see: a
2k-token conversation in an 8k static cache reads 2k slots, and a sliding layer reads its
window. Cutting is exact: hidden slots contribute exactly zero (exp of -inf, or of
finfo.min, underflows), except in a row with no visible slot under a float mask, where
SDPA averages all slots; then the op does not cut. Off the CPU there is no host read (the
op works under CUDA-graph capture) and it attends over the whole cache under the mask.

CPU kernels, in order of preference ("auto"):
  - "tvm": moecc's TVM llvm kernel (backends/tvm/kernels_llvm_attention.py, host side
    backends/tvm/attention.py): streams each KV head's K and V once over the live range,
    in place in the static cache (the full [B, Hkv, Lmax, D] tensors and the offset, no
    slicing copies), with the G*S query rows of the group in registers, split in chunks
    across threads (flash-decoding) and combined here-after (with the sinks). Taken when
    TVM imports, G*S is 2, 4, 8 or 16, D and Dv are multiples of 16 (<= 256), the cache
    is contiguous and the mask is the same for every head ([B|1, 1, S|1, L]); for bf16 /
    fp16 only from 8 MiB of live K/V per call (_TVM_AUTO_MIN_BYTES says why), 2 MiB where
    bf16 runs on AMX tiles. bf16 query and cache multiply on AMX tiles
    (kernels_llvm_attention_amx.py) or with `vdpbf16ps` (kernels_llvm_attention_bf16.py)
    where the CPU has them, else widened to fp32 FMAs (attention.dot_kind picks).
  - "flash": torch's flash-attention CPU kernel (blocked online softmax, fp32
    accumulation, bf16/fp16 inputs read as they are) over the regrouped query and the cut
    cache views; its log-sum-exp gives the sink correction out * sigmoid(lse - sink).
    Taken where the TVM kernel is not (TVM not installed, other shapes, per-head masks).
  - "grouped": a plain fp32 grouped matmul (the semantics' reference), off the CPU and
    for dtypes / widths the others do not take.
bench/gqa_decode.py measures them; docs/kv_cache.md has the numbers.

Importing this module defines the op; nothing imports it at moecc import time.
"""

from __future__ import annotations

import functools
from typing import Optional

import numpy as np
import torch

_LIB = torch.library.Library("moecc", "FRAGMENT")
_LIB.define("gqa_decode_attention(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, Tensor? sinks, "
            "float scale, bool is_causal) -> Tensor")

_FLASH_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
KERNELS = ("auto", "tvm", "flash", "grouped")
# "auto" takes the TVM kernel for live K/V of at least this many bytes per call. fp32:
# always (level with flash from L2/L3, faster from DRAM). bf16/fp16: only where the step
# streams from DRAM (8k-slot caches and up at Qwen3-30B-A3B widths): there it beat flash
# (3.3-3.8 vs 4.2-4.7 ms, 8k, 1 thread), while from L2/L3 torch's flash kernel, which
# computes with bf16 dot products, took 0.45-0.54 ms against 0.73 (2k, docs/kv_cache.md);
# the TVM kernel's widening form (fp32 FMAs). Its `vdpbf16ps` form measured about level
# with the widening one (the FMAs were not the bottleneck), so the same threshold applies.
_TVM_AUTO_MIN_BYTES = {torch.float32: 0, torch.bfloat16: 8 << 20, torch.float16: 8 << 20}
# bf16 on the AMX kernel (kernels_llvm_attention_amx.py, CPUs with AMX-BF16): level with
# flash at 2 MiB of live K/V (1k slots, one thread, cache in L2/L3: 0.32 ms both) and
# faster above (4k slots: 0.73 vs 1.00 ms; docs/kv_cache.md).
_TVM_AUTO_MIN_BYTES_AMX = 2 << 20


@functools.lru_cache(maxsize=256)
def _tvm_plan(q_shape: tuple, q_dtype: torch.dtype, k_shape: tuple, kv_dtype: torch.dtype,
              v_shape: tuple) -> Optional[int]:
    """None where moecc's TVM kernel cannot run these (contiguous, CPU) tensors: TVM not
    importable, or shapes it is not written for; else the live K/V bytes per call from
    which "auto" takes it (see above). Cached per shape: the checks cost tens of us, and
    the op runs once per layer and decode step."""
    from moecc.backends.tvm.attention import available, dot_kind, takes_shapes

    if not (takes_shapes(q_shape, q_dtype, k_shape, kv_dtype, v_shape, kv_dtype) and available()):
        return None
    rows = (q_shape[1] // k_shape[1]) * q_shape[2]
    if dot_kind(rows, k_shape[-1], v_shape[-1], kv_dtype, q_dtype) == "amx":
        return _TVM_AUTO_MIN_BYTES_AMX
    return _TVM_AUTO_MIN_BYTES[kv_dtype]


def _tvm_min_bytes(query, key, value) -> Optional[int]:
    """_tvm_plan for these tensors (None off the CPU, for a non-contiguous cache, or mixed K/V dtypes)."""
    if (query.device.type != "cpu" or key.dtype != value.dtype or not key.is_contiguous()
            or not value.is_contiguous()):
        return None
    return _tvm_plan(tuple(query.shape), query.dtype, tuple(key.shape), key.dtype, tuple(value.shape))


def _check(query, key, value, attn_mask, sinks) -> tuple[int, int, int, int, int]:
    """(B, Hq, Hkv, S, L) after checking the shapes fit together."""
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError("moecc::gqa_decode_attention wants query [B,Hq,S,D], key [B,Hkv,L,D], value [B,Hkv,L,Dv]; "
                         f"got {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
    b, hq, s, d = query.shape
    hkv, l = key.shape[1], key.shape[2]
    if (key.shape[0] != b or tuple(value.shape[:3]) != (b, hkv, l) or key.shape[3] != d
            or hkv == 0 or hq % hkv):
        raise ValueError(f"moecc::gqa_decode_attention: query {tuple(query.shape)}, key {tuple(key.shape)} and "
                         f"value {tuple(value.shape)} do not fit (same B and D, Hq a multiple of Hkv, same L)")
    if sinks is not None and tuple(sinks.shape) != (hq,):
        raise ValueError(f"moecc::gqa_decode_attention: sinks must be [Hq={hq}], got {tuple(sinks.shape)}")
    if attn_mask is not None and (attn_mask.dim() > 4 or attn_mask.shape[-1] != l):
        raise ValueError(f"moecc::gqa_decode_attention: attn_mask {tuple(attn_mask.shape)} must broadcast to "
                         f"[B, Hq, S, L={l}]")
    return b, hq, hkv, s, l


def _mask4(attn_mask: Optional[torch.Tensor], is_causal: bool, s: int, l: int, device) -> Optional[torch.Tensor]:
    """The mask as a 4-D tensor [B|1, Hq|1, S|1, L] (bool or additive float), or None."""
    if is_causal:
        if attn_mask is not None:
            raise ValueError("moecc::gqa_decode_attention: give attn_mask or is_causal, not both (as SDPA)")
        attn_mask = torch.ones(s, l, dtype=torch.bool, device=device).tril()  # SDPA: top-left aligned
    if attn_mask is None:
        return None
    return attn_mask.view((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))


def _visible(mask: torch.Tensor, strict: bool) -> torch.Tensor:
    """Bool of the slots a query sees. strict: float slots at finfo.min count as hidden too."""
    if mask.dtype == torch.bool:
        return mask
    if strict:
        return mask > torch.finfo(mask.dtype).min
    return mask > float("-inf")


def live_range(mask: Optional[torch.Tensor], has_sinks: bool, l: int) -> tuple[int, int]:
    """[lo, hi): the cache slots any query may see, by one host read of the 4-D mask.

    Exact: slots outside carry -inf / False (or finfo.min where every row still sees a slot
    or a sink), so their softmax weight is exactly zero."""
    if mask is None:
        return 0, l
    seen = _visible(mask, strict=True)
    if mask.dtype != torch.bool and not has_sinks and not bool(seen.any(dim=-1).all()):
        seen = _visible(mask, strict=False)  # a row sees nothing: SDPA averages; do not cut those slots
    cols = seen.reshape(-1, l).any(dim=0)  # [L] bool
    if cols.device.type == "cpu":  # one numpy call instead of nonzero + two indexed reads (~40 us)
        idx = np.flatnonzero(cols.numpy())
    else:
        idx = cols.nonzero().flatten().tolist()
    if len(idx) == 0:
        return 0, min(l, 1)  # nothing visible anywhere: every row gives zeros
    return int(idx[0]), int(idx[-1]) + 1


def _additive(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """fp32 additive mask (0 / -inf for bool masks)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(~mask, float("-inf"))
    return mask.float()


def _bias_rows(mask: Optional[torch.Tensor], lo: int, hi: int, b: int, s: int) -> Optional[torch.Tensor]:
    """The TVM kernel's additive fp32 mask [B, S, hi - lo] of a head-shared mask's live
    slots, or None when it adds nothing (every slot visible: batch-1 decode)."""
    if mask is None:
        return None
    cut = mask[..., lo:hi]  # [B|1, 1, S|1, n]
    if bool(cut.all()) if cut.dtype == torch.bool else not bool(cut.any()):
        return None
    return _additive(cut).expand(b, 1, s, hi - lo).reshape(b, s, hi - lo)


def _group_mask(mask: Optional[torch.Tensor], hq: int, hkv: int, s: int) -> Optional[torch.Tensor]:
    """[Bm, Hm, S|1, L] -> [Bm, Hkv|1, G*S, L]: rows in the regrouped query's (g, s) order."""
    if mask is None:
        return None
    g = hq // hkv
    bm, hm, sm, l = mask.shape
    if hm == 1 and (sm == 1 or g == 1):
        return mask  # broadcasts over the G rows of each group as it is
    mask = mask.expand(bm, hm, s, l)
    if hm == 1:
        return mask.unsqueeze(2).expand(bm, 1, g, s, l).reshape(bm, 1, g * s, l)
    return mask.expand(bm, hq, s, l).reshape(bm, hkv, g * s, l)


def _sink_factor(lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """sum(exp(s)) / (sum(exp(s)) + exp(sink)) = sigmoid(lse - sink); 0 for empty rows."""
    factor = torch.sigmoid(lse - sinks.float().view(1, -1, 1))  # [B, Hq, S]
    return torch.where(torch.isneginf(lse), torch.zeros_like(factor), factor)


def _flash_cpu(query, key, value, mask, sinks, scale) -> torch.Tensor:
    """torch's flash-attention CPU kernel over the regrouped query [B, Hkv, G*S, D]."""
    b, hq, s, d = query.shape
    hkv, dv = key.shape[1], value.shape[3]
    qg = query.reshape(b, hkv, (hq // hkv) * s, d)  # [B, Hkv, G*S, D]: rows (g, s), a view
    additive = _group_mask(_additive(mask), hq, hkv, s)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        qg, key, value, attn_mask=additive, scale=scale)  # [B, Hkv, G*S, Dv], [B, Hkv, G*S]
    out = out.reshape(b, hq, s, dv)
    if sinks is None:
        return out
    # The kernel gives 0 for a row with no visible slot (and lse 0): the factor keeps it 0.
    return (out.float() * _sink_factor(lse.reshape(b, hq, s), sinks).unsqueeze(-1)).to(query.dtype)


def _grouped_fp32(query, key, value, mask, sinks, scale) -> torch.Tensor:
    """Plain torch, fp32: scores over the regrouped query, softmax (+ sinks), context."""
    b, hq, s, d = query.shape
    hkv, l, dv = key.shape[1], key.shape[2], value.shape[3]
    g = hq // hkv
    qg = query.reshape(b, hkv, g * s, d).float()  # [B, Hkv, G*S, D]
    scores = torch.matmul(qg, key.float().transpose(2, 3)) * scale  # [B, Hkv, G*S, L]
    scores = scores.view(b, hq, s, l)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    row_max = scores.amax(dim=-1, keepdim=True)  # [B, Hq, S, 1]
    if sinks is not None:
        row_max = torch.maximum(row_max, sinks.float().view(1, hq, 1, 1))
    row_max = torch.where(torch.isneginf(row_max), torch.zeros_like(row_max), row_max)  # empty rows
    e = torch.exp(scores - row_max)
    denom = e.sum(dim=-1, keepdim=True)
    if sinks is not None:
        denom = denom + torch.exp(sinks.float().view(1, hq, 1, 1) - row_max)
    p = torch.where(denom > 0, e / denom, torch.zeros_like(e))  # [B, Hq, S, L]
    ctx = torch.matmul(p.view(b, hkv, g * s, l), value.float())  # [B, Hkv, G*S, Dv]
    return ctx.view(b, hq, s, dv).to(query.dtype)


def gqa_decode_attention_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                   attn_mask: Optional[torch.Tensor], sinks: Optional[torch.Tensor],
                                   scale: float, is_causal: bool = False, trim: Optional[bool] = None,
                                   kernel: str = "auto") -> torch.Tensor:
    """The op's implementation. `trim` (default: on the CPU) cuts the cache to the live slot
    range first (a host read); `kernel` "tvm" / "flash" / "grouped" forces a path (tests,
    bench; "auto" takes the first that fits, see the module docstring)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    b, hq, hkv, s, l = _check(query, key, value, attn_mask, sinks)
    mask = _mask4(attn_mask, is_causal, s, l, query.device)
    on_cpu = query.device.type == "cpu"
    trimmed = trim if trim is not None else on_cpu
    lo, hi = live_range(mask, sinks is not None, l) if trimmed else (0, l)
    tvm_min_bytes = _tvm_min_bytes(query, key, value) if mask is None or mask.shape[1] == 1 else None
    tvm_ok = tvm_min_bytes is not None
    tvm_auto = tvm_ok and 2 * b * hkv * (hi - lo) * key.shape[-1] * key.element_size() >= tvm_min_bytes
    if kernel == "tvm" and not tvm_ok:
        raise ValueError("the TVM kernel needs TVM installed, CPU tensors, G*S in (2, 4, 8, 16), D and Dv "
                         "multiples of 16 (<= 256), a contiguous cache and a mask shared by the heads")
    if kernel == "tvm" or (kernel == "auto" and tvm_auto):
        from moecc.backends.tvm.attention import gqa_decode_tvm

        return gqa_decode_tvm(query, key, value, _bias_rows(mask, lo, hi, b, s), lo, hi - lo, sinks, scale)
    if trimmed:
        if (lo, hi) != (0, l):
            key, value = key[:, :, lo:hi], value[:, :, lo:hi]  # views of the cache, no copy
            mask = mask[..., lo:hi] if mask is not None else None
        if mask is not None and mask.dtype == torch.bool and bool(mask.all()):
            mask = None  # every kept slot visible (batch 1 decode): the kernel needs no mask
    flash_ok = (on_cpu and query.dtype in _FLASH_DTYPES and key.dtype == value.dtype == query.dtype
                and value.shape[-1] == query.shape[-1])
    if kernel == "flash" and not flash_ok:
        raise ValueError("the flash CPU kernel needs CPU tensors of one float dtype and equal K/V widths")
    if kernel == "flash" or (kernel == "auto" and flash_ok):
        return _flash_cpu(query, key, value, mask, sinks, scale)
    return _grouped_fp32(query, key, value, mask, sinks, scale)


def _op(query, key, value, attn_mask, sinks, scale, is_causal):
    return gqa_decode_attention_reference(query, key, value, attn_mask, sinks, scale, is_causal)


def _fake(query, key, value, attn_mask, sinks, scale, is_causal):
    b, hq, s, _ = query.shape
    return query.new_empty(b, hq, s, value.shape[-1])


_LIB.impl("gqa_decode_attention", _op, "CompositeExplicitAutograd")
torch.library.register_fake("moecc::gqa_decode_attention", _fake, lib=_LIB)
