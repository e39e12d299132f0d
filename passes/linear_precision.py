"""Linear precision: the non-expert linear layers lowered to options.precision's format.

Matches: `torch._C._nn.linear` / `F.linear` nodes whose weight is a real 2-D float tensor
         (a lifted parameter: attention projections, dense MLPs, the LM head; the MoE
         routers and experts are inside the moecc layer ops by now), when
         options.quantize_linears is True and options.precision is set.
Needs:   mla_absorb before it (the absorbed MLA op reads kv_b_proj's weight as it is);
         before decode_gemv, which would otherwise take the one-row linears.
Does:    per linear, walks the precision config's chain (int4 -> int8 -> original) and
         takes the first format whose group fits the input width and whose weight SQNR
         meets min_weight_sqnr (no output bound: a linear has no routing to probe); the
         node becomes moecc::quantized_linear (moecc/quantized_linear.py) over packed
         weights made once from the parameter (moecc.weight_store). The original
         parameter stays alive with the model (as for the experts: docs/precision.md).
Guarantees: the op computes reference_linear of the packed weights (dequantised, inputs
         int8-quantised when the config says activations="int8"); a linear no format
         fits is left exactly as it was, with the reason in the report. int8 activations
         on a CPU without AVX512-VNNI: taken weight-only (reported), as the experts are
         (passes/precision_lowering.py says when and why).
         Linears that read the same input with the same format and no bias (an attention
         block's q / k / v projections) become one op over their packed rows stacked, and
         each original output a slice of its columns: at decode the per-call cost (the
         input's quantisation and the kernel calls, ~45 us on a 2-core CPU) is paid once
         instead of three times; the arithmetic of every output column is unchanged.
Counters: int8, int4 (linears lowered to each), kept (left as they were), packed_kib,
         merged (linears folded into a sibling's op).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moecc.backends.reference.quantized import dequantize, group_fits, quantize_rows, sqnr_db
from moecc.capture.graph_utils import weight_path
from moecc.capture.report import PassResult
from moecc.passes.context import PassContext
from moecc.passes.precision_lowering import A8_ADVICE, int8_activations_missing, weight_only_instead
from moecc.precision import chain, config_for, format_name

NAME = "linear_precision"
_LINEAR_TARGETS = (torch._C._nn.linear, F.linear)


def run(ctx: PassContext) -> PassResult:
    counters = {"int8": 0, "int4": 0, "kept": 0, "packed_kib": 0, "merged": 0}
    config = ctx.options.precision
    if config is None or not ctx.options.quantize_linears:
        return PassResult(NAME, counters)
    import moecc.quantized_linear  # noqa: F401  (defines moecc::quantized_linear)

    op = torch.ops.moecc.quantized_linear.default
    a8_missing = int8_activations_missing(ctx)  # CPUs without VNNI: int8 activations go weight-only
    notes = []
    before = ctx.weights.derived_bytes
    chosen_by_node = []  # (linear node, x node, bias node, weight node, config, packed) in graph order
    for node in list(ctx.gm.graph.nodes):
        if node.op != "call_function" or node.target not in _LINEAR_TARGETS:
            continue
        args = list(node.args) + [None] * (3 - len(node.args))
        x_node, w_node, b_node = args[0], args[1], node.kwargs.get("bias", args[2])
        try:
            w = ctx.value(w_node)
        except KeyError:
            w = None
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point() or w.device.type == "meta":
            continue
        label = weight_path(w_node)
        layer_config = config_for(config, label.removesuffix(".weight"))  # per-layer overrides by module path
        if layer_config is None:
            counters["kept"] += 1
            notes.append(f"{label}: kept {w.dtype} (no precision for this path)")
            continue
        chosen, why = _choose(w, layer_config, a8_missing)
        if chosen is None:
            counters["kept"] += 1
            notes.append(f"{label}: kept {w.dtype} ({why})")
            continue
        cfg, q, sqnr = chosen
        chosen_by_node.append((node, x_node, b_node, w_node, cfg, q))
        counters[cfg.weight_format] += 1
        notes.append(f"{label} {tuple(w.shape)}: {format_name(cfg)}, weight SQNR {sqnr:.1f} dB"
                     + (f" ({why})" if why else ""))
    groups = _siblings(chosen_by_node)
    for group in groups:
        _emit(ctx, op, group, notes)
    counters["merged"] = sum(len(g) - 1 for g in groups)
    counters["packed_kib"] = (ctx.weights.derived_bytes - before) // 1024
    return PassResult(NAME, counters, notes)


def _siblings(chosen: list) -> list[list]:
    """The chosen linears grouped by (input node, format, group, activations); a linear with
    a bias stays alone. Groups keep graph order."""
    groups: dict = {}
    for item in chosen:
        node, x_node, b_node, _, cfg, _ = item
        key = (x_node, cfg.weight_format, cfg.group_size or 0, cfg.activations) if b_node is None else (node,)
        groups.setdefault(key, []).append(item)
    return list(groups.values())


def _emit(ctx: PassContext, op, group: list, notes: list) -> None:
    """One moecc::quantized_linear for `group`; with several linears, their packed rows
    stacked [sum N, K/P] and each original node a slice of the output's columns."""
    first, x_node, b_node, _, cfg, _ = group[0]
    fmt, size = cfg.weight_format, cfg.group_size or 0
    names = tuple(w_node.name for _, _, _, w_node, _, _ in group)
    with ctx.gm.graph.inserting_before(first):
        packed = ctx.weights.get_attr(("linear_packed", fmt, size, *names),
                                      lambda: torch.cat([q.packed for *_, q in group]), "linear_packed")
        scales = ctx.weights.get_attr(("linear_scales", fmt, size, *names),
                                      lambda: torch.cat([q.scales for *_, q in group]), "linear_scales")
    if len(group) == 1:
        first.target, first.kwargs = op, {}
        first.args = (x_node, packed, scales, b_node, fmt, size, cfg.activations)
        return
    with ctx.gm.graph.inserting_before(first):
        merged = ctx.gm.graph.call_function(op, (x_node, packed, scales, None, fmt, size, cfg.activations))
    start = 0
    for node, *_, q in group:
        rows = q.packed.shape[0]
        with ctx.gm.graph.inserting_before(node):
            part = ctx.gm.graph.call_function(torch.narrow, (merged, -1, start, rows))
        node.replace_all_uses_with(part)
        ctx.gm.graph.erase_node(node)
        start += rows
    notes.append(f"merged: {', '.join(names)} read the same input: one {format_name(cfg)} op of {start} rows")


