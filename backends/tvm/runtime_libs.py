"""Loading the TVM runtime libraries without the TVM compiler package.

An exported module needs, at run time, only `tvm_ffi` (the apache-tvm-ffi wheel), the
symbols of libtvm_runtime.so (thread pool, workspace allocation) and, for CUDA modules,
libtvm_runtime_cuda.so (registers the CUDA module loader; links libcudart.so.13 and the
driver's libcuda.so.1). `load_runtime(lib_dir, cuda)` loads them, in that order, from:
    lib_dir (argument), else $MOECC_TVM_RUNTIME_LIB, else the installed `tvm` package's
    lib/ folder (found without importing tvm).
If the full `tvm` package is already imported, libtvm_runtime is already loaded.
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import os
import sys
from pathlib import Path

_loaded: dict[str, ctypes.CDLL] = {}  # keeps the handles (and their registrations) alive


def find_lib_dir(lib_dir: str | os.PathLike | None = None) -> Path:
    candidates = [lib_dir, os.environ.get("MOECC_TVM_RUNTIME_LIB")]
    spec = importlib.util.find_spec("tvm")
    if spec is not None and spec.origin:
        candidates.append(Path(spec.origin).parent / "lib")
    for c in candidates:
        if c and (Path(c) / "libtvm_runtime.so").exists():
            return Path(c)
    raise FileNotFoundError("libtvm_runtime.so not found: pass lib_dir, set MOECC_TVM_RUNTIME_LIB, "
                            "or install apache-tvm")


def load_runtime(lib_dir: str | os.PathLike | None = None, cuda: bool = False) -> Path:
    """Load libtvm_runtime (and libtvm_runtime_cuda); returns the folder used."""
    import tvm_ffi  # noqa: F401  loads libtvm_ffi.so, which the runtime links against

    folder = find_lib_dir(lib_dir)
    if "tvm" not in sys.modules and "runtime" not in _loaded:
        _loaded["runtime"] = ctypes.CDLL(str(folder / "libtvm_runtime.so"), ctypes.RTLD_GLOBAL)
    if cuda and "cuda" not in _loaded:
        _preload_cudart()
        _loaded["cuda"] = ctypes.CDLL(str(folder / "libtvm_runtime_cuda.so"), ctypes.RTLD_GLOBAL)
    return folder


def _preload_cudart() -> None:
    """libtvm_runtime_cuda links libcudart.so.13: use the system's, else the one that
    ships with torch's CUDA wheels (site-packages/nvidia/.../lib)."""
    try:
        ctypes.CDLL("libcudart.so.13", ctypes.RTLD_GLOBAL)
        return
    except OSError:
        pass
    for root in sys.path:
        for path in glob.glob(os.path.join(root, "nvidia", "*", "lib", "libcudart.so.13")) + glob.glob(
                os.path.join(root, "nvidia", "cuda_runtime", "lib", "libcudart.so.13")):
            ctypes.CDLL(path, ctypes.RTLD_GLOBAL)
            return
