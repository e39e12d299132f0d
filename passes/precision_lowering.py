"""Precision lowering: store each layer's routed expert stack as packed int8 / int4 / fp8.

Matches: every moecc layer node, when options.precision is set (moecc/precision.py).
Needs:   expert_fusion before it (quantised stacks exist only in the canonical layout:
         gate_up [E', 2N, K], down [E', K, N]); lower_kernels after it (it picks kernels
         by the weight format the spec now names).
Does:    for each layer, tries the config's chain (e.g. int4 g128 -> int8 per row ->
         the original dtype): quantises the stack expert by expert
         (backends/reference/quantized.py), measures every expert's weight SQNR and the
         layer's output SQNR on random hidden states (the reference op, original vs
         quantised weights), and keeps the first format that meets both bounds and whose
         group size fits K and N. The packed weights and scales become derived tensors
         (moecc.weight_store); the spec gets weight_format / group_size.
Guarantees: a layer either meets its config's bounds or keeps its original weights;
         with strict=True a miss raises PrecisionError instead of falling back. Router,
         norms, biases and everything outside the expert stack keep their dtype.
         Per-layer overrides (moecc.precision.PerLayerPrecision) pick each layer's config
         by its module path (spec.source); a pattern matching no layer is a note.
         Layers already packed (moecc.quantize_ before compiling) are taken as they are.
Memory: the packed stack is kept beside the model's own parameters (they stay alive as
         long as the model does); `moecc.quantize_` (moecc/quantize_module.py) replaces
         them instead, before compiling.
         fp8 with activations="dynamic" (fp8 activations): no kernel computes them yet (CPUs
         have no fp8 arithmetic), so the layer is lowered to fp8 weight-only with the reason
         in its note, or, with strict, PrecisionError; never a silently different result.
         int8 activations (w8a8 / w4a8) on a CPU whose kernels would be TVM's but which
         lacks AVX512-VNNI (their integer dot products): lowered weight-only in the same
         format instead (the same packed weights; activations stay in the model dtype, so
         the layer runs on TVM's dequantising kernels rather than on the slow reference
         op), the reason in the note; with strict, PrecisionError. kernel_backend=
         "reference" keeps int8 activations (the reference computes them everywhere).
Counters: layers (lowered to some format), int8, int4, fp8, dense (kept), fallbacks, packed_kib,
         prepacked (packed before compiling by moecc.quantize_).
Notes:   per layer: chosen format, worst expert weight SQNR, output SQNR, and why.
"""

from __future__ import annotations

import dataclasses

import torch

from moecc.backends.reference.moe_layer import moe_layer as reference_moe_layer
from moecc.backends.reference.quantized import group_fits, quantize_stack, sqnr_db
from moecc.capture.report import PassResult
from moecc.passes.context import PassContext
from moecc.precision import PerLayerPrecision, PrecisionError, chain, config_for, describe, format_name
from moecc.spec import MoELayerSpec
from moecc.weights import MOE_WEIGHT_FIELDS, MoEWeights

NAME = "precision_lowering"
PROBE_TOKENS = 64  # random hidden states for the output SQNR: enough to touch most experts


