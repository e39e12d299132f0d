"""Unreachable experts, proven from router weights alone (issue 12, item 2): no data.

    certs = certify_model(model)              # {block name: [Certificate]}
    plan = certified_plan(model, certs)       # a moecc.pruning.PrunePlan
    with mask_experts(model, plan): ...       # outputs unchanged, by the certificates

An expert j is unreachable when no input can select it. Three proofs:

- "masked": its selection score is -inf for every input (a correction bias of -inf, or a
  router bias of -inf where logits rank), at least top_k others are finite, no groups.
- "dominated": at least top_k other experts i (in j's group, under group-limited routing,
  so they are eligible whenever j is) score above j for every router input h with
  ||h|| <= R. With logits l = W h + b (b the router bias, 0 without one) and d = W_i - W_j:
      l_i - l_j >= (b_i - b_j) - ||d|| R                        (Cauchy-Schwarz)
  Selection by logits (softmax scoring without correction bias: softmax is monotone;
  top-k softmax; select_on_logits adds the correction bias c): i ahead of j for every h if
      (b_i - b_j) + (c_i - c_j) > ||d|| R.
  Selection by sigmoid(l) + c (DeepSeek-V3): sigmoid is 1/4-Lipschitz and bounded by 1, so
      c_i - c_j > min(1, (||d|| R + |b_i - b_j|) / 4).
  R bounds the router input. For a transformers decoder layer the MoE block reads the
  output of its RMSNorm (`post_attention_layernorm`): h = g * x / sqrt(mean(x^2) + eps),
  whose norm is at most sqrt(K) * max|g| for every x (rmsnorm_input_bound). That is the
  only assumption about the model, and certify_model refuses a block whose decoder layer
  has no such norm.
- "duplicate": like dominated, with witnesses whose router row equals j's: then l_i - l_j
  = b_i - b_j for every h, so under sigmoid scoring or softmax probabilities plus a
  correction bias (ERNIE-style; no other proof covers it) i is ahead of j whenever
  b_i >= b_j and c_i > c_j (both scores are monotone in the logit). Assumes equal rows give
  bitwise-equal logits (one GEMM, one reduction order per output); with equal biases too
  the two experts tie and neither is certified.
A margin of 1e-6 relative is kept on each inequality against rounding. Trained routers
rarely have such experts (the shipped models have none); hand-masked or collapsed
routers do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moecc.pruning import LayerPlan, PrunePlan, PruningError

MARGIN = 1e-6


@dataclass(frozen=True)
class Certificate:
    expert: int
    kind: str                 # "masked", "dominated" or "duplicate"
    witnesses: tuple          # experts proven ahead of it (dominated) or () (masked)
    detail: str               # the inequality that holds, in numbers


@dataclass(frozen=True)
class RouterFacts:
    """What the proofs need of a router, framework-free."""

    weight: torch.Tensor              # [E, K]
    bias: torch.Tensor | None         # [E] router bias (logits)
    correction: torch.Tensor | None   # [E] selection-only bias
    top_k: int
    scoring: str                      # "softmax" | "sigmoid" | "topk_softmax"
    select_on_logits: bool = False
    n_group: int = 1


def rmsnorm_input_bound(norm_weight: torch.Tensor) -> float:
    """Largest ||RMSNorm(x)|| over all x: sqrt(K) * max|g| (mean(x^2) >= ||x||^2 / K)."""
    return math.sqrt(norm_weight.numel()) * float(norm_weight.detach().abs().max())


def certify(router: RouterFacts, input_bound: float) -> list[Certificate]:
    """Certificates of the experts no router input of norm <= input_bound can select."""
    w = router.weight.detach().double()  # [E, K]
    e = w.shape[0]
    b = router.bias.detach().double().reshape(-1) if router.bias is not None else torch.zeros(e, dtype=torch.float64)
    c = (router.correction.detach().double().reshape(-1) if router.correction is not None
         else torch.zeros(e, dtype=torch.float64))
    by_sigmoid = router.scoring == "sigmoid" and not router.select_on_logits
    if router.scoring not in ("softmax", "sigmoid", "topk_softmax"):
        return []
    # Softmax probability + correction bias: a probability depends on all logits, so only
    # the duplicate-row proof below applies (equal rows rank by their biases alone).
    prob_plus_bias = router.scoring == "softmax" and router.correction is not None and not router.select_on_logits
    # -inf selection score: a correction bias, or a router bias where logits rank (under
    # sigmoid scoring a -inf logit still scores 0 + c).
    score_inf = torch.isinf(c) & (c < 0)  # [E]
    if not by_sigmoid:
        score_inf |= torch.isinf(b) & (b < 0)
    if int((~score_inf).sum()) < router.top_k:
        return []
    # With groups a -inf expert is picked when its chosen groups run short of finite ones:
    # only the within-group dominance proof below is sound there.
    certs = [Certificate(j, "masked", (), "selection score -inf (bias)") for j in range(e)
             if score_inf[j] and router.n_group == 1]
    size = e // router.n_group
    dist = torch.cdist(w, w)  # [E, E]: ||W_i - W_j||
    for j in range(e):
        if score_inf[j]:
            continue
        group = range(e) if router.n_group == 1 else range((j // size) * size, (j // size + 1) * size)
        ahead = []
        duplicates = []
        for i in (i for i in group if i != j and not score_inf[i]):
            if (by_sigmoid or prob_plus_bias) and _duplicate_ahead(w, b, c, i, j):
                ahead.append(i)
                duplicates.append(i)
                continue
            if prob_plus_bias:
                continue
            spread = float(dist[i, j]) * input_bound
            if by_sigmoid:
                need = min(1.0, (spread + abs(float(b[i] - b[j]))) / 4)
                have = float(c[i] - c[j])
            else:
                need, have = spread, float(b[i] - b[j] + c[i] - c[j])
            if have > need * (1 + MARGIN) + MARGIN:
                ahead.append(i)
        # Under groups (top-2-sum group scores) j must also never be among its group's top
        # two, or masking it would change its group's score.
        if len(ahead) >= (max(router.top_k, 2) if router.n_group > 1 else router.top_k):
            certs.append(Certificate(j, "duplicate" if duplicates else "dominated", tuple(ahead),
                                     f"{len(ahead)} >= top-{router.top_k} experts ahead for every ||h|| <= "
                                     f"{input_bound:.3g}" + (f"; router row equal to experts {duplicates}, "
                                                             "whose correction bias is higher" if duplicates else "")))
    return sorted(certs, key=lambda cert: cert.expert)


def _duplicate_ahead(w: torch.Tensor, b: torch.Tensor, c: torch.Tensor, i: int, j: int) -> bool:
    """Expert i scores above j for every input: equal router rows (so equal W h), router
    bias b_i >= b_j (so sigmoid(l_i) >= sigmoid(l_j), and softmax p_i >= p_j: both are
    monotone in the logit), and a correction bias higher by more than the rounding margin
    (scores are fp32 in (0, 1] plus c)."""
    gap = float(c[i] - c[j])
    return bool(torch.equal(w[i], w[j])) and float(b[i]) >= float(b[j]) and \
        gap > MARGIN * (1 + abs(float(c[i])) + abs(float(c[j])))


def router_facts(gate) -> RouterFacts:
    """RouterFacts of a transformers router (Qwen3-MoE / Mixtral softmax, DeepSeek-V3 sigmoid)."""
    correction = getattr(gate, "e_score_correction_bias", None)
    bias = getattr(gate, "bias", None)
    scoring = "sigmoid" if isinstance(correction, torch.Tensor) else "softmax"
    return RouterFacts(gate.weight, bias if isinstance(bias, torch.Tensor) else None,
                       correction if isinstance(correction, torch.Tensor) else None, int(gate.top_k), scoring,
                       n_group=int(getattr(gate, "num_group", 1) or 1))


def certify_model(model) -> dict[str, list[Certificate]]:
    """{MoE block name: certificates}, R from the decoder layer's post-attention RMSNorm."""
    from moecc.evaluate import moe_blocks

    modules = dict(model.named_modules())
    out = {}
    for name, block in moe_blocks(model):
        parent = name.rsplit(".", 1)[0]
        norm = modules.get(f"{parent}.post_attention_layernorm")
        if norm is None or not isinstance(getattr(norm, "weight", None), torch.Tensor):
            raise PruningError(f"{name}: no {parent}.post_attention_layernorm with a weight to bound the router "
                               "input; certificates need the RMSNorm that feeds the MoE block")
        out[name] = certify(router_facts(block.gate), rmsnorm_input_bound(norm.weight))
    return out


