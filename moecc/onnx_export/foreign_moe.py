"""onnxruntime MoE / QMoE nodes from files moecc did not write -> moecc MoE layers.

In a file from elsewhere (onnxruntime's own tools, a hand-built graph) a
`com.microsoft.MoE` / `QMoE` node takes router *logits* computed by the graph, usually

    logits = Gemm(x, W_router, [b], transB=1)   or   MatMul(x, W_routerᵀ) [+ Add(b)]
    y      = MoE(x, logits, fc1, [fc1_bias], fc2, [fc2_bias])          (QMoE: + scales)

A moecc layer computes its logits itself from the router weight, so the importer folds
that producer into the layer: when the logits come from a Gemm / MatMul (+ Add) of the
MoE node's own input with constant weights, and nothing else reads them, the node and its
router become one MoELayerModule. Anything else is an ImportError naming what did not
match: the importer never guesses a different layer.

Semantics taken from onnxruntime's operator schema (see ort_ops.py): softmax over all E
logits, top-k, then with normalize_routing_weights the k weights divided by their sum ->
RouterSpec(scoring="softmax", renormalize=...). Experts: activation_type "swiglu" with
swiglu_fusion 1 (gate / up rows interleaved) or 2 (gate rows then up rows), alpha = 1,
beta = 0, no limit -> SiLU-gated experts; alpha, beta = 1 and a limit -> GPT-OSS's
"swiglu_oai". QMoE: expert_weight_bits 8 / 4, block_size or per-row scales, packed as
moecc packs them (uint8 [E, R, C/P], low nibble first, zero point 2^(bits-1)).
Not taken (ImportError): use_sparse_mixer, a separate fc3 (unfused SwiGLU), non-gated
activations, quantised files with zero points, prepacked weights.
"""

from __future__ import annotations

import torch

from moecc.spec import ExpertSpec, MoELayerSpec, RouterSpec
from moecc.weights import MOE_WEIGHT_FIELDS, MoEWeights

FOREIGN_OPS = ("MoE", "QMoE")


def router_producer(node, producers: dict, consumers: dict, tensors: dict):
    """(router_weight [E, K], router_bias [E] or None, names of the nodes folded) for the
    logits input of MoE node `node`; raises ImportError saying what did not match."""
    x, logits = node.input[0], node.input[1]
    bias = None
    folded = []
    prod = producers.get(logits)
    if prod is not None and prod.op_type == "Add":  # MatMul + Add(bias)
        mm_out, b_name = (prod.input[0], prod.input[1]) if prod.input[1] in tensors else (prod.input[1], prod.input[0])
        if b_name not in tensors or len(consumers.get(mm_out, [])) != 1:
            raise ImportError(f"{node.name}: router logits come from an Add that is not matmul + constant bias")
        bias, folded = tensors[b_name].reshape(-1), [prod]
        prod = producers.get(mm_out)
    if prod is None or prod.op_type not in ("Gemm", "MatMul"):
        raise ImportError(f"{node.name}: its router logits ({logits}) are not computed by a Gemm / MatMul of the "
                          "MoE input with a constant weight; moecc layers compute them from the router weight")
    if prod.input[0] != x or prod.input[1] not in tensors:
        raise ImportError(f"{node.name}: the router {prod.op_type} ({prod.name}) does not read the MoE node's input "
                          "with a constant weight")
    attrs = {a.name: a for a in prod.attribute}
    w = tensors[prod.input[1]].float()
    if prod.op_type == "Gemm":
        trans_a = "transA" in attrs and attrs["transA"].i
        if trans_a or any(name in attrs and attrs[name].f != 1.0 for name in ("alpha", "beta")):
            raise ImportError(f"{node.name}: router Gemm with transA / alpha / beta is not taken")
        w = w if "transB" in attrs and attrs["transB"].i else w.t()  # -> [E, K]
        if len(prod.input) > 2 and prod.input[2]:
            if prod.input[2] not in tensors:
                raise ImportError(f"{node.name}: router Gemm bias is not a constant")
            bias = tensors[prod.input[2]].reshape(-1)
    else:
        w = w.t()  # MatMul(x, W [K, E])
    for n in (prod, *folded):
        if len(consumers.get(n.output[0], [])) != 1:
            raise ImportError(f"{node.name}: the router logits ({n.output[0]}) are read elsewhere too; "
                              "folding them into the layer would drop that use")
    return w.contiguous(), bias, [prod.name or prod.output[0], *(f.name or f.output[0] for f in folded)]


