"""Dense ops moecc substitutes in CPU decode graphs (not MoE layers: those are moecc/ops.py).

    moecc::decode_linear(x [..., K] with one row, weight [N, K], bias [N]?) -> [..., N]

One row of a 16-bit linear layer as `torch.mv`. Why: on CPUs torch's mv for bf16 streams
the weight faster than its one-row GEMM (a [1, 2048] x [2048, 4096] bf16 layer on the
2-core Xeon build machine, 2026-12-02: mv 25.5-26.7 GB/s, linear 21.6-22.1 GB/s; fp32 is
equal both ways, so passes/decode_gemv.py leaves fp32 alone), and Inductor would
otherwise lower the linear to the GEMM extern call. Registered as a custom op (with a
fake implementation) so Inductor calls it as an extern kernel instead of decomposing
`mv` into its own, slower, reduction loop (16 GB/s measured the same day).
Importing this module defines the op; nothing imports it at moecc import time.
"""

from __future__ import annotations

import torch

_LIB = torch.library.Library("moecc", "FRAGMENT")
_LIB.define("decode_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor")


def _decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if x.numel() != x.shape[-1]:
        raise ValueError(f"moecc::decode_linear takes one row, got input {tuple(x.shape)}")
    y = torch.mv(weight, x.reshape(-1))  # [N]
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], weight.shape[0])


def _fake(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


_LIB.impl("decode_linear", _decode_linear, "CompositeExplicitAutograd")
torch.library.register_fake("moecc::decode_linear", _fake, lib=_LIB)
