"""Where the TVM kernels can run, and the TVM runtime settings the op relies on.

Nothing here imports tvm at module import; every function imports it when called.
"""

from __future__ import annotations

import functools
import os

import torch

from moecc.backends.tvm.key import TargetSpec


@functools.lru_cache(maxsize=1)
def tvm_importable() -> bool:
    try:
        import tvm  # noqa: F401
    except Exception:  # ImportError, or a broken native library
        return False
    return True


def is_available(device: "torch.device | str") -> bool:
    """True when tvm imports and `device` is the CPU, or a CUDA GPU with TVM's CUDA runtime."""
    device = torch.device(device)
    if not tvm_importable():
        return False
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False
        try:
            import tvm

            return bool(tvm.cuda(device.index or 0).exist)
        except Exception:
            return False
    return False


@functools.lru_cache(maxsize=8)
def target_for(device_type: str, device_index: int = 0) -> TargetSpec:
    """The build target for tensors on this device: the host CPU, or the GPU's arch."""
    if device_type == "cpu":
        from moecc.backends.tvm.build import host_cpu_name

        return TargetSpec("llvm", mcpu=host_cpu_name())
    if device_type == "cuda":
        major, minor = torch.cuda.get_device_capability(device_index)
        return TargetSpec("cuda", arch=major * 10 + minor)
    raise ValueError(f"the TVM backend runs on cpu or cuda, not {device_type!r}")


def device_key(spec: TargetSpec, device_index: int = 0) -> str:
    """Tuning-database device key: the normalised GPU key, or cpu_<llvm cpu name>."""
    if spec.kind == "cuda":
        from moecc.devices import current_device_key

        return current_device_key(device_index)
    return f"cpu_{spec.mcpu or 'generic'}"


@functools.lru_cache(maxsize=1)
def use_torch_thread_count() -> int:
    """Size TVM's CPU thread pool like torch's, unless TVM_NUM_THREADS is set. Returns it.

    TVM's pool only runs the kernels where openmp_pool.py could not move them onto torch's
    OpenMP threads (no C compiler, no OpenMP runtime, MOECC_TVM_THREAD_POOL=tvm).

    TVM sizes its pool, when it first starts, from the cores it detects, which on some
    VMs is 1 while torch (and the user's `torch.set_num_threads`) uses all of them. The
    pool reads TVM_NUM_THREADS at start-up (`runtime.config_threadpool` afterwards did
    not give it a second thread on the 2-core benchmark machine: measured 1.4x slower),
    so this sets that variable, once, before the op's first kernel call. A user's own
    TVM_NUM_THREADS always wins.

    It also sets TVM_THREAD_POOL_SPIN_COUNT=0 (unless set): TVM's workers otherwise spin
    after each kernel, and inside a compiled model the next ops are torch's, whose OpenMP
    threads then share the cores with spinning TVM workers (measured on the 2-core
    machine: `moecc demo` 0.34-0.82x of eager with spinning, parity without).
    """
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")
    if os.environ.get("TVM_NUM_THREADS"):
        return int(os.environ["TVM_NUM_THREADS"])
    n = max(1, torch.get_num_threads())
    os.environ["TVM_NUM_THREADS"] = str(n)
    return n


TVM_ALIGNMENT = 64  # bytes: TVM assumes every buffer's data pointer is aligned to this


def aligned(t: torch.Tensor | None) -> torch.Tensor | None:
    """`t`, or an aligned copy when its data pointer is not TVM_ALIGNMENT-aligned.

    The kernels' buffers are declared with TVM's default alignment, and LLVM emits aligned
    vector loads for them: an unaligned tensor (a view at an odd offset, weights mapped
    from a file) would crash the process. torch allocations are aligned, so the copy only
    happens for such views; for weights it happens on every call, so it warns once."""
    if t is None or t.data_ptr() % TVM_ALIGNMENT == 0:
        return t
    if t.numel() > 1 << 16:
        import warnings

        warnings.warn(f"moecc TVM kernels: a tensor of shape {tuple(t.shape)} is not {TVM_ALIGNMENT}-byte "
                      "aligned and is copied on every call; make it aligned once (e.g. .clone()) to avoid the copy",
                      stacklevel=3)
    return t.clone()
