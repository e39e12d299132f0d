"""MLA absorb: multi-head latent attention over the cached latent -> moecc::mla_attention.

Matches: by structure, in the captured (torch-level) graph, not by module class:
             lin  = linear(latent [B,1,L,R], W [H*(Dn+Dv), R], bias=None)     # kv_b_proj
             kv   = lin.view(B, L, H, Dn+Dv).transpose(1, 2)
             k_nope, v = split(kv, [Dn, Dv], dim=-1)
             rope = rope_key [B,1,L,Dr].expand(-1, H, -1, -1)
             k    = [k_nope | rope]    (new_empty + two slice copy_, or torch.cat)
             out  = scaled_dot_product_attention(q [B,H,S,Dn+Dr], k, v, attn_mask, scale,
                                                 is_causal, dropout_p=0)
         which is how every transformers 5.x MLA module (DeepSeek-V2/V3, Kimi, GLM-4-MoE-Lite,
         LongCat, MiniCPM3, Mistral4, ... : their shared `expand_kv`) attends over its latent
         cache. The latent and rope key are whatever feeds the pattern: the static cache's
         tensors in a decode step, the fresh projections without a cache.
Needs:   nothing from the MoE passes (attention is outside MoE layers); runs after capture.
Does:    replaces the SDPA node by moecc::mla_attention(q, latent, rope_key, W, mask, scale,
         is_causal, Dn, Dv) (moecc/mla.py: absorbed form for decode, expanded for prefill,
         the cache cut to its live length on the CPU) and erases the expansion (kv_b_proj
         over the cache, the K/V temporaries). o_proj stays as it was. W is the parameter
         itself: the op takes two views of it, no copy. Off with options={"kv_rewrite": False}.
Declines: attention whose value comes from a kv_b_proj-like linear over a 4-D latent but
         where anything else differs (bias, dropout, repeated KV heads, a K/V used outside
         the attention, the cache mutated in between, mixed dtypes, ...), and an expanded
         latent attended other than by SDPA (attn_implementation "eager"): left exactly as
         it was, the reason in the pass notes (CompileReport, `moecc explain`).
Guarantees: the same attention as SDPA over the expanded K/V; the arithmetic order differs
         (fp32 ~1e-6 relative, bf16 within its tolerance; tests/test_mla*.py).
Counters: rewritten, declined, other_attention (SDPA that is not MLA: not this pass's).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.fx as fx
import torch.nn.functional as F

from moecc.capture.graph_utils import example_value, is_weight_node
from moecc.capture.report import PassResult
from moecc.passes.context import PassContext

NAME = "mla_absorb"
_SDPA = (torch._C._nn.scaled_dot_product_attention, F.scaled_dot_product_attention)
_LINEAR = (torch._C._nn.linear, F.linear)
_SPLIT = (torch.split, torch.functional.split, torch.Tensor.split)
_CAT = (torch.cat, torch.concat)
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


@dataclass
class _Match:
    query: fx.Node
    latent: fx.Node
    rope_key: fx.Node
    weight: fx.Node
    mask: Optional[fx.Node]
    scale: float
    is_causal: bool
    nope: int
    value: int
    heads: int
    rank: int
    rope: int
    pattern: list[fx.Node]  # the expansion nodes, erased once the SDPA is replaced


def _is(node, op: str, targets=None, method: Optional[str] = None) -> bool:
    if not isinstance(node, fx.Node) or node.op != op:
        return False
    return node.target in targets if targets is not None else node.target == method


def _sdpa_args(node: fx.Node) -> dict:
    bound = dict(zip(_SDPA_ARGS, node.args))
    bound.update(node.kwargs)
    return bound


def _shape(node) -> Optional[tuple]:
    v = example_value(node) if isinstance(node, fx.Node) else None
    if not isinstance(v, torch.Tensor) or any(not isinstance(d, int) for d in v.shape):
        return None  # symbolic sizes: not matched (the static cache has none)
    return tuple(v.shape)


def _dtype(node) -> Optional[torch.dtype]:
    v = example_value(node)
    return v.dtype if isinstance(v, torch.Tensor) else None


def _split_parts(split: fx.Node) -> Optional[tuple[fx.Node, list, int]]:
    """(input, sizes, dim) of a torch.split / Tensor.split node."""
    if _is(split, "call_function", _SPLIT) or _is(split, "call_method", method="split"):
        args = list(split.args) + [None] * 3
        src, sizes = args[0], split.kwargs.get("split_size_or_sections", split.kwargs.get("split_size", args[1]))
        dim = split.kwargs.get("dim", args[2] if args[2] is not None else 0)
        return src, sizes, dim
    return None


def _getitem(node, index: int) -> Optional[fx.Node]:
    """The split node `node` is item `index` of, or None."""
    if _is(node, "call_function", (operator.getitem,)) and node.args[1] == index:
        return node.args[0]
    return None


def _key_parts(k: fx.Node, nope: int) -> Union[tuple[fx.Node, fx.Node, list[fx.Node]], str]:
    """(k_nope source, rope source, nodes) of k = [k_nope | rope], or why not."""
    if _is(k, "call_function", _CAT):
        parts = k.args[0] if k.args else k.kwargs.get("tensors")
        dim = k.kwargs.get("dim", k.args[1] if len(k.args) > 1 else 0)
        if not isinstance(parts, (list, tuple)) or len(parts) != 2 or dim not in (-1, 3):
            return "the key is a concatenation other than [k_nope | rope] on the last dim"
        if len(k.users) != 1:
            return "the expanded key is used outside the attention"
        return parts[0], parts[1], [k]
    if not _is(k, "call_method", method="new_empty"):
        return "the key is not [k_nope | rope] of the expanded latent (repeated KV heads or another layout)"
    sources, nodes = {}, [k]
    for user in k.users:
        if _is(user, "call_function", _SDPA):
            continue
        if not _is(user, "call_function", (operator.getitem,)) or len(user.users) != 1:
            return "the expanded key buffer is used outside the attention"
        copy = next(iter(user.users))
        if not _is(copy, "call_method", method="copy_") or copy.args[0] is not user or copy.users:
            return "the expanded key buffer is written other than by two slice copies"
        index = user.args[1]
        if index == (Ellipsis, slice(None, nope, None)):
            sources["nope"] = copy.args[1]
        elif index == (Ellipsis, slice(nope, None, None)):
            sources["rope"] = copy.args[1]
        else:
            return f"the expanded key buffer is filled at {index!r}, not [:{nope}] and [{nope}:]"
        nodes += [user, copy]
    if set(sources) != {"nope", "rope"}:
        return "the expanded key buffer is not filled as [k_nope | rope]"
    return sources["nope"], sources["rope"], nodes


def _match(n: fx.Node, graph_order: dict) -> Union[_Match, str, None]:
    """An MLA attention at SDPA node `n`, a reason it is declined, or None (not MLA)."""
    a = _sdpa_args(n)
    q, k, v = a.get("query"), a.get("key"), a.get("value")
    split = _getitem(v, 1)
    parts = _split_parts(split) if split is not None else None
    if parts is None:
        return None
    kv, sizes, dim = parts
    view = kv.args[0] if _is(kv, "call_method", method="transpose") else None
    lin = view.args[0] if _is(view, "call_method", method="view") or _is(view, "call_method", method="reshape") else None
    if not _is(lin, "call_function", _LINEAR):
        return None
    latent, weight = lin.args[0], lin.args[1]
    latent_shape, weight_shape = _shape(latent), _shape(weight)
    if latent_shape is None or len(latent_shape) != 4 or latent_shape[1] != 1:
        return None  # not a single-head latent [B, 1, L, R]: some other fused projection
    # From here on it is MLA-shaped: every mismatch is declined with its reason.
    bias = lin.kwargs.get("bias", lin.args[2] if len(lin.args) > 2 else None)
    if bias is not None:
        return "kv_b_proj has a bias"
    if not is_weight_node(weight) or weight_shape is None or len(weight_shape) != 2:
        return "kv_b_proj's weight is not a 2-D parameter"
    if not isinstance(sizes, (list, tuple)) or len(sizes) != 2 or dim not in (-1, 3):
        return f"the expanded latent is split as {sizes!r} on dim {dim}, not [nope, value] on the last"
    if set(kv.args[1:]) != {1, 2}:
        return "the expanded latent is not transposed to [B, H, L, .]"
    nope, value = int(sizes[0]), int(sizes[1])
    b, _, l, r = latent_shape
    heads = weight_shape[0] // (nope + value)
    if weight_shape != (heads * (nope + value), r) or _shape(view) != (b, l, heads, nope + value):
        return f"kv_b_proj {weight_shape} does not expand the latent into H x (nope {nope} + value {value})"
    key = _key_parts(k, nope)
    if isinstance(key, str):
        return key
    k_nope, rope_expand, key_nodes = key
    if _getitem(k_nope, 0) is not split:
        return "the key's nope part is not the expanded latent's first split"
    if not (_is(rope_expand, "call_method", method="expand") and len(rope_expand.users) == 1):
        return "the key's rope part is not the shared rope key broadcast over the heads"
    rope_key = rope_expand.args[0]
    rope_shape, q_shape = _shape(rope_key), _shape(q)
    if rope_shape is None or len(rope_shape) != 4 or rope_shape[:3] != (b, 1, l):
        return f"the rope key {rope_shape} is not [B, 1, L, Dr] beside the latent {latent_shape}"
    rope = rope_shape[3]
    if q_shape is None or len(q_shape) != 4 or q_shape[0] != b or q_shape[1] != heads or q_shape[3] != nope + rope:
        return f"the query {q_shape} is not [B, H={heads}, S, {nope}+{rope}]"
    if a.get("dropout_p", 0.0) != 0.0:
        return "attention dropout is on"
    if a.get("enable_gqa", False):
        return "SDPA is asked for grouped-query attention (repeated KV heads)"
    is_causal, scale, mask = a.get("is_causal", False), a.get("scale"), a.get("attn_mask")
    if not isinstance(is_causal, bool) or not (scale is None or isinstance(scale, (int, float))):
        return "the attention's scale or causal flag is not a constant"
    if mask is not None and not isinstance(mask, fx.Node):
        return "the attention mask is not a tensor"
    dtypes = {_dtype(x) for x in (q, latent, rope_key, weight)}
    if len(dtypes) != 1:
        return f"query, latent, rope key and kv_b_proj differ in dtype ({sorted(map(str, dtypes))})"
    getitems = list(split.users)
    pattern = [lin, view, kv, split, *getitems, rope_expand, *key_nodes]
    users_ok = (len(lin.users) == 1 and len(view.users) == 1 and all(len(g.users) == 1 for g in getitems)
                and len(v.users) == 1 and set(kv.users) <= {split, k})
    if not users_ok:
        return "the expanded K/V is used outside the attention"
    lo, hi = graph_order[lin], graph_order[n]
    for node in n.graph.nodes:
        if lo < graph_order[node] < hi and node.op == "call_method" and str(node.target).endswith("_") \
                and node.args and node.args[0] in (latent, rope_key) :
            return f"the latent cache is written ({node.target}) between its expansion and the attention"
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(nope + rope)
    return _Match(q, latent, rope_key, weight, mask, scale, is_causal, nope, value, heads, r, rope, pattern)


def _value_chain(sdpa: fx.Node) -> list[fx.Node]:
    """The nodes feeding SDPA's value back to the linear (getitem, split, ..., linear)."""
    chain, node = [], _sdpa_args(sdpa).get("value")
    while isinstance(node, fx.Node) and node.op in ("call_function", "call_method") and len(chain) < 6:
        chain.append(node)
        if _is(node, "call_function", _LINEAR):
            break
        node = node.args[0] if node.args else None
    return chain


