"""Dense ops moecc substitutes in CPU decode graphs (not MoE layers: those are moecc/ops.py).

    moecc::decode_linear(x [..., K] with one row, weight [N, K], bias [N]?, kernel) -> [..., N]

One row of a 16-bit linear layer as a matrix-vector product, on one of two kernels
(passes/decode_gemv.py picks per node and counts which):

  "tvm"  backends/tvm/linear.dense_gemv: moecc's TVM (llvm) GEMV, the bf16/fp16 weight
         widened in registers, fp32 accumulation, bias added in fp32, rounded once.
         Measured on a 2-core AMD EPYC (znver3, AVX2) VM, 2026-12-03, the 17 linears of
         the CPU-decode bench model with their weights on 2 MiB pages as the huge_pages
         pass leaves them, cycled from DRAM, one process: 6.05-6.31 ms per step (79-83%
         of the read-bandwidth floor) against torch.mv 8.91 ms (56%) and F.linear 9.11
         (55%); 40 minutes later, the machine shared, 56-63% against 40-45% and 35-41%
         (docs/performance.md; `python -m moecc.bench.decode_gemv` per shape). On the
         Xeon build VM the same GEMV measured 634 vs 681 us (torch.mv) for [4096 x 2048]
         (backends/tvm/linear._config). fp32 weights stay on torch's GEMM: there this
         schedule was slower (56-58% vs 77-82% of the floor on the AMD VM, measured
         while a test run shared it).
  "mv"   torch.mv (+ bias): where TVM is not installed or cannot build the shape, and
         with kernel_backend="reference". On 4 KiB pages torch's bf16 mv streamed faster
         than its one-row GEMM (2026-12-02: 25.5-26.7 vs 21.6-22.1 GB/s).

Registered as a custom op (with a fake implementation) so Inductor calls it as an extern
kernel instead of lowering the linear to its GEMM call or decomposing `mv` into its own,
slower, reduction loop (16 GB/s measured 2026-12-02).
Importing this module defines the op; nothing imports it at moecc import time.
"""

from __future__ import annotations

import torch

_LIB = torch.library.Library("moecc", "FRAGMENT")
_LIB.define("decode_linear(Tensor x, Tensor weight, Tensor? bias, str kernel=\"mv\") -> Tensor")
KERNELS = ("tvm", "mv")


def tvm_unfit(weight: torch.Tensor) -> str:
    """Why the TVM GEMV cannot take this weight here ('' when it can)."""
    if weight.device.type != "cpu" or weight.dtype not in (torch.bfloat16, torch.float16):
        return f"{weight.dtype} weight on {weight.device.type}: the TVM GEMV takes 16-bit CPU weights"
    from moecc.backends.tvm.linear import tvm_linear_unfit

    return tvm_linear_unfit(weight.dtype, weight.shape[0], weight.shape[1], "dense", 0, "float")


def _decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   kernel: str = "mv") -> torch.Tensor:
    if x.numel() != x.shape[-1]:
        raise ValueError(f"moecc::decode_linear takes one row, got input {tuple(x.shape)}")
    if kernel == "tvm":
        from moecc.backends.tvm.linear import dense_gemv

        y = dense_gemv(x.reshape(1, -1), weight).view(-1)  # [N] fp32
        if bias is not None:
            y = y + bias.float()
        y = y.to(x.dtype)
    elif kernel == "mv":
        y = torch.mv(weight, x.reshape(-1))  # [N]
        if bias is not None:
            y = y + bias
    else:
        raise ValueError(f"moecc::decode_linear kernel must be one of {KERNELS}, not {kernel!r}")
    return y.view(*x.shape[:-1], weight.shape[0])


def _fake(x, weight, bias, kernel="mv"):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


_LIB.impl("decode_linear", _decode_linear, "CompositeExplicitAutograd")
torch.library.register_fake("moecc::decode_linear", _fake, lib=_LIB)
