"""Linear layers with packed int8 / int4 weights (passes/linear_precision.py puts them in).

    moecc::quantized_linear(x [..., K], packed [N, K/P] uint8, scales [N, K/G] fp32,
                            bias [N]?, fmt, group_size, activations) -> [..., N] in x's dtype

The weights use the layout of the expert stacks (backends/reference/quantized.py: q + Z,
int4 two per byte, low nibble first; G = group_size or K); `activations` "int8"
quantises the input rows per row and group first (w8a8 / w4a8), "float" keeps them.

Semantics (`reference_linear`): dequantise, fake-quantise x when asked, F.linear in fp32,
round to x's dtype once. On a CPU with apache-tvm the op runs moecc's TVM MoE down-GEMM
kernels with one expert, which is exactly a grouped GEMV/GEMM over the packed weights
(backends/tvm/linear.py); elsewhere, or for shapes those kernels do not fit, the
reference. Registered as a custom op with a fake implementation, so Dynamo, AOTAutograd
and Inductor treat it as one extern call. Importing this module defines the op; nothing
imports it at moecc import time.
"""

from __future__ import annotations

import torch

_LIB = torch.library.Library("moecc", "FRAGMENT")
_LIB.define("quantized_linear(Tensor x, Tensor packed, Tensor scales, Tensor? bias, str fmt, int group_size, "
            "str activations) -> Tensor")


def reference_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                     fmt: str, group_size: int, activations: str) -> torch.Tensor:
    """The definition: x [..., K] -> [..., N] in x's dtype (fp32 math)."""
    from moecc.backends.reference.quantized import dequantize, fake_quantize_activations

    w = dequantize(packed, scales, fmt)  # [N, K] fp32
    xf = x.float()
    if activations == "int8":
        xf = fake_quantize_activations(xf, group_size)
    y = torch.nn.functional.linear(xf, w, None if bias is None else bias.float())
    return y.to(x.dtype)


def _quantized_linear(x, packed, scales, bias, fmt, group_size, activations):
    if x.device.type == "cpu":
        from moecc.backends.tvm.linear import tvm_linear_unfit

        if not tvm_linear_unfit(x.dtype, packed.shape[0], x.shape[-1], fmt, group_size, activations):
            from moecc.backends.tvm.linear import quantized_linear as tvm_linear

            rows = x.reshape(-1, x.shape[-1])
            return tvm_linear(rows, packed, scales, bias, fmt, group_size, activations).view(
                *x.shape[:-1], packed.shape[0])
    return reference_linear(x, packed, scales, bias, fmt, group_size, activations)


def _fake(x, packed, scales, bias, fmt, group_size, activations):
    return x.new_empty(*x.shape[:-1], packed.shape[0])


_LIB.impl("quantized_linear", _quantized_linear, "CompositeExplicitAutograd")
torch.library.register_fake("moecc::quantized_linear", _fake, lib=_LIB)
