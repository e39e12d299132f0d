"""Ahead-of-time cubins for TVM's CUDA modules, and serving them at first use.

TVM 0.27's CUDA module carries CUDA C source; the first call on a GPU compiles it through
the global function `tvm_callback_cuda_compile(code) -> bytes` (TVM's own, in
`tvm.support.nvcc`, needs the full compiler package and nvrtc or nvcc). moecc instead
compiles the source here, at build or export time, with nvcc for the exact arch
(`compile_cubin`), stores the cubin beside the .so, and at load time installs a callback
(`serve_cubins`) that answers with the stored cubin for that source (matched by SHA-256),
falling back to whatever callback was registered before. So a runtime-only machine
(apache-tvm-ffi + libtvm_runtime + libtvm_runtime_cuda, no nvcc) runs the kernels.

The registry of known cubins is process-wide by nature (TVM looks the callback up by
name); `serve_cubins` only ever adds entries, and imports nothing from tvm.
"""

from __future__ import annotations

import hashlib
import threading

CALLBACK = "tvm_callback_cuda_compile"
ELF_MAGIC = b"\x7fELF"

_lock = threading.Lock()
_cubins: dict[str, bytes] = {}  # sha256(source) -> cubin
_fallback = None  # the callback registered before ours, if any
_installed = False


def source_digest(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()


def cuda_source(module) -> str:
    """The CUDA C source of a built (tvm.compile) or loaded module."""
    mod = getattr(module, "mod", module)  # tvm.runtime.Executable wraps the Module
    for sub in mod.imports:
        if sub.kind == "cuda":
            return str(sub.inspect_source(""))
    raise ValueError("module has no imported CUDA module")


def compile_cubin(source: str, arch: int) -> bytes:
    """nvcc the source into a cubin for sm_<arch> (no GPU needed; nvcc on PATH)."""
    import tvm
    from tvm.support import nvcc

    with tvm.target.Target({"kind": "cuda", "arch": f"sm_{arch}"}, host={"kind": "llvm"}):
        cubin = bytes(nvcc.compile_cuda(source, target_format="cubin", arch=f"sm_{arch}", compiler="nvcc"))
    if not cubin.startswith(ELF_MAGIC):
        raise RuntimeError(f"nvcc did not produce a cubin for sm_{arch}")
    return cubin


def serve_cubins(entries: dict[str, bytes]) -> None:
    """Make TVM's CUDA modules load these cubins (source digest -> cubin) at first use."""
    import tvm_ffi

    global _fallback, _installed
    with _lock:
        _cubins.update(entries)
        if _installed:
            return
        try:  # register TVM's own callback first (it becomes our fallback): importing
            import tvm.support.nvcc  # noqa: F401  it after our override would collide
        except ImportError:  # runtime-only machine: no compiler package
            pass
        _fallback = tvm_ffi.get_global_func(CALLBACK, allow_missing=True)
        tvm_ffi.register_global_func(CALLBACK, _compile_from_registry, override=True)
        _installed = True


def _compile_from_registry(code, *rest):
    cubin = _cubins.get(source_digest(str(code)))
    if cubin is not None:
        return cubin
    if _fallback is not None:
        return _fallback(code, *rest)
    raise RuntimeError("moecc: no ahead-of-time cubin for this TVM CUDA module and no CUDA "
                       "compiler callback; rebuild it with `moecc export --target cuda --arch <sm>`")
