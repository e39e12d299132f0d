"""Host side of the TVM GQA decode kernel (kernels_llvm_attention.py): build, cache, call, combine.

    gqa_decode_tvm(query [B, Hq, S, D], key [B, Hkv, Lmax, D], value [B, Hkv, Lmax, Dv],
                   bias [B, S, n] fp32 | None, lo, n, sinks [Hq] | None, scale) -> [B, Hq, S, Dv]

Attends over the cache slots [lo, lo + n) in place (no copy of K/V, the full static cache
tensors go to the kernel with the offset), bias the additive mask of those slots (shared
by all heads; None: every slot visible). The kernel writes per-chunk partial outputs; the
combine here joins them (and GPT-OSS's sinks) with a few torch ops over [B, Hkv, NC, R, Dv].

Modules are built once per AttentionKey and stored like the MoE kernels
(cache.cache_dir(), atomic writes, the kernel file's hash in the name), and their parallel
loop runs on torch's OpenMP threads (openmp_pool.py). `available()` says whether this
process can use it (tvm importable, a CPU target); moecc/gqa.py falls back otherwise.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from moecc.backends.tvm.kernels_llvm_attention import AttentionKey, block_slots, supported

_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
MIN_CHUNK = 256  # slots per task at least: below this the per-task setup shows


def available() -> bool:
    from moecc.backends.tvm.runtime import tvm_importable

    return tvm_importable()


def takes(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether the kernel is written for these tensors (CPU, one supported dtype, contiguous cache)."""
    b, hq, s, d = query.shape
    hkv, dv = key.shape[1], value.shape[3]
    return (query.device.type == "cpu" and key.dtype in _DTYPES and key.dtype == value.dtype
            and query.dtype in _DTYPES and supported((hq // hkv) * s, d, dv)
            and key.is_contiguous() and value.is_contiguous())


@functools.lru_cache(maxsize=32)
def _load(key: AttentionKey):
    """The kernel function for `key`: from memory, else the disk cache, else built and stored."""
    import tvm

    from moecc.backends.tvm.build import make_target
    from moecc.backends.tvm.cache import cache_dir, write_atomic
    from moecc.backends.tvm.key import TargetSpec
    from moecc.backends.tvm.kernels_llvm_attention import attention_module
    from moecc.backends.tvm.openmp_pool import use_torch_threads
    from moecc.backends.tvm.runtime import use_torch_thread_count

    use_torch_thread_count()  # TVM's own pool, where the OpenMP launcher is unavailable
    path = cache_dir() / f"{key.short_name()}-{key.digest(tvm.__version__)}.so"
    if not path.exists():
        built = tvm.compile(attention_module(key), target=make_target(TargetSpec("llvm", mcpu=key.mcpu)))
        write_atomic(path, built.export_library)
    module = tvm.runtime.load_module(str(path))
    use_torch_threads(path)
    return module["gqa_decode_partial"], module


def kernel_key(rows: int, s: int, d: int, dv: int, dtype: torch.dtype) -> AttentionKey:
    from moecc.backends.tvm.runtime import target_for

    return AttentionKey(rows=rows, s=s, d=d, dv=dv, dtype=_DTYPES[dtype], mcpu=target_for("cpu").mcpu,
                        block=block_slots(rows))


def chunk_slots(n: int, units: int, threads: int) -> int:
    """Slots per task: enough tasks (>= 4 per thread) to balance, each >= MIN_CHUNK slots."""
    want = max(1, -(-4 * threads // units))  # chunks per (b, h)
    return max(MIN_CHUNK, -(-n // want))


def combine(po: torch.Tensor, pm: torch.Tensor, pl: torch.Tensor, sinks: Optional[torch.Tensor],
            hq: int, s: int, dtype: torch.dtype) -> torch.Tensor:
    """Join the chunks: po [B, Hkv, NC, R, Dv], pm / pl [B, Hkv, NC, R] -> [B, Hq, S, Dv]."""
    b, hkv, _, r, dv = po.shape
    m = pm.amax(dim=2)  # [B, Hkv, R]
    if sinks is not None:
        sink_rows = sinks.float().view(hkv, r // s, 1).expand(hkv, r // s, s).reshape(1, hkv, r)
        m = torch.maximum(m, sink_rows)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    w = torch.exp(pm - m.unsqueeze(2))  # [B, Hkv, NC, R]; 0 for chunks that saw nothing
    total = (pl * w).sum(dim=2)  # [B, Hkv, R]
    if sinks is not None:
        total = total + torch.exp(sink_rows - m)
    out = torch.einsum("bhcr,bhcrv->bhrv", w, po) if po.shape[2] > 1 else po[:, :, 0] * w[:, :, 0, :, None]
    # rows that saw nothing (total 0) give zeros; a NaN total (NaN in the cache) stays NaN
    out = torch.where(total.unsqueeze(-1) == 0, torch.zeros_like(out), out / total.unsqueeze(-1))
    return out.view(b, hq, s, dv).to(dtype)  # rows r = g*S + s: heads hkv*G + g


def gqa_decode_tvm(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: Optional[torch.Tensor],
                   lo: int, n: int, sinks: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """The op over slots [lo, lo + n) with the TVM kernel (see the module docstring)."""
    from moecc.backends.tvm.runtime import aligned

    b, hq, s, d = query.shape
    hkv, dv = key.shape[1], value.shape[3]
    rows = (hq // hkv) * s
    fn, _ = _load(kernel_key(rows, s, d, dv, key.dtype))
    qs = (query.float() * scale).reshape(b, hkv, rows, d).contiguous()  # [B, Hkv, R, D] rows (g, s)
    if bias is None:
        bias = torch.zeros(b, s, n, dtype=torch.float32)
    bias = aligned(bias.contiguous())
    chunk = chunk_slots(n, b * hkv, torch.get_num_threads())
    nc = -(-n // chunk)
    po = torch.empty(b, hkv, nc, rows, dv, dtype=torch.float32)
    pm = torch.empty(b, hkv, nc, rows, dtype=torch.float32)
    pl = torch.empty(b, hkv, nc, rows, dtype=torch.float32)
    fn(qs, key, value, bias, lo, n, chunk, po, pm, pl)
    return combine(po, pm, pl, sinks, hq, s, query.dtype)