def certified_plan(model, certificates: dict[str, list[Certificate]]) -> PrunePlan:
    """A plan removing exactly the certified experts (use with mask_experts or as a report)."""
    from moecc.evaluate import moe_blocks

    layers = []
    for name, block in moe_blocks(model):
        certs = certificates.get(name, [])
        note = "; ".join(f"expert {c.expert}: {c.kind} ({c.detail})" for c in certs)
        layers.append(LayerPlan(name, int(block.gate.weight.shape[0]), tuple(c.expert for c in certs), (), note))
    return PrunePlan("certified", 1.0, tuple(layers))


# --- in a compiled graph: the router input bound from the RMSNorm feeding the layer -------

_SHAPE_METHODS = ("view", "reshape", "to", "contiguous", "float")
ROUNDING_SLACK = 1.01  # R x 1.01: the norm's output rounded to bf16 is within 2^-8 of exact


def graph_input_bound(hidden, value) -> float | None:
    """sqrt(K) * max|g| x ROUNDING_SLACK when the layer's input `hidden` (an FX node) is
    g * x * rsqrt(mean(x^2, -1) + eps) up to reshapes and casts, else None (no proof).

    value(node) -> the real tensor of a placeholder / get_attr node (PassContext.value).
    """
    node = _through(hidden)
    if not _call(node, "mul") or len(node.args) != 2:
        return None
    for g, y in (node.args, node.args[::-1]):
        if not hasattr(g, "op") or g.op not in ("placeholder", "get_attr"):
            continue
        try:
            weight = value(g)
        except KeyError:
            continue
        if isinstance(weight, torch.Tensor) and weight.dim() == 1 and _is_normalised(_through(y)):
            return rmsnorm_input_bound(weight) * ROUNDING_SLACK
    return None


