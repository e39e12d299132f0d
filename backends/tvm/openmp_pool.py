"""Run the TVM CPU kernels' parallel loops on torch's own OpenMP threads.

Why: TVM's runtime has its own thread pool. Inside a compiled model the MoE op runs
between torch ops, and torch's OpenMP workers (GNU libgomp) spin-wait after every parallel
region before they sleep: up to ~300,000 `pause` iterations, which is 10-20 ms on recent
Intel cores (a `pause` costs ~140 cycles there). A TVM kernel started in that window shares
the cores with spinning torch threads. Measured on the 2-core Xeon build machine
(2026-12-02, Qwen3-30B-A3B layer, M = 1, fp32): 9.9 ms per call on TVM's pool, 5.7 ms on
torch's OpenMP threads (docs/backends.md). With one pool there is no hand-over at all:
the threads torch just used pick up the TVM work.

How: a TVM `llvm` shared library calls its parallel loops through a function pointer it
exports, `__TVMBackendParallelLaunch`, which TVM's loader points at its own pool. This
module compiles (once, cached on disk like the kernels) a 20-line C launcher that runs
`flambda(task_id, env, cdata)` under `#pragma omp parallel`, linked against the very
OpenMP runtime file torch has loaded (found in /proc/self/maps, so the launcher binds to
the same pool even when torch ships a renamed libgomp), and repoints the module's pointer
at it after loading.

Assumptions and fallbacks (each logged once; the kernels then keep TVM's pool, which is
correct, only slower in a model): Linux (/proc/self/maps), a C compiler (`$CC`, else
`cc`; TVM's own `export_library` needs one too), torch built with OpenMP. The kernels
use no `TVMBackendParallelBarrier` (checked: the pointer is only replaced in modules
that do not import it). MOECC_TVM_THREAD_POOL=tvm keeps TVM's pool (for comparisons).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
from pathlib import Path

log = logging.getLogger("moecc.tvm")

LAUNCH_SYMBOL = "__TVMBackendParallelLaunch"
BARRIER_SYMBOL = "__TVMBackendParallelBarrier"

# TVM's C ABI (tvm/runtime/c_backend_api.h): the env is read by the lambda to split its
# loop into num_task contiguous chunks; sync_handle is only used by barriers.
_LAUNCHER_SOURCE = r"""
#include <omp.h>
typedef struct { void* sync_handle; int num_task; } TVMParallelGroupEnv;
typedef int (*FTVMParallelLambda)(int task_id, TVMParallelGroupEnv* penv, void* cdata);

int moecc_omp_parallel_launch(FTVMParallelLambda flambda, void* cdata, int num_task) {
  int want = num_task > 0 ? num_task : omp_get_max_threads();
  int rc = 0;
  #pragma omp parallel num_threads(want)
  {
    TVMParallelGroupEnv env = {0, omp_get_num_threads()};
    int r = flambda(omp_get_thread_num(), &env, cdata);
    if (r != 0) {
      #pragma omp atomic write
      rc = r;
    }
  }
  return rc;
}
"""


def torch_openmp_library() -> Path | None:
    """The OpenMP runtime file torch has loaded in this process (libgomp / libiomp5 / libomp)."""
    import torch  # noqa: F401  make sure it is loaded before looking

    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        path = line.split()[-1] if line.split() else ""
        name = os.path.basename(path)
        if name.startswith(("libgomp", "libiomp5", "libomp")) and ".so" in name:
            return Path(path)
    return None


def _compiler() -> str | None:
    cc = os.environ.get("CC", "cc")
    return cc if shutil.which(cc.split()[0]) else None


def launcher_path(cache_folder: Path, openmp_lib: Path) -> Path:
    digest = hashlib.sha256((_LAUNCHER_SOURCE + str(openmp_lib)).encode()).hexdigest()[:16]
    return cache_folder / f"omp_launch-{digest}.so"


def _build_launcher(path: Path, openmp_lib: Path, cc: str) -> None:
    from moecc.backends.tvm.cache import write_atomic

    src = path.with_suffix(".c")
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_text(_LAUNCHER_SOURCE)

    def compile_to(tmp: str) -> None:
        # -fopenmp only for the pragmas; linking torch's runtime file by path makes the
        # launcher's DT_NEEDED the soname torch's copy carries, so the loader reuses it.
        cmd = [*cc.split(), "-O2", "-fPIC", "-shared", "-fopenmp", str(src), "-o", tmp,
               str(openmp_lib), f"-Wl,-rpath,{openmp_lib.parent}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()[:500]}")

    write_atomic(path, compile_to)


@functools.lru_cache(maxsize=1)
def openmp_launcher() -> int | None:
    """Address of the OpenMP launcher in this process, or None (logged) where unavailable."""
    if os.environ.get("MOECC_TVM_THREAD_POOL", "openmp") == "tvm":
        return None
    openmp_lib = torch_openmp_library()
    cc = _compiler()
    if openmp_lib is None or cc is None:
        log.warning("TVM kernels keep TVM's thread pool (%s): inside a model they then share the "
                    "cores with torch's spinning OpenMP threads",
                    "torch has no OpenMP runtime loaded" if openmp_lib is None else "no C compiler ($CC / cc)")
        return None
    from moecc.backends.tvm.cache import cache_dir

    path = launcher_path(cache_dir(), openmp_lib)
    try:
        if not path.exists():
            _build_launcher(path, openmp_lib, cc)
        lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError) as exc:
        log.warning("TVM kernels keep TVM's thread pool: the OpenMP launcher did not build or load: %s", exc)
        return None
    _keep_alive.append(lib)
    return ctypes.cast(lib.moecc_omp_parallel_launch, ctypes.c_void_p).value


_keep_alive: list[ctypes.CDLL] = []  # the launcher library must outlive every module using it


def use_torch_threads(module_path: str | os.PathLike) -> bool:
    """Point a loaded `llvm` module's parallel launches at torch's OpenMP pool.

    `module_path` must already be loaded (by TVM); returns True when it now uses torch's
    threads, False when it keeps TVM's pool (no launcher, or a module that uses barriers).
    """
    try:
        lib = ctypes.CDLL(str(module_path), mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
    except OSError:
        return False  # not loaded through the dynamic loader (e.g. a system-lib module)
    try:
        slot = ctypes.c_void_p.in_dll(lib, LAUNCH_SYMBOL)
    except ValueError:
        return False  # no parallel loops (e.g. the host side of a cuda module)
    try:
        ctypes.c_void_p.in_dll(lib, BARRIER_SYMBOL)
        return False  # barriers need TVM's sync_handle: keep TVM's pool
    except ValueError:
        pass
    launcher = openmp_launcher()
    if launcher is None:
        return False
    slot.value = launcher
    return True