def run(ctx: PassContext) -> PassResult:
    counters = {"layers": 0, "int8": 0, "int4": 0, "fp8": 0, "dense": 0, "fallbacks": 0, "packed_kib": 0, "prepacked": 0}
    precision = ctx.options.precision
    notes = [f"precision: {describe(precision)}"] if precision is not None else []
    before = ctx.weights.derived_bytes
    paths = []
    for index, node in enumerate(ctx.moe_nodes()):
        spec = MoELayerSpec.from_json(node.args[-1])
        name = spec.source or f"layer {index}"
        paths.append(name)
        if spec.experts.weight_format != "dense":  # packed before compiling (moecc.quantize_): taken as it is
            counters["prepacked"] += 1
            notes.append(f"{name}: {_spec_format(spec)} (packed by moecc.quantize_ before compiling)")
            continue
        config = config_for(precision, name)
        if config is None:
            if precision is not None:
                counters["dense"] += 1
                notes.append(f"{name}: kept (override: {precision.matching_pattern(name)!r} -> original weights)")
            continue
        arg_nodes = dict(zip(MOE_WEIGHT_FIELDS, node.args[1:-1]))
        weights = MoEWeights(**{f: ctx.value(n) for f, n in arg_nodes.items()})
        chosen, why = _choose(spec, weights, config, seed=index, a8_missing=int8_activations_missing(ctx))
        if chosen is None:
            counters["dense"] += 1
            notes.append(f"{name}: kept {weights.gate_up.dtype} ({why})")
            continue
        cfg, packed, measured = chosen
        counters[cfg.weight_format] += 1
        counters["layers"] += 1
        counters["fallbacks"] += int(cfg is not config)
        fmt_name = format_name(cfg)
        notes.append(f"{name}: {fmt_name}: weight SQNR >= {measured[0]:.1f} dB, output SQNR {measured[1]:.1f} dB"
                     + (f" ({why})" if why else ""))
        sources = tuple(n.name if n is not None else None for n in arg_nodes.values())
        new_args = dict(arg_nodes)
        with ctx.gm.graph.inserting_before(node):
            for field_name, tensor in packed.items():
                new_args[field_name] = ctx.weights.get_attr(
                    ("quantized", field_name, cfg.weight_format, cfg.group_size or 0, sources),
                    lambda t=tensor: t, field_name)
        lowered = lowered_spec(spec, cfg)
        node.args = (node.args[0], *[new_args[f] for f in MOE_WEIGHT_FIELDS], lowered.to_json())
    if isinstance(precision, PerLayerPrecision):
        # A note, never an error: one Dynamo graph may hold only some of the model's layers.
        notes += [f"override {p!r} matches no MoE layer in this graph" for p in precision.unmatched(paths)]
    counters["packed_kib"] = (ctx.weights.derived_bytes - before) // 1024
    return PassResult(NAME, counters, notes)


def _spec_format(spec: MoELayerSpec) -> str:
    e = spec.experts
    if e.weight_format == "fp8":
        return f"fp8 b{e.group_size}"
    return (f"{e.weight_format} {'g' + str(e.group_size) if e.group_size else 'per-row'}"
            f"{' a8' if e.activations == 'int8' else ''}")


def lowered_spec(spec: MoELayerSpec, cfg) -> MoELayerSpec:
    """The layer spec once its experts are stored in cfg's format."""
    activations = "float" if cfg.weight_format == "fp8" else cfg.activations  # fp8: weight-only (see _choose)
    return spec.replace(experts={"weight_format": cfg.weight_format, "group_size": cfg.group_size or 0,
                                 "activations": activations})


def _choose(spec: MoELayerSpec, weights: MoEWeights, config, seed: int, a8_missing: str = ""):
    """((config, {field: tensor}, (worst weight SQNR, output SQNR)), why) or (None, why).
    a8_missing: why int8 activations cannot run on fast kernels here ('' when they can)."""
    reasons = []
    if not spec.experts.canonical or spec.experts.weight_format != "dense":
        return None, "layout not canonical or already quantised"
    if weights.gate_up.device.type == "meta":
        return None, "weights on the meta device (nothing to measure)"
    k, n = spec.experts.hidden_size, spec.experts.intermediate_size
    for cfg in chain(config):
        label = format_name(cfg)
        who = spec.source or "an MoE layer"
        if cfg.weight_format == "fp8" and cfg.activations == "dynamic":
            cfg = weight_only_instead(cfg, f"{label}: {fp8_activations_missing(weights.gate_up.device)}", who,
                                      "Use activations='weight_only', or set strict=False.", reasons)
            label = format_name(cfg)
        if cfg.weight_format != "fp8" and cfg.activations == "int8" and a8_missing:
            cfg = weight_only_instead(cfg, f"{label}: {a8_missing}", who, A8_ADVICE, reasons)
            label = format_name(cfg)
        misfit = group_fits(cfg.weight_format, k, cfg.group_size or 0) or \
            group_fits(cfg.weight_format, n, cfg.group_size or 0)
        if misfit:
            miss = f"{label}: {misfit}"
        else:
            packed, worst = _quantize(weights, cfg)
            out_sqnr = _output_sqnr(spec, weights, cfg, packed, seed)
            if worst >= cfg.min_weight_sqnr and out_sqnr >= cfg.min_output_sqnr:
                return (cfg, packed, (worst, out_sqnr)), "; ".join(reasons)
            miss = (f"{label}: weight SQNR {worst:.1f} dB (bound {cfg.min_weight_sqnr:g}), "
                    f"output SQNR {out_sqnr:.1f} dB (bound {cfg.min_output_sqnr:g})")
        if cfg.strict:
            raise PrecisionError(f"{spec.source or 'an MoE layer'}: {miss}; strict=True refuses to fall back. "
                                 "Relax the bound, change group_size, or set strict=False.")
        reasons.append(miss + " -> fallback")
    return None, "; ".join(reasons)


