"""The gated activations as TIR expressions: act(gate) * up, in fp32.

One definition shared by the llvm and cuda kernels; the semantics are the reference's
(backends/reference/experts.py `activation`):
    silu        silu(gate) * up
    gelu_tanh   gelu(gate, approximate="tanh") * up
    swiglu_oai  GPT-OSS: gate clamped above at `limit`, up clamped to [-limit, limit],
                (up + 1) * gate * sigmoid(alpha * gate)
Arguments and result are fp32 PrimExprs; the kernels accumulate in fp32 and call this
once per output element (the GEMM epilogue).
"""

from __future__ import annotations

import math
from typing import NamedTuple


class ActivationSpec(NamedTuple):
    """The part of ExpertSpec the activation needs (hashable: it keys the module cache)."""

    name: str
    alpha: float = 1.702
    limit: float = 7.0


def gated_activation(gate, up, act: ActivationSpec):
    """fp32 PrimExpr act(gate) * up."""
    from tvm import tirx

    f32 = lambda v: tirx.const(v, "float32")  # noqa: E731
    one = f32(1.0)
    if act.name == "silu":
        return gate / (one + tirx.exp(-gate)) * up
    if act.name == "gelu_tanh":
        inner = f32(math.sqrt(2.0 / math.pi)) * (gate + f32(0.044715) * gate * gate * gate)
        return f32(0.5) * gate * (one + tirx.tanh(inner)) * up
    if act.name == "swiglu_oai":
        g = tirx.Min(gate, f32(act.limit))
        u = tirx.Max(tirx.Min(up, f32(act.limit)), f32(-act.limit))
        return (u + one) * (g / (one + tirx.exp(-(f32(act.alpha) * g))))
    raise ValueError(f"TVM backend has no activation {act.name!r}")
