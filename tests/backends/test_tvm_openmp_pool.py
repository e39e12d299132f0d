"""The TVM CPU kernels run their parallel loops on torch's OpenMP threads.

Checks the mechanism (backends/tvm/openmp_pool.py), not its speed (docs/backends.md has
the measurement): after the op ran, the loaded module's parallel-launch pointer is the
moecc launcher, the launcher reused the OpenMP runtime torch loaded (one libgomp in the
process, not two pools), results equal the reference with 1 and 2 threads, and
MOECC_TVM_THREAD_POOL=tvm keeps TVM's own pool.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import layer_factory
import pytest
import torch

pytest.importorskip("tvm")

from moecc.backends import reference  # noqa: E402
from moecc.spec import RouterSpec  # noqa: E402
from moecc.tolerances import check_close  # noqa: E402

pytestmark = pytest.mark.tvm
REPO = Path(__file__).resolve().parents[2]
CFG = {"block_m": 4, "tile_n": 2, "tile_k": 2, "vec": 16, "red_tile": 32}


def _openmp_runtimes_mapped() -> set[str]:
    names = set()
    for line in Path("/proc/self/maps").read_text().splitlines():
        path = line.split()[-1]
        if os.path.basename(path).startswith(("libgomp", "libiomp5", "libomp")):
            names.add(os.path.realpath(path))
    return names


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_kernels_launch_on_torch_openmp_pool():
    from moecc.backends.tvm import moe_layer
    from moecc.backends.tvm.cache import load_kernels
    from moecc.backends.tvm.op import kernel_key
    from moecc.backends.tvm.openmp_pool import LAUNCH_SYMBOL, openmp_launcher
    from moecc.backends.tvm.runtime import target_for

    spec, w = layer_factory.make_layer(RouterSpec(8, 2), k=64, n=32)
    x = torch.randn(5, 64)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            check_close(moe_layer(x, w, spec, config=CFG), reference.moe_layer(x, w, spec), torch.float32)
    finally:
        torch.set_num_threads(before)

    launcher = openmp_launcher()
    assert launcher, "the OpenMP launcher did not build (is a C compiler installed?)"
    key, _ = kernel_key(spec, torch.float32, target_for("cpu"), CFG, x.shape[0], False, False)
    lib = ctypes.CDLL(load_kernels(key).path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)  # the module the op ran
    assert ctypes.c_void_p.in_dll(lib, LAUNCH_SYMBOL).value == launcher
    assert len(_openmp_runtimes_mapped()) == 1, _openmp_runtimes_mapped()


def test_tvm_pool_kept_when_asked():
    code = (
        "import ctypes, os, torch, layer_factory\n"
        "from moecc.backends.tvm import moe_layer\n"
        "from moecc.backends.tvm.openmp_pool import LAUNCH_SYMBOL, openmp_launcher\n"
        "from moecc.spec import RouterSpec\n"
        "spec, w = layer_factory.make_layer(RouterSpec(8, 2), k=64, n=32)\n"
        f"moe_layer(torch.randn(3, 64), w, spec, config={CFG!r})\n"
        "assert openmp_launcher() is None\n"
        "print('ok')\n"
    )
    env = dict(os.environ, MOECC_TVM_THREAD_POOL="tvm",
               PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests" / "backends")]))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]
