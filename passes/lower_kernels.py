"""Kernel lowering: bind every MoE layer node to the op of the chosen kernel backend.

Matches: every moecc layer node.
Needs:   expert_fusion before it (Triton and TVM kernels take only canonical layouts).
Does:    resolves options.kernel_backend ("auto": Triton on CUDA when it is usable, TVM on
         CPU when apache-tvm is installed, else the reference) and rebinds node targets to
         moecc::moe_layer_{triton,tvm} or keeps moecc::moe_layer.
Guarantees: every layer node calls an op that runs on the graph's device, or compilation
         stops here with an error that says which option to change. A layer using a
         variant only the reference implements (moecc.spec.kernel_unsupported) stays on
         the reference op, with a note saying which variant. Quantised expert stacks
         (precision_lowering) run on the TVM llvm kernels and, weight-only with scale
         groups of a multiple of 16 values, on the Triton kernels
         (backends/triton/weight_formats.py); the TVM cuda kernels do not read them
         yet, so such layers stay on the reference op (noted).
Counters: triton, tvm, reference (layers bound to each).
"""

from __future__ import annotations

import importlib
import os

import torch

from moecc.capture.report import PassResult
from moecc.ops import op_for_backend
from moecc.spec import MoELayerSpec, kernel_unsupported
from moecc.passes.context import PassContext

NAME = "lower_kernels"


class KernelBackendUnavailable(RuntimeError):
    pass


def backend_available(name: str, device: torch.device) -> bool:
    if name == "reference":
        return True
    try:
        module = importlib.import_module(f"moecc.backends.{name}")
    except ImportError:
        return False
    check = getattr(module, "is_available", None)
    return bool(check and check(device))


def resolve_kernel_backend(requested: str, device: torch.device) -> str:
    if requested == "auto":
        order = ("triton", "reference") if device.type == "cuda" else ("tvm", "reference")
        return next(b for b in order if backend_available(b, device))
    if not backend_available(requested, device):
        hint = {
            "triton": "Triton kernels need a CUDA GPU (or TRITON_INTERPRET=1 for the slow CPU interpreter)",
            "tvm": "the TVM backend needs apache-tvm (pip install 'moecc[tvm]')",
        }.get(requested, "")
        raise KernelBackendUnavailable(
            f"kernel_backend={requested!r} is not usable on {device}: {hint}. "
            "Use options={'kernel_backend': 'auto'} to pick the best available one.")
    return requested


def run(ctx: PassContext) -> PassResult:
    counters = {"triton": 0, "tvm": 0, "reference": 0}
    nodes = ctx.moe_nodes()
    if not nodes:
        return PassResult(NAME, counters)
    backend = resolve_kernel_backend(ctx.options.kernel_backend, ctx.device)
    notes = [f"kernel backend: {backend}"
             + (" (TRITON_INTERPRET=1)" if backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1" else "")]
    for node in nodes:
        spec = MoELayerSpec.from_json(node.args[-1])
        chosen = backend
        if chosen != "reference" and not spec.experts.canonical:
            notes.append(f"{spec.source}: layout not canonical, kept on the reference kernels")
            chosen = "reference"
        elif chosen != "reference" and kernel_unsupported(spec, chosen):
            notes.append(f"{spec.source}: the {chosen} kernels lack {', '.join(kernel_unsupported(spec, chosen))}; "
                         "kept on the reference kernels")
            chosen = "reference"
        elif chosen == "triton" and _triton_unfit(spec):
            notes.append(f"{spec.source}: the triton kernels cannot run it: {_triton_unfit(spec)}; "
                         "kept on the reference kernels")
            chosen = "reference"
        elif chosen == "tvm" and spec.experts.weight_format != "dense" and ctx.device.type != "cpu":
            notes.append(f"{spec.source}: the {chosen} kernels do not read {spec.experts.weight_format} "
                         "weights yet; kept on the reference kernels")
            chosen = "reference"
        elif chosen == "tvm" and spec.experts.activations == "int8" and _int8_activations_unfit(spec):
            notes.append(f"{spec.source}: int8 activations: {_int8_activations_unfit(spec)}; "
                         "kept on the reference kernels")
            chosen = "reference"
        node.target = op_for_backend(chosen)
        counters[chosen] += 1
    return PassResult(NAME, counters, notes)


def _triton_unfit(spec: MoELayerSpec) -> str:
    """Why the Triton kernels cannot run this layer's weights ('' when they can)."""
    from moecc.backends.triton.weight_formats import unfit_reason

    return unfit_reason(spec.experts)


def _int8_activations_unfit(spec: MoELayerSpec) -> str:
    """Why the TVM integer-dot-product kernels cannot run this layer here ('' when they can)."""
    from moecc.backends.tvm.build import host_has_vnni
    from moecc.backends.tvm.config import TVMKernelConfig
    from moecc.backends.tvm.op import fit_groups

    if not host_has_vnni():
        return "this CPU has no AVX512-VNNI"
    try:
        fit_groups(TVMKernelConfig(), spec.experts)
    except ValueError as exc:
        return str(exc)
    return ""
