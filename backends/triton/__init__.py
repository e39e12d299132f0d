"""Triton backend for the moecc MoE op (imported as moecc.backends.triton).

Public API:
    moe_layer(hidden [T, K], weights, spec, config=None) -> [T, K]   the fused op
    route_topk(logits [T, E], router_spec, correction_bias) -> (weights fp32 [T, k], ids int32 [T, k])
    align_tokens_by_expert(topk_ids [T, k'], num_experts, block_m) -> AlignedSlots
    heuristic_config(E, N, K, top_k, T, dtype, profile) -> KernelConfig
    KernelConfig, is_available(device)
Ahead-of-time compilation and shared-memory checks live in moecc.backends.triton.aot.

Importing this package imports neither triton nor the kernels (names resolve on first
use), and nothing is ever compiled or launched at import. Note that Triton decides
between compiled and interpreted kernels (TRITON_INTERPRET=1) when the kernel modules
are first imported: set the variable before first use.
"""

from __future__ import annotations

import importlib
import os

from moecc.backends.triton.config import KernelConfig

_LAZY = {
    "moe_layer": "moecc.backends.triton.moe",
    "resolve_config": "moecc.backends.triton.moe",
    "route_topk": "moecc.backends.triton.routing",
    "align_tokens_by_expert": "moecc.backends.triton.align",
    "AlignedSlots": "moecc.backends.triton.align",
    "heuristic_config": "moecc.backends.triton.heuristics",
}

__all__ = ["KernelConfig", "is_available", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def is_available(device) -> bool:
    """Whether the Triton kernels can run on `device` (a torch.device, str or tensor).

    CUDA: triton importable and CUDA present. CPU: only under the Triton interpreter
    (TRITON_INTERPRET=1 set before the kernels were first imported).
    """
    import torch

    if isinstance(device, torch.Tensor):
        device = device.device
    device = torch.device(device)
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if device.type == "cuda":
        return torch.cuda.is_available()
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0").lower() not in ("1", "true", "on", "yes"):
            return False
        from moecc.backends.triton.routing import route_topk_kernel
        from triton.runtime.jit import JITFunction

        return not isinstance(route_topk_kernel, JITFunction)  # decorated in interpreter mode
    return False