def _choose(w: torch.Tensor, config, a8_missing: str = ""):
    """((config, packed, SQNR dB), why) for the first format in the chain that fits and meets
    its weight bound, or (None, why). a8_missing: why int8 activations cannot run on fast
    kernels here ('' when they can); then a config asking for them is taken weight-only,
    as passes/precision_lowering.py does for the experts (strict: PrecisionError)."""
    reasons = []
    for cfg in chain(config):
        if cfg.weight_format != "fp8" and cfg.activations == "int8" and a8_missing:
            cfg = weight_only_instead(cfg, f"{format_name(cfg)}: {a8_missing}", "linears", A8_ADVICE, reasons)
        misfit = group_fits(cfg.weight_format, w.shape[1], cfg.group_size or 0)
        if misfit:
            reasons.append(f"{format_name(cfg)}: {misfit}")
            continue
        q = quantize_rows(w, cfg.weight_format, cfg.group_size or 0)
        sqnr = sqnr_db(w, dequantize(q.packed, q.scales, cfg.weight_format))
        if sqnr >= cfg.min_weight_sqnr:
            return (cfg, q, sqnr), "; ".join(reasons)
        reasons.append(f"{format_name(cfg)}: weight SQNR {sqnr:.1f} dB (bound {cfg.min_weight_sqnr:g})")
    return None, "; ".join(reasons) or "no format"
