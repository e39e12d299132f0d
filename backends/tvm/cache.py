"""Compiled-module caches: on disk across processes, in memory within one.

Disk: one shared library per KernelKey under $MOECC_CACHE_DIR/tvm (default
~/.cache/moecc/tvm), named `<short name>-<digest>.so` (+ `.cubin` for cuda keys); the
digest covers every key field and the TVM version, so a TVM upgrade or a config change
never loads a stale module. Writes are atomic (write a temporary file in the same folder,
then os.replace; the cubin before the .so, whose presence means "complete"), so
concurrent processes at worst both build and one wins. In memory: `load_kernels` is
memoised per key, so the second call of a layer costs a dict lookup.
"""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, NamedTuple

from moecc.backends.tvm.key import KernelKey

ENTRY_POINTS = ("moe_gate_up_act", "moe_down_weighted", "moe_combine")
OPTIONAL_ENTRY_POINTS = ("moe_quantize_x", "moe_quantize_act")  # int8 activations


class KernelSet(NamedTuple):
    gate_up_act: Any  # tvm_ffi.Function, see kernels_llvm.py for the signatures
    down_weighted: Any
    combine: Any
    module: Any  # keeps the library loaded
    path: str  # where the module lives on disk
    quantize_x: Any = None  # int8-activation modules only (kernels_llvm_vnni.py)
    quantize_act: Any = None


def cache_dir() -> Path:
    root = os.environ.get("MOECC_CACHE_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "moecc"
    return base / "tvm"


def module_path(key: KernelKey, folder: Path | None = None) -> Path:
    import tvm

    return (folder or cache_dir()) / f"{key.short_name()}-{key.digest(tvm.__version__)}.so"


def cubin_path(so_path: Path) -> Path:
    return so_path.with_suffix(".cubin")


def kernel_set(module, path: str) -> KernelSet:
    optional = [module[name] if module.implements_function(name) else None for name in OPTIONAL_ENTRY_POINTS]
    return KernelSet(*(module[name] for name in ENTRY_POINTS), module, path, *optional)


def open_module(path: Path, load: Callable[[str], Any]) -> KernelSet:
    """Load a stored module; for cuda, make its stored cubin serve the first-use compile."""
    from moecc.backends.tvm.openmp_pool import use_torch_threads

    module = load(str(path))
    use_torch_threads(path)  # llvm modules: parallel loops on torch's OpenMP threads
    cubin = cubin_path(path)
    if cubin.exists():
        from moecc.backends.tvm.cuda_binaries import cuda_source, serve_cubins, source_digest

        serve_cubins({source_digest(cuda_source(module)): cubin.read_bytes()})
    return kernel_set(module, str(path))


def store_module(key: KernelKey, path: Path) -> None:
    """Build `key` and write its .so (and .cubin) atomically at `path`."""
    from moecc.backends.tvm.build import build_module

    built = build_module(key)
    if built.cubin is not None:
        write_atomic(cubin_path(path), lambda tmp: Path(tmp).write_bytes(built.cubin))
    write_atomic(path, built.module.export_library)


@functools.lru_cache(maxsize=64)
def load_kernels(key: KernelKey) -> KernelSet:
    """The kernels for `key`: from memory, else from the disk cache, else built and stored."""
    import tvm

    from moecc.backends.tvm.runtime_libs import load_runtime

    path = module_path(key)
    if not path.exists():
        store_module(key, path)
    if key.target.kind == "cuda":
        load_runtime(cuda=True)  # registers TVM's CUDA module loader
    return open_module(path, tvm.runtime.load_module)


def write_atomic(path: Path, write: Callable[[str], Any]) -> None:
    """Run write(tmp) on a temporary file beside `path`, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
