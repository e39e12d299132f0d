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
         fits is left exactly as it was, with the reason in the report.
Counters: int8, int4 (linears lowered to each), kept (left as they were), packed_kib.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moecc.backends.reference.quantized import dequantize, group_fits, quantize_rows, sqnr_db
from moecc.capture.graph_utils import weight_path
from moecc.capture.report import PassResult
from moecc.passes.context import PassContext
from moecc.precision import chain, config_for, format_name

NAME = "linear_precision"
_LINEAR_TARGETS = (torch._C._nn.linear, F.linear)


def run(ctx: PassContext) -> PassResult:
    counters = {"int8": 0, "int4": 0, "kept": 0, "packed_kib": 0}
    config = ctx.options.precision
    if config is None or not ctx.options.quantize_linears:
        return PassResult(NAME, counters)
    import moecc.quantized_linear  # noqa: F401  (defines moecc::quantized_linear)

    op = torch.ops.moecc.quantized_linear.default
    notes = []
    before = ctx.weights.derived_bytes
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
        chosen, why = _choose(w, layer_config)
        if chosen is None:
            counters["kept"] += 1
            notes.append(f"{label}: kept {w.dtype} ({why})")
            continue
        cfg, q, sqnr = chosen
        group = cfg.group_size or 0
        with ctx.gm.graph.inserting_before(node):
            packed = ctx.weights.get_attr(("linear_packed", cfg.weight_format, group, w_node.name),
                                          lambda: q.packed, "linear_packed")
            scales = ctx.weights.get_attr(("linear_scales", cfg.weight_format, group, w_node.name),
                                          lambda: q.scales, "linear_scales")
        node.target, node.kwargs = op, {}
        node.args = (x_node, packed, scales, b_node, cfg.weight_format, group, cfg.activations)
        counters[cfg.weight_format] += 1
        notes.append(f"{label} {tuple(w.shape)}: {format_name(cfg)}, weight SQNR {sqnr:.1f} dB"
                     + (f" ({why})" if why else ""))
    counters["packed_kib"] = (ctx.weights.derived_bytes - before) // 1024
    return PassResult(NAME, counters, notes)


def _choose(w: torch.Tensor, config):
    """((config, packed, SQNR dB), why) for the first format in the chain that fits and meets
    its weight bound, or (None, why)."""
    reasons = []
    for cfg in chain(config):
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
