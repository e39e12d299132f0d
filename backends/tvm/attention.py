"""Host side of the TVM GQA decode kernel (kernels_llvm_attention.py): build, cache, call, combine.

    gqa_decode_tvm(query [B, Hq, S, D], key [B, Hkv, Lmax, D], value [B, Hkv, Lmax, Dv],
                   bias [B, S, n] fp32 | None, lo, n, sinks [Hq] | None, scale) -> [B, Hq, S, Dv]

Attends over the cache slots [lo, lo + n) in place (no copy of K/V, the full static cache
tensors go to the kernel with the offset), bias the additive mask of those slots (shared
by all heads; None: every slot visible). The kernel writes per-chunk partial outputs; a
second one joins them (and GPT-OSS's sinks) into the output.

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
def _load(key: AttentionKey) -> dict:
    """{name: function} of `key`'s module (the module stays loaded with them): from memory,
    else the disk cache, else built and stored."""
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
    return {"module": module, **{name: module[name] for name in ("gqa_decode_partial", "gqa_decode_combine")}}


def kernel_key(rows: int, s: int, d: int, dv: int, dtype: torch.dtype, out_dtype: torch.dtype) -> AttentionKey:
    from moecc.backends.tvm.runtime import target_for

    return AttentionKey(rows=rows, s=s, d=d, dv=dv, dtype=_DTYPES[dtype], mcpu=target_for("cpu").mcpu,
                        out_dtype=_DTYPES[out_dtype], block=block_slots(rows))


def chunk_slots(n: int, units: int, threads: int) -> int:
    """Slots per task: enough tasks (>= 4 per thread) to balance, each >= MIN_CHUNK slots."""
    want = max(1, -(-4 * threads // units))  # chunks per (b, h)
    return max(MIN_CHUNK, -(-n // want))


def gqa_decode_tvm(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: Optional[torch.Tensor],
                   lo: int, n: int, sinks: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """The op over slots [lo, lo + n) with the TVM kernel (see the module docstring)."""
    from moecc.backends.tvm.runtime import aligned

    b, hq, s, d = query.shape
    hkv, dv = key.shape[1], value.shape[3]
    rows = (hq // hkv) * s
    kernels = _load(kernel_key(rows, s, d, dv, key.dtype, query.dtype))
    qs = (query.float() * scale).reshape(b, hkv, rows, d).contiguous()  # [B, Hkv, R, D] rows (g, s)
    if bias is None:
        bias = torch.zeros(b, s, n, dtype=torch.float32)
    bias = aligned(bias.contiguous())
    chunk = chunk_slots(n, b * hkv, torch.get_num_threads())
    nc = -(-n // chunk)
    po = torch.empty(b, hkv, nc, rows, dv, dtype=torch.float32)
    pm = torch.empty(b, hkv, nc, rows, dtype=torch.float32)
    pl = torch.empty(b, hkv, nc, rows, dtype=torch.float32)
    kernels["gqa_decode_partial"](qs, key, value, bias, lo, n, chunk, po, pm, pl)
    if sinks is None:
        sink_rows = torch.full((hkv, rows), float("-inf"))
    else:  # [Hq] -> [Hkv, G, S] -> rows g*S + s
        sink_rows = sinks.float().view(hkv, rows // s, 1).expand(hkv, rows // s, s).reshape(hkv, rows).contiguous()
    out = torch.empty(b, hkv, rows, dv, dtype=query.dtype)
    kernels["gqa_decode_combine"](po, pm, pl, sink_rows, out)
    return out.view(b, hq, s, dv)  # rows r = g*S + s: heads hkv*G + g
