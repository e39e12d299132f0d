"""`moecc doctor`: what moecc sees on this machine and what it will use."""

from __future__ import annotations

import importlib


def register(sub) -> None:
    p = sub.add_parser("doctor", help="report versions, the GPU, its profile, kernels and tuning tables")
    p.set_defaults(func=run)


def _version(name: str) -> str:
    try:
        return getattr(importlib.import_module(name), "__version__", "installed")
    except ImportError:
        return "not installed"


def run(args) -> int:
    import torch

    import moecc
    from moecc.devices import UnknownDeviceError, current_device_key, profile
    from moecc.passes.lower_kernels import backend_available, resolve_kernel_backend

    print(f"moecc {moecc.__version__}")
    for name in ("torch", "triton", "tvm", "transformers"):
        print(f"  {name:13s} {_version(name)}")
    if torch.cuda.is_available():
        device = torch.device("cuda")
        key = current_device_key()
        props = torch.cuda.get_device_properties(0)
        print(f"GPU: {props.name} (sm_{props.major}{props.minor}, {props.multi_processor_count} SMs) -> key {key}")
        try:
            p = profile(key)
            print(f"  profile: {p.name}, {p.max_shared_memory_per_block} B shared/block, "
                  f"{p.memory_bandwidth_gbps:.0f} GB/s, fp8: {'yes' if p.has_fp8 else 'no'}")
        except UnknownDeviceError:
            print("  no device profile: configurations will be predicted from the live device properties")
    else:
        device = torch.device("cpu")
        print("GPU: none visible (Triton kernels need CUDA; TVM runs on CPU)")
    for b in ("reference", "triton", "tvm"):
        print(f"  kernel backend {b:9s} {'usable' if backend_available(b, device) else 'not usable'} on {device}")
    print(f"  kernel_backend='auto' picks: {resolve_kernel_backend('auto', device)}")
    try:
        from moecc.tuning.catalog import describe_tables  # optional helper

        print(describe_tables())
    except (ImportError, AttributeError):
        print("tuning tables: run `moecc autotune --list`")
    return 0
