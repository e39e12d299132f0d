"""The TVM backend: the moecc MoE op in TensorIR, for `llvm` (CPU) and `cuda`.

Public API (importing this package imports neither tvm nor torch's heavy parts, and
compiles nothing; tvm is imported on first use):

    moe_layer(hidden [T, K], weights: MoEWeights, spec: MoELayerSpec, config=None) -> [T, K]
    is_available(device) -> bool
    export_kernels(specs, target, out_dir), load_kernels(dir)    (export.py)

Modules, one concept each:
    config.py        schedule parameters and their lookup in the tuning database
    activation.py    silu / gelu_tanh / swiglu_oai as TIR expressions
    key.py           what identifies a compiled module (cache key)
    kernels_llvm.py  the kernels with their CPU schedule
    kernels_cuda.py  the kernels with their GPU schedule
    build.py         targets and compilation (nvcc for cuda)
    cuda_binaries.py ahead-of-time cubins, served to TVM's first-use CUDA compile
    cache.py         on-disk and in-process module caches
    align.py         torch routing split: sorting tokens into per-expert blocks
    op.py            moe_layer
    runtime.py       availability, target selection, thread pool
    openmp_pool.py   llvm kernels' parallel loops on torch's OpenMP threads
    runtime_libs.py  loading libtvm_runtime(+_cuda) without the TVM compiler
    export.py        ahead-of-time export and runtime-only loading
See docs/backends.md for the design, the torch/TVM split and measured CPU times.
"""

from __future__ import annotations

__all__ = ["moe_layer", "is_available", "export_kernels", "load_kernels"]


def moe_layer(hidden, weights, spec, config=None):
    """See moecc.backends.tvm.op.moe_layer."""
    from moecc.backends.tvm.op import moe_layer as _moe_layer

    return _moe_layer(hidden, weights, spec, config)


def is_available(device) -> bool:
    """True when tvm imports and the device is cpu, or cuda with a TVM CUDA runtime."""
    from moecc.backends.tvm.runtime import is_available as _is_available

    return _is_available(device)


def export_kernels(*args, **kwargs):
    """See moecc.backends.tvm.export.export_kernels."""
    from moecc.backends.tvm.export import export_kernels as _export

    return _export(*args, **kwargs)


def load_kernels(*args, **kwargs):
    """See moecc.backends.tvm.export.load_kernels."""
    from moecc.backends.tvm.export import load_kernels as _load

    return _load(*args, **kwargs)