def _unmatched_expansions(graph: fx.Graph) -> list[fx.Node]:
    """kv_b_proj-like linears over a [B, 1, L, R] latent, viewed per head and split, that
    are still in the graph: MLA whose attention is not SDPA (e.g. attn_implementation
    "eager"'s matmul-softmax-matmul), which this pass does not rewrite."""
    found = []
    for lin in graph.nodes:
        if not _is(lin, "call_function", _LINEAR) or len(lin.users) != 1:
            continue
        shape = _shape(lin.args[0])
        view = next(iter(lin.users))
        if shape is None or len(shape) != 4 or shape[1] != 1 or not (
                _is(view, "call_method", method="view") or _is(view, "call_method", method="reshape")):
            continue
        kv = next(iter(view.users), None)
        if _is(kv, "call_method", method="transpose") and any(_split_parts(u) for u in kv.users):
            found.append(lin)
    return found


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return node.name
    raw = str(list(stack.values())[-1][0])
    for prefix in ("L['self'].", "L['self']", "self."):
        if raw.startswith(prefix):
            return raw[len(prefix):]
    return raw


def _replace(gm: fx.GraphModule, n: fx.Node, m: _Match) -> None:
    op = torch.ops.moecc.mla_attention.default
    with gm.graph.inserting_before(n):
        new = gm.graph.call_function(op, (m.query, m.latent, m.rope_key, m.weight, m.mask, m.scale,
                                          m.is_causal, m.nope, m.value))
    new.meta.update({k: v for k, v in n.meta.items() if k in ("example_value", "val", "nn_module_stack",
                                                                "stack_trace", "source_fn_stack")})
    n.replace_all_uses_with(new)
    gm.graph.erase_node(n)
    # Erase the expansion, last users first (the copies into the key buffer, then upwards).
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    for node in sorted(m.pattern, key=order.__getitem__, reverse=True):
        if not node.users:
            gm.graph.erase_node(node)


