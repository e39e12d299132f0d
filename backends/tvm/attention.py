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
    return (query.device.type == "cpu" and key.is_contiguous() and value.is_contiguous()
            and takes_shapes(tuple(query.shape), query.dtype, tuple(key.shape), key.dtype, tuple(value.shape),
                             value.dtype))


def takes_shapes(q_shape: tuple, q_dtype: torch.dtype, k_shape: tuple, k_dtype: torch.dtype, v_shape: tuple,
                 v_dtype: torch.dtype) -> bool:
    """`takes` without the device and layout checks: the dtypes and widths it is written for."""
    hq, s, d = q_shape[1], q_shape[2], q_shape[3]
    hkv, dv = k_shape[1], v_shape[3]
    return (k_dtype in _DTYPES and k_dtype == v_dtype and q_dtype in _DTYPES
            and supported((hq // hkv) * s, d, dv))


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
        target = make_target(TargetSpec("llvm", mcpu=key.mcpu))
        if key.dot in ("bf16", "amx"):  # LLVM's CPU name for this machine may lack them (checked in cpu_has)
            target = tvm.target.Target({**target.export(), "mattr": ["+avx512bf16", "+amx-tile", "+amx-bf16"]
                                        if key.dot == "amx" else ["+avx512bf16"]})
        built = tvm.compile(attention_module(key), target=target)
        write_atomic(path, built.export_library)
    module = tvm.runtime.load_module(str(path))
    use_torch_threads(path)
    return {"module": module, **{name: module[name] for name in ("gqa_decode_partial", "gqa_decode_combine")}}


@functools.lru_cache(maxsize=4)
def cpu_has(feature: str) -> bool:
    """Whether /proc/cpuinfo lists `feature` ("avx512_bf16", "amx_bf16") and TVM's LLVM
    types the bf16 intrinsics' operands as bfloat vectors (LLVM >= 17); for "amx_bf16"
    also that the kernel granted this process the AMX tile state (arch_prctl, once)."""
    try:
        with open("/proc/cpuinfo") as f:
            has = any(line.startswith("flags") and feature in line.split(":", 1)[-1].split() for line in f)
    except OSError:  # not Linux: cannot tell without running the instruction
        return False
    if not has:
        return False
    from tvm.target import codegen

    if codegen.llvm_version_major() < 17:
        return False
    return _amx_permission() if feature == "amx_bf16" else True


def _amx_permission() -> bool:
    """arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA): Linux >= 5.16 gives a process the
    AMX tile state only on request (process-wide; torch's oneDNN asks the same way)."""
    import ctypes
    import platform

    if platform.machine() != "x86_64":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(158, 0x1023, 18) == 0  # SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XTILEDATA
    except (OSError, AttributeError):
        return False


def dot_kind(rows: int, d: int, dv: int, dtype: torch.dtype, query_dtype: torch.dtype) -> str:
    """How the kernel multiplies: "amx" (AMX tiles) or "bf16" (`vdpbf16ps`) for a bf16
    query and cache where the CPU has them and the widths fit; "fp32" (widen, fp32 FMAs)
    otherwise. A float32 query over a bf16 cache stays "fp32": rounding the query to bf16
    would lose precision it has."""
    from moecc.backends.tvm.kernels_llvm_attention_amx import supported as amx_supported
    from moecc.backends.tvm.kernels_llvm_attention_bf16 import supported as bf16_supported

    if dtype == query_dtype == torch.bfloat16:
        if amx_supported(rows, d, dv) and cpu_has("amx_bf16"):
            return "amx"
        if bf16_supported(rows, d, dv) and cpu_has("avx512_bf16"):
            return "bf16"
    return "fp32"


def kernel_key(rows: int, s: int, d: int, dv: int, dtype: torch.dtype, out_dtype: torch.dtype,
               dot: str = "fp32") -> AttentionKey:
    from moecc.backends.tvm.runtime import target_for

    return AttentionKey(rows=rows, s=s, d=d, dv=dv, dtype=_DTYPES[dtype], mcpu=target_for("cpu").mcpu,
                        out_dtype=_DTYPES[out_dtype], block=block_slots(rows), dot=dot)


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
    dot = dot_kind(rows, d, dv, key.dtype, query.dtype)
    kernels = _load(kernel_key(rows, s, d, dv, key.dtype, query.dtype, dot))
    if bias is None:
        bias = torch.zeros(b, s, n, dtype=torch.float32)
    bias = aligned(bias.contiguous())
    chunk = chunk_slots(n, b * hkv, torch.get_num_threads())
    nc = -(-n // chunk)
    po = torch.empty(b, hkv, nc, rows, dv, dtype=torch.float32)
    pm = torch.empty(b, hkv, nc, rows, dtype=torch.float32)
    pl = torch.empty(b, hkv, nc, rows, dtype=torch.float32)
    if dot == "amx":  # the query in AMX's B layout: [B, Hkv, D/32, 16, R] pairs (q[r, 32 dc + 2p], q[r, 32 dc + 2p + 1])
        from moecc.backends.tvm.kernels_llvm_attention_amx import workspace_int32

        if not cpu_has("amx_bf16"):  # also asks for the tile state: without it the first tile op faults
            raise RuntimeError("the AMX attention kernel needs AMX-BF16 and the process's AMX permission")
        qt = (query.reshape(b, hkv, rows, d // 32, 16, 2).permute(0, 1, 3, 4, 2, 5).contiguous()
              .view(torch.int32).view(b, hkv, d // 32, 16, rows))
        ws = torch.empty(b * hkv * nc, workspace_int32(d, dv), dtype=torch.int32)
        kernels["gqa_decode_partial"](qt, key.view(torch.int32), value.view(torch.int32), bias, lo, n, chunk,
                                      scale, po, pm, pl, ws)
    elif dot == "bf16":  # bf16 pairs as int32 lanes (the kernel's operand layout); the scale goes on the scores
        qp = query.reshape(b, hkv, rows, d).contiguous().view(torch.int32)  # [B, Hkv, R, D/2] rows (g, s)
        kernels["gqa_decode_partial"](qp, key.view(torch.int32), value.view(torch.int32), bias, lo, n, chunk,
                                      scale, po, pm, pl)
    else:
        qs = (query.float() * scale).reshape(b, hkv, rows, d).contiguous()  # [B, Hkv, R, D] rows (g, s)
        kernels["gqa_decode_partial"](qs, key, value, bias, lo, n, chunk, po, pm, pl)
    if sinks is None:
        sink_rows = torch.full((hkv, rows), float("-inf"))
    else:  # [Hq] -> [Hkv, G, S] -> rows g*S + s
        sink_rows = sinks.float().view(hkv, rows // s, 1).expand(hkv, rows // s, s).reshape(hkv, rows).contiguous()
    out = torch.empty(b, hkv, rows, dv, dtype=query.dtype)
    kernels["gqa_decode_combine"](po, pm, pl, sink_rows, out)
    return out.view(b, hq, s, dv)  # rows r = g*S + s: heads hkv*G + g
