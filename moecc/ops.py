"""The moecc custom ops: one MoE layer as one graph node.

Three ops share one schema (tensor order: moecc.weights.MOE_WEIGHT_FIELDS, then the
layer spec as JSON text, see moecc.spec):

    moecc::moe_layer         the reference semantics (plain torch, any device)
    moecc::moe_layer_triton  the Triton kernels (CUDA; canonical layout)
    moecc::moe_layer_tvm     the TVM kernels (CPU via LLVM, CUDA; canonical layout)

Capture emits `moe_layer`; the lowering pass rebinds each node to the op of the chosen
kernel backend. Each op has a fake implementation (output = hidden's shape and dtype), so
graphs containing it trace under Dynamo, AOTAutograd and Inductor. Importing this module
defines the ops (torch.library's registry); nothing else in moecc imports it at import
time.
"""

from __future__ import annotations

import torch

from moecc.spec import MoELayerSpec
from moecc.weights import MOE_WEIGHT_FIELDS, REQUIRED_WEIGHT_FIELDS, MoEWeights

_ARGS = ", ".join(
    f"Tensor{'' if f in REQUIRED_WEIGHT_FIELDS else '?'} {f}" for f in MOE_WEIGHT_FIELDS
)
SCHEMA_TAIL = f"(Tensor hidden, {_ARGS}, str spec) -> Tensor"
OP_NAMES = {"reference": "moe_layer", "triton": "moe_layer_triton", "tvm": "moe_layer_tvm"}

_LIB = torch.library.Library("moecc", "DEF")


def _reference_impl(hidden, *args):
    from moecc.backends.reference import moe_layer

    *tensors, spec = args
    return moe_layer(hidden, MoEWeights(*tensors), MoELayerSpec.from_json(spec))


def _triton_impl(hidden, *args):
    from moecc.backends import triton as triton_backend

    *tensors, spec = args
    return triton_backend.moe_layer(hidden, MoEWeights(*tensors), MoELayerSpec.from_json(spec))


def _tvm_impl(hidden, *args):
    from moecc.backends import tvm as tvm_backend

    *tensors, spec = args
    return tvm_backend.moe_layer(hidden, MoEWeights(*tensors), MoELayerSpec.from_json(spec))


def _fake(hidden, *args):
    return torch.empty_like(hidden)


for _backend, _impl, _tags in (
    # The reference loops over experts with tokens: a host sync, so never CUDA-graph it.
    ("reference", _reference_impl, (torch.Tag.cudagraph_unsafe,)),
    ("triton", _triton_impl, ()),
    ("tvm", _tvm_impl, ()),
):
    _LIB.define(OP_NAMES[_backend] + SCHEMA_TAIL, tags=_tags)
    _LIB.impl(OP_NAMES[_backend], _impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"moecc::{OP_NAMES[_backend]}", _fake, lib=_LIB)


def op_for_backend(kernel_backend: str):
    """The OpOverload that runs layers with the given kernel backend."""
    return getattr(torch.ops.moecc, OP_NAMES[kernel_backend]).default


def moe_layer(hidden: torch.Tensor, weights: MoEWeights, spec: MoELayerSpec, kernel_backend: str = "reference"):
    """Call the op directly (outside torch.compile): hidden [T, K] -> [T, K]."""
    return op_for_backend(kernel_backend)(hidden, *weights, spec.to_json())