def foreign_layer(node, producers: dict, consumers: dict, tensors: dict, kernel_backend: str):
    """(MoELayerModule, names of the router nodes it absorbs) for one com.microsoft MoE / QMoE node."""
    from moecc.onnx_export.export import deinterleave_rows
    from moecc.onnx_export.layers import MoELayerModule

    attrs = {a.name: a for a in node.attribute}

    def attr(name, default):
        a = attrs.get(name)
        if a is None:
            return default
        return {1: a.f, 2: a.i, 3: a.s.decode() if isinstance(a.s, bytes) else a.s}.get(a.type, default)

    if attr("use_sparse_mixer", 0):
        raise ImportError(f"{node.name}: use_sparse_mixer routing is not a moecc routing")
    act, fusion = attr("activation_type", "relu"), attr("swiglu_fusion", 0)
    if act != "swiglu" or fusion not in (1, 2):
        raise ImportError(f"{node.name}: activation_type={act!r} swiglu_fusion={fusion}; moecc imports fused SwiGLU "
                          "experts (swiglu_fusion 1 or 2)")
    alpha, beta, limit = attr("activation_alpha", 1.0), attr("activation_beta", 0.0), attr("swiglu_limit", 0.0)
    quantized = node.op_type == "QMoE"
    names = list(node.input) + [""] * 10
    # MoE:  input, router_probs, fc1, fc1_bias, fc2, fc2_bias, fc3, fc3_bias
    # QMoE: input, router_probs, fc1, fc1_scales, fc1_bias, fc2, fc2_scales, fc2_bias, fc3, fc3_scales, fc3_bias,
    #       fc1_zero_points, fc2_zero_points, fc3_zero_points
    idx = (dict(gate_up=2, gate_up_scale=3, gate_up_bias=4, down=5, down_scale=6, down_bias=7, fc3=8, zp=11)
           if quantized else dict(gate_up=2, gate_up_bias=3, down=4, down_bias=5, fc3=6))
    if names[idx["fc3"]] or (quantized and any(names[11:14])):
        raise ImportError(f"{node.name}: separate fc3 weights or zero points are not taken")
    given = {}
    for field in ("gate_up", "gate_up_scale", "gate_up_bias", "down", "down_scale", "down_bias"):
        name = names[idx[field]] if field in idx else ""
        if not name:
            continue
        if name not in tensors:
            raise ImportError(f"{node.name}: {field} ({name}) is not a constant")
        given[field] = tensors[name]
    if "gate_up" not in given or "down" not in given:
        raise ImportError(f"{node.name}: fc1 / fc2 weights are missing")
    router_weight, router_bias, folded = router_producer(node, producers, consumers, tensors)
    e, k = router_weight.shape
    top_k = attr("k", 1)
    weight_format, group = "dense", 0
    if quantized:
        if attr("weights_prepacked", 0):
            raise ImportError(f"{node.name}: prepacked QMoE weights are not taken")
        bits = attr("expert_weight_bits", 4)
        weight_format, group = {8: "int8", 4: "int4"}.get(bits), attr("block_size", 0)
        if weight_format is None:
            raise ImportError(f"{node.name}: expert_weight_bits={bits}; moecc packs 8 or 4")
    n = given["down"].shape[-1] * (2 if weight_format == "int4" else 1)
    if fusion == 1:
        for f in ("gate_up", "gate_up_bias", "gate_up_scale"):
            if f in given:
                given[f] = deinterleave_rows(given[f]).contiguous()
    for f in ("gate_up_scale", "down_scale"):
        if f in given and given[f].dim() == 2:  # per-row [E, R] -> [E, R, 1]
            given[f] = given[f].unsqueeze(-1)
    if alpha == 1.0 and beta == 0.0 and not limit:
        activation = dict(activation="silu")
    elif beta == 1.0 and limit:
        activation = dict(activation="swiglu_oai", swiglu_alpha=float(alpha), swiglu_limit=float(limit))
    else:
        raise ImportError(f"{node.name}: swiglu with alpha={alpha}, beta={beta}, limit={limit} is neither SiLU-gated "
                          "nor GPT-OSS's swiglu")
    spec = MoELayerSpec(
        RouterSpec(e, top_k, scoring="softmax", renormalize=bool(attr("normalize_routing_weights", 0)),
                   has_router_bias=router_bias is not None),
        ExpertSpec(k, n, has_bias="gate_up_bias" in given or "down_bias" in given, weight_format=weight_format,
                   group_size=group, **activation), source=node.name)
    if spec.experts.has_bias:  # moecc takes both biases or none: a missing one is zero
        given.setdefault("gate_up_bias", torch.zeros(e, 2 * n))
        given.setdefault("down_bias", torch.zeros(e, k))
    weights = MoEWeights(**{f: given.get(f) for f in MOE_WEIGHT_FIELDS if f not in ("router_weight", "router_bias")},
                         router_weight=router_weight, router_bias=router_bias)
    return MoELayerModule(spec, weights, kernel_backend), folded


def graph_links(graph) -> tuple[dict, dict]:
    """(producer node by output name, consumer nodes by input name) of an ONNX graph."""
    producers, consumers = {}, {}
    for node in graph.node:
        for out in node.output:
            producers[out] = node
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    for out in graph.output:
        consumers.setdefault(out.name, []).append(None)  # a graph output is a use too
    return producers, consumers


__all__ = ["FOREIGN_OPS", "foreign_layer", "graph_links", "router_producer"]