def run(ctx: PassContext) -> PassResult:
    counters = {"rewritten": 0, "declined": 0, "other_attention": 0}
    notes: list[str] = []
    if not ctx.options.kv_rewrite:
        return PassResult(NAME, counters, ["off (options kv_rewrite=False)"])
    import moecc.mla  # noqa: F401  (defines moecc::mla_attention)

    graph = ctx.gm.graph
    order = {node: i for i, node in enumerate(graph.nodes)}
    widths = set()
    seen: set[fx.Node] = set()
    for n in [node for node in graph.nodes if _is(node, "call_function", _SDPA)]:
        seen.update(_value_chain(n))
        found = _match(n, order)
        if found is None:
            counters["other_attention"] += 1
        elif isinstance(found, str):
            counters["declined"] += 1
            notes.append(f"{_module_path(n)}: MLA attention left as it was: {found}")
        else:
            _replace(ctx.gm, n, found)
            counters["rewritten"] += 1
            widths.add(f"H={found.heads} R={found.rank} nope={found.nope} rope={found.rope} v={found.value}")
            order = {node: i for i, node in enumerate(graph.nodes)}
    for lin in _unmatched_expansions(graph):
        if lin in seen:
            continue  # an SDPA over it was declined above, with its reason
        counters["declined"] += 1
        notes.append(f"{_module_path(lin)}: MLA attention left as it was: the expanded latent is not attended "
                     "by scaled_dot_product_attention (attn_implementation 'eager'?); only the SDPA form is rewritten")
    for w in sorted(widths):
        notes.append(f"MLA over the latent cache ({w}): absorbed for decode, expanded for prefill")
    return PassResult(NAME, counters, notes)
