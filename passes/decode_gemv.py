"""Decode GEMV: one-row 16-bit linear layers on the CPU as matrix-vector products.

Matches: `torch._C._nn.linear` / `F.linear` nodes of the captured (torch-level) graph whose
         input has exactly one row (the product of its leading dimensions is the static
         int 1: batch-1 decode) and whose weight is a 2-D bfloat16 tensor, in graphs that
         run on the CPU. The MoE routers are inside the moecc layer ops by now.
Needs:   lower_kernels before it only so that it never sees a region capture replaced;
         it is independent of the MoE passes otherwise.
Does:    rebinds each match to moecc::decode_linear with its kernel chosen here: "tvm"
         (moecc's TVM GEMV) where apache-tvm can build the shape and kernel_backend is not
         "reference", else "mv" (torch.mv); moecc/decode_ops.py says why and what was
         measured. Off with options={"decode_gemv": False}.
Guarantees: the same product in the same dtype, accumulated in fp32 and rounded once, as
         the GEMM path; the summation order may differ (bf16 tolerance, tested).
Counters: rewritten (linear nodes now decode_linear), tvm and mv (how many of them run on
         each kernel), skipped_fp32 (one-row linears left alone because their weights are
         fp32: torch's GEMM measured best there). Why a node is on "mv" is in the notes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moecc.capture.report import PassResult
from moecc.passes.context import PassContext

NAME = "decode_gemv"
_LINEAR_TARGETS = (torch._C._nn.linear, F.linear)


def _example(node):
    value = getattr(node, "meta", {}).get("example_value")
    if value is None:
        value = getattr(node, "meta", {}).get("val")
    return value if isinstance(value, torch.Tensor) else None


def _one_row(x: torch.Tensor) -> bool:
    rows = 1
    for d in x.shape[:-1]:
        if not isinstance(d, int):
            return False  # symbolic: not provably one row
        rows *= d
    return rows == 1


def run(ctx: PassContext) -> PassResult:
    counters = {"rewritten": 0, "tvm": 0, "mv": 0, "skipped_fp32": 0}
    notes: list[str] = []
    if ctx.device.type != "cpu" or not ctx.options.decode_gemv:
        return PassResult(NAME, counters)
    import moecc.decode_ops  # noqa: F401  (defines moecc::decode_linear)

    op = torch.ops.moecc.decode_linear.default
    for node in list(ctx.gm.graph.nodes):
        if node.op != "call_function" or node.target not in _LINEAR_TARGETS:
            continue
        args = list(node.args) + [None] * (3 - len(node.args))
        x_node, w_node, b_node = args[0], args[1], node.kwargs.get("bias", args[2])
        x, w = _example(x_node), _example(w_node)
        if x is None or w is None or w.dim() != 2 or x.device.type != "cpu" or not _one_row(x):
            continue
        if w.dtype != torch.bfloat16:
            if w.dtype == torch.float32:
                counters["skipped_fp32"] += 1
            continue
        kernel = _kernel(ctx, w, notes)
        node.target, node.args, node.kwargs = op, (x_node, w_node, b_node, kernel), {}
        counters["rewritten"] += 1
        counters[kernel] += 1
    return PassResult(NAME, counters, notes=notes)


def _kernel(ctx: PassContext, w: torch.Tensor, notes: list[str]) -> str:
    """"tvm" where the TVM GEMV takes this weight and the options allow it, else "mv"."""
    if ctx.options.kernel_backend == "reference":
        return "mv"
    from moecc.decode_ops import tvm_unfit

    why = tvm_unfit(w)
    if why:
        note = f"torch.mv for [{w.shape[0]} x {w.shape[1]}] {w.dtype}: {why}"
        if note not in notes:
            notes.append(note)
        return "mv"
    return "tvm"