A8_ADVICE = "Use weight-only activations, kernel_backend='reference', or strict=False."


def weight_only_instead(cfg, miss: str, who: str, advice: str, reasons: list[str]):
    """cfg with weight-only activations, for a config whose activations cannot run here
    (`miss` says which and why): the miss goes into `reasons`; with cfg.strict a
    PrecisionError naming `who` and `advice` instead."""
    if cfg.strict:
        raise PrecisionError(f"{who}: {miss}; strict=True refuses to fall back. {advice}")
    fp8 = cfg.weight_format == "fp8"
    reasons.append(miss + (" -> weight_only" if fp8 else " -> weight-only"))
    return dataclasses.replace(cfg, activations="weight_only" if fp8 else "float")


def int8_activations_missing(ctx: PassContext) -> str:
    """Why int8-activation layers would not reach fast kernels in this graph ('' when they
    would, or when the reference op was asked for): on the CPU with TVM kernels, a CPU
    without AVX512-VNNI (lower_kernels would keep such layers on the reference op)."""
    if ctx.device.type != "cpu":
        return ""  # GPUs: lower_kernels reports the layers it keeps on the reference
    from moecc.passes.lower_kernels import KernelBackendUnavailable, resolve_kernel_backend

    try:
        if resolve_kernel_backend(ctx.options.kernel_backend, ctx.device) != "tvm":
            return ""
    except KernelBackendUnavailable:
        return ""  # lower_kernels raises it with its advice
    from moecc.backends.tvm.build import host_has_vnni

    if host_has_vnni():
        return ""
    return "int8 activations need AVX512-VNNI (moecc's TVM integer kernels), which this CPU lacks"


def fp8_activations_missing(device: torch.device) -> str:
    """Why fp8 activations (w8a8) cannot run for weights on `device` (every device today)."""
    if device.type == "cpu":
        return "fp8 activations need fp8 arithmetic, which CPUs do not have"
    return "no moecc kernel computes with fp8 activations yet (Triton w8a8 is not built)"


def _quantize(weights: MoEWeights, cfg) -> tuple[dict, float]:
    """Both stacks packed expert by expert -> ({field: tensor}, worst expert weight SQNR)."""
    out, worst = {}, float("inf")
    for field_name, scale_name in (("gate_up", "gate_up_scale"), ("down", "down_scale")):
        stack = weights[MOE_WEIGHT_FIELDS.index(field_name)]  # [E', R, C]
        packed = scales = None
        for e, q, sqnr in quantize_stack(stack, cfg.weight_format, cfg.group_size or 0):
            if packed is None:  # allocate once: the result is the quantised size, no second copy
                packed = q.packed.new_empty(stack.shape[0], *q.packed.shape)
                scales = q.scales.new_empty(stack.shape[0], *q.scales.shape)
            packed[e], scales[e] = q.packed, q.scales
            worst = min(worst, sqnr)
        out[field_name], out[scale_name] = packed, scales
    return out, worst


def _output_sqnr(spec: MoELayerSpec, weights: MoEWeights, cfg, packed: dict, seed: int) -> float:
    """Layer output SQNR, original vs quantised weights, on random hidden states [P, K]."""
    gen = torch.Generator().manual_seed(1234 + seed)
    dtype = weights.gate_up.dtype
    x = torch.randn(PROBE_TOKENS, spec.experts.hidden_size, generator=gen).to(weights.gate_up.device, dtype)
    lowered = lowered_spec(spec, cfg)
    with torch.no_grad():
        y = reference_moe_layer(x, weights, spec)
        y_q = reference_moe_layer(x, weights._replace(**packed), lowered)
    return sqnr_db(y, y_q)