def _is_normalised(node) -> bool:
    """node == x * rsqrt(mean(x^2, -1) + eps) for one x (either operand order)."""
    if not _call(node, "mul") or len(node.args) != 2:
        return False
    for x, r in (node.args, node.args[::-1]):
        if not _call(r, "rsqrt") or not _call(r.args[0], "add"):
            continue
        for mean in r.args[0].args:
            if _call(mean, "mean") and _last_dim(mean) and _call(mean.args[0], "pow") \
                    and mean.args[0].args[1:2] == (2,) and mean.args[0].args[0] is x:
                return True
    return False


def _last_dim(mean) -> bool:
    dim = mean.args[1] if len(mean.args) > 1 else mean.kwargs.get("dim")
    dim = dim[0] if isinstance(dim, (list, tuple)) and len(dim) == 1 else dim
    shape = getattr(mean.args[0].meta.get("example_value", None), "shape", None)
    return dim == -1 or (shape is not None and dim == len(shape) - 1)


def _through(node):
    """Skip reshapes and dtype casts."""
    while hasattr(node, "op") and (_call(node, "reshape") or (node.op == "call_method" and node.target in _SHAPE_METHODS)):
        node = node.args[0]
    return node


def _call(node, name: str) -> bool:
    """A call of torch.<name>, operator.<name>, Tensor.<name> or aten's <name>."""
    if not hasattr(node, "op"):
        return False
    if node.op == "call_method":
        return node.target == name
    if node.op != "call_function":
        return False
    return getattr(node.target, "__name__", "") in (name, f"__{name}__") or \
        str(getattr(node.target, "_name", "")).startswith(f"aten::{name}")
