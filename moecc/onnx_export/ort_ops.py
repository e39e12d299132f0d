"""onnxruntime's fused MoE operators: which moecc layers they express, and the ONNX body.

com.microsoft.MoE (float experts) and com.microsoft.QMoE (int8 / int4 experts), as the
operator schemas of onnxruntime >= 1.20 define them (read with
onnxruntime.capi.onnxruntime_pybind11_state.get_all_operator_schema()):

    MoE(input [T, K], router_probs [T, E], fc1 [E, 2N, K], fc1_bias? [E, 2N],
        fc2 [E, K, N], fc2_bias? [E, K]) -> [T, K]
    attributes: k, normalize_routing_weights, activation_type="swiglu",
                swiglu_fusion=1 (gate/up rows interleaved: the only layout the CPU kernel
                takes), activation_alpha, activation_beta, swiglu_limit
    swiglu(g, l) = G * sigmoid(alpha * G) * (L + beta), G = min(g, limit),
                   L = clamp(l, -limit, limit)   (no clamp without swiglu_limit)

The operator takes router *logits* and does softmax over all E, top-k, then (with
normalize_routing_weights) divides the k weights by their sum: moecc's "softmax" scoring
with or without renormalisation, and "topk_softmax" (softmax of the top-k logits is the
renormalised softmax). SiLU-gated experts are swiglu with alpha=1, beta=0, no limit;
GPT-OSS's swiglu_oai is alpha=swiglu_alpha, beta=1, limit=swiglu_limit. QMoE reads
moecc's packed layout unchanged (uint8 [E, R, C/P], low nibble first, zero point 2^(b-1)
implied, fp32 scales [E, R] per row or [E, R, C/G] per block of G).

Everything else (sigmoid / grouped routing, correction biases, shared experts, other
activations) is declined with a reason, and goes out as standard ONNX ops instead.
"""

from __future__ import annotations

from moecc.spec import MoELayerSpec


def ort_unsupported(spec: MoELayerSpec) -> list[str]:
    """Why onnxruntime's MoE / QMoE cannot run this layer, routing included, on CPU (empty: it can)."""
    return ort_routing_unsupported(spec) + ort_experts_unsupported(spec)


def ort_routing_unsupported(spec: MoELayerSpec) -> list[str]:
    """Why onnxruntime's own softmax top-k cannot route this layer (empty: it can)."""
    r, e = spec.router, spec.experts
    why = []
    if r.scoring not in ("softmax", "topk_softmax"):
        why.append(f"{r.scoring} routing")
    if r.n_group > 1:
        why.append("group-limited routing")
    if r.has_correction_bias:
        why.append("score-correction bias")
    if r.select_on_logits:
        why.append("selection on raw logits")
    if r.renormalize and (r.renormalize_eps or r.renormalize_min):
        why.append("renormalisation eps / clamp")
    if r.logits_in_fp32:
        why.append("fp32 router logits")  # the exported router runs in the model's dtype
    if e.num_shared:
        why.append("shared experts")
    return why


def ort_experts_unsupported(spec: MoELayerSpec) -> list[str]:
    """Why onnxruntime's MoE / QMoE cannot run this layer's experts (empty: it can, given
    router inputs computed outside: decompose.moe_router_logits)."""
    e = spec.experts
    why = []
    if not e.gated or e.activation not in ("silu", "swiglu_oai"):
        why.append(f"{e.activation}{'' if e.gated else ' (no gate)'} experts (CPU MoE runs SwiGLU only)")
    if not e.canonical:
        why.append("non-canonical layout")
    if e.activations != "float":
        why.append("int8 activations")
    if e.weight_format != "dense" and e.group_size and (e.group_size < 16 or e.group_size & (e.group_size - 1)):
        why.append(f"group size {e.group_size} (QMoE blocks are powers of two >= 16)")
    if e.weight_format == "fp8":
        why.append("fp8 weights (QMoE reads int8 / int4)")
    if e.weight_format == "int8" and e.group_size:
        why.append("block-wise int8 (onnxruntime's CPU kernel quantises activations to int8 for it)")
    return why


def moe_attributes(spec: MoELayerSpec) -> dict:
    """The MoE / QMoE attributes for a supported layer."""
    r, e = spec.router, spec.experts
    attrs = dict(k=r.top_k, normalize_routing_weights=int(r.renormalize or r.scoring == "topk_softmax"),
                 activation_type="swiglu", swiglu_fusion=1)
    if e.activation == "swiglu_oai":
        attrs.update(activation_alpha=float(e.swiglu_alpha), activation_beta=1.0, swiglu_limit=float(e.swiglu_limit))
    else:
        attrs.update(activation_alpha=1.0, activation_beta=0.0)
    if e.weight_format != "dense":
        attrs.update(expert_weight_bits=8 if e.weight_format == "int8" else 4, weights_prepacked=0)
        if e.group_size:
            attrs["block_size"] = e.group_size
    return attrs


def ort_moe_node(spec: MoELayerSpec, fields: tuple[str, ...], router_probs: str, out: str, k: int,
                 normalize: bool):
    """The MoE / QMoE node reading `router_probs`, the layer's expert inputs and attributes."""
    from onnx import helper

    has = set(fields)
    opt = lambda name: name if name in has else ""  # noqa: E731  (absent optional input)
    attrs = dict(moe_attributes(spec), k=k, normalize_routing_weights=int(normalize))
    if spec.experts.weight_format == "dense":
        inputs = ["hidden", router_probs, "gate_up", opt("gate_up_bias"), "down", opt("down_bias")]
        return helper.make_node("MoE", inputs, [out], domain="com.microsoft", **attrs)
    inputs = ["hidden", router_probs, "gate_up", "gate_up_scale", opt("gate_up_bias"), "down", "down_scale",
              opt("down_bias")]
    return helper.make_node("QMoE", inputs, [out], domain="com.microsoft", **attrs)


def ort_function_nodes(spec: MoELayerSpec, fields: tuple[str, ...]):
    """The body of one layer's ONNX function: router Gemm, MoE / QMoE, scaling.

    Inputs are named "hidden" and the present MoEWeights fields; the output is "out".
    gate_up (and its bias / scales) must already hold interleaved rows (g0, u0, g1, ...).
    """
    from onnx import helper

    router_inputs = ["hidden", "router_weight"] + (["router_bias"] if "router_bias" in fields else [])
    nodes = [helper.make_node("Gemm", router_inputs, ["logits"], transB=1)]
    attrs = moe_attributes(spec)
    moe_out = "out" if spec.router.routed_scaling_factor == 1.0 else "moe_out"
    nodes.append(ort_moe_node(spec, fields, "logits", moe_out, attrs["k"], bool(attrs["normalize_routing_weights"])))
    if moe_out != "out":  # the weights' scale factor is linear in the output (no shared experts here)
        nodes.append(helper.make_node("Constant", [], ["scale"], value_float=float(spec.router.routed_scaling_factor)))
        nodes.append(helper.make_node("CastLike", ["scale", "hidden"], ["scale_t"]))
        nodes.append(helper.make_node("Mul", [moe_out, "scale_t"], ["out"]))
    return nodes
