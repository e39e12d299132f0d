"""Compile one KernelKey into a TVM runtime module (llvm or cuda), nothing cached here.

Targets:
    llvm  {"kind": "llvm", "mcpu": <host CPU, e.g. znver4>, "num-cores": <cores>}: the
          host's vector ISA (AVX2 / AVX-512) is what makes the kernels fast.
    cuda  {"kind": "cuda", "arch": "sm_90" | "sm_89" | "sm_86"} with an llvm host. TVM
          generates CUDA C, which the module carries (TVM compiles it at first use);
          `build_module` also compiles it with nvcc (TVM's `tvm.support.nvcc`) into a
          cubin for exactly that arch, stored beside the .so (cuda_binaries.py). No GPU
          is needed to build; nvcc must be on PATH.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, NamedTuple, Optional

from moecc.backends.tvm.key import KernelKey, TargetSpec


def host_cpu_name() -> str:
    """LLVM's name for this machine's CPU ("znver4", "skylake-avx512", ...)."""
    import tvm

    return str(tvm.get_global_func("target.llvm_get_system_cpu")())


def host_has_vnni() -> bool:
    """Whether this CPU has AVX512-VNNI (the integer dot products of kernels_llvm_vnni.py)."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " avx512_vnni" in line for line in f)
    except OSError:  # not Linux: no way to tell without running the instruction; say no
        return False


def make_target(spec: TargetSpec):
    """The tvm.target.Target for a TargetSpec."""
    import tvm

    if spec.kind == "llvm":
        cfg = {"kind": "llvm", "num-cores": os.cpu_count() or 1}
        if spec.mcpu:
            cfg["mcpu"] = spec.mcpu
        return tvm.target.Target(cfg)
    if spec.kind == "cuda":
        return tvm.target.Target({"kind": "cuda", "arch": f"sm_{spec.arch}"}, host={"kind": "llvm"})
    raise ValueError(f"unknown TVM target kind {spec.kind!r}")


def ir_module(key: KernelKey):
    """The TensorIR of the three kernels, scheduled for key.target."""
    if key.target.kind == "llvm":
        from moecc.backends.tvm.kernels_llvm import llvm_module

        return llvm_module(key)
    from moecc.backends.tvm.kernels_cuda import cuda_module

    return cuda_module(key)


class Built(NamedTuple):
    module: Any  # tvm.runtime.Executable: export_library() writes the .so
    cubin: Optional[bytes]  # cuda: the nvcc-compiled cubin for key.target.arch
    source: Optional[str]  # cuda: the CUDA C source the module carries


def build_module(key: KernelKey) -> Built:
    """Compile `key`'s kernels (and, for cuda, the cubin of their source)."""
    import tvm

    mod = ir_module(key)
    target = make_target(key.target)
    module = tvm.compile(mod, target=target)
    if key.target.kind != "cuda":
        return Built(module, None, None)
    if shutil.which("nvcc") is None:
        raise RuntimeError("building TVM CUDA kernels needs nvcc on PATH (CUDA toolkit)")
    from moecc.backends.tvm.cuda_binaries import compile_cubin, cuda_source

    source = cuda_source(module)
    return Built(module, compile_cubin(source, key.target.arch), source)
