"""GQA decode: attention over repeated KV heads -> moecc::gqa_decode_attention.

Matches: by structure, in the captured (torch-level) graph, not by module class:
           rep(x) = x[:, :, None].expand(B, Hkv, G, L, D).reshape(B, Hkv*G, L, D)   # repeat_kv
         SDPA form (attn_implementation "sdpa": Qwen3-MoE, Mixtral, Qwen2-MoE, OLMoE, ...):
           out = scaled_dot_product_attention(q, rep(k), rep(v), attn_mask, dropout_p=0,
                                              scale, is_causal)
           out = scaled_dot_product_attention(q, k, v, ..., enable_gqa=True)
           out = scaled_dot_product_attention(q, k, v, ...) with Hq == Hkv and k, v graph
                 inputs (multi-head attention straight over a static cache: G = 1)
         eager form (attn_implementation "eager": GPT-OSS, whose model has no SDPA path):
           w = matmul(q, rep(k).transpose(2, 3)) * scale [+ attn_mask]
           [w = cat([w, sinks.reshape(1, -1, 1, 1).expand(..)], -1); w = w - w.max(-1)]   # sinks
           p = softmax(w, -1)[..., :-1 if sinks]  [-> dropout(p=0 | eval)] [-> .to(dtype)]
           out = matmul(p, rep(v))
         k and v are whatever feeds repeat_kv: the static cache's tensors in a decode step.
Needs:   runs after mla_absorb (MLA attention, already replaced there, is not GQA).
Does:    replaces the attention's output node by moecc::gqa_decode_attention(q, k, v, mask,
         sinks, scale, is_causal) (moecc/gqa.py: the cache read in place, no repeated heads,
         on the CPU only the slots the mask lets any query see) and erases the repeat_kv
         copies and the eager chain. Off with options={"kv_rewrite": False}.
Declines: attention over repeated K/V where anything else differs (dropout, a non-constant
         scale, mixed dtypes, symbolic shapes, the cache written between repeat_kv and the
         attention, K and V repeated differently, the attention weights used elsewhere,
         ...): left exactly as it was, the reason in the pass notes (CompileReport,
         `moecc explain`).
Guarantees: the same attention (the arithmetic order differs: fp32 ~1e-6 relative, bf16
         within its tolerance; tests/test_gqa*.py).
Counters: rewritten, declined, other_attention (SDPA that is none of the forms above).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.fx as fx
import torch.nn.functional as F

from moecc.capture.graph_utils import is_weight_node
from moecc.capture.report import PassResult
from moecc.passes.context import PassContext
# The attention passes share their small graph helpers (one definition each).
from moecc.passes.mla_absorb import _SDPA, _dtype, _is, _module_path, _sdpa_args, _shape

NAME = "gqa_decode"
_REPEAT_INDEX = (slice(None), slice(None), None, slice(None), slice(None))
_MATMUL = (torch.matmul, torch.Tensor.matmul, operator.matmul)
_SOFTMAX = (F.softmax, torch.softmax, torch.Tensor.softmax)
_CAT = (torch.cat, torch.concat)
_DROPOUT = (F.dropout, torch.dropout)


@dataclass
class _Match:
    out: fx.Node  # the attention's output node, replaced by the op
    query: fx.Node
    key: fx.Node  # [B, Hkv, L, D]: the cache as it is
    value: fx.Node
    mask: Optional[fx.Node]
    sinks: Optional[fx.Node]
    scale: float
    is_causal: bool
    groups: int
    pattern: list[fx.Node]  # nodes erased once unused (repeat_kv copies, the eager chain)


@dataclass
class _Repeat:
    source: fx.Node  # [B, Hkv, L, D]
    groups: int
    nodes: list[fx.Node]


def _repeat_kv(node) -> Optional[_Repeat]:
    """x[:, :, None].expand(B, Hkv, G, L, D).reshape(B, Hkv*G, L, D), or None."""
    if not (_is(node, "call_method", method="reshape") or _is(node, "call_method", method="view")):
        return None
    expand = node.args[0]
    if not _is(expand, "call_method", method="expand"):
        return None
    item = expand.args[0]
    if not _is(item, "call_function", (operator.getitem,)) or item.args[1] != _REPEAT_INDEX:
        return None
    src = item.args[0]
    s_src, s_exp, s_out = _shape(src), _shape(expand), _shape(node)
    if s_src is None or s_exp is None or s_out is None or len(s_src) != 4:
        return None
    b, hkv, l, d = s_src
    g = s_exp[2]
    if s_exp != (b, hkv, g, l, d) or s_out != (b, hkv * g, l, d):
        return None
    return _Repeat(src, g, [node, expand, item])


def _is_cache_input(node) -> bool:
    """A graph input that is not a parameter (a static cache's tensor passed in)."""
    return isinstance(node, fx.Node) and node.op == "placeholder" and not is_weight_node(node)


def _mutated_between(src: fx.Node, first: fx.Node, last: fx.Node, order: dict) -> Optional[str]:
    """The in-place op writing `src` between `first` and `last`, if any."""
    lo, hi = order[first], order[last]
    for user in src.users:
        name = str(getattr(user.target, "__name__", user.target))
        if lo < order[user] < hi and name.endswith("_") and not name.endswith("__") and user.args[:1] == (src,):
            return name
    return None


def _kv_sources(key, value, query, enable_gqa: bool) -> Union[tuple[fx.Node, fx.Node, int, list], str, None]:
    """(k cache, v cache, G, repeat nodes) behind an attention's K/V, a reason, or None."""
    rk, rv = _repeat_kv(key), _repeat_kv(value)
    if rk is not None or rv is not None:
        if rk is None or rv is None:
            return "only one of K and V goes through repeat_kv"
        if rk.groups != rv.groups:
            return f"K and V are repeated differently ({rk.groups} vs {rv.groups})"
        if enable_gqa:
            return "SDPA is asked for grouped-query attention over already repeated K/V"
        return rk.source, rv.source, rk.groups, rk.nodes + rv.nodes
    qs, ks = _shape(query), _shape(key)
    if enable_gqa:
        if qs is None or ks is None or len(qs) != 4 or len(ks) != 4 or ks[1] == 0 or qs[1] % ks[1]:
            return f"SDPA's enable_gqa with query {qs} and key {ks} that are not [B, Hkv*G, S, D] / [B, Hkv, L, D]"
        return key, value, qs[1] // ks[1], []
    if _is_cache_input(key) and _is_cache_input(value) and qs is not None and ks is not None and qs[1:2] == ks[1:2]:
        return key, value, 1, []  # multi-head attention straight over a static cache
    return None


def _common_checks(q, k, v, mask, scale, groups) -> Optional[str]:
    qs, ks, vs = _shape(q), _shape(k), _shape(v)
    if qs is None or ks is None or vs is None:
        return "symbolic (dynamic) shapes"
    if len(qs) != 4 or len(ks) != 4 or len(vs) != 4 or qs[1] != ks[1] * groups or vs[:3] != ks[:3] \
            or qs[3] != ks[3] or qs[0] != ks[0]:
        return f"query {qs}, key {ks}, value {vs} are not [B, Hkv*G, S, D], [B, Hkv, L, D], [B, Hkv, L, Dv]"
    if not (scale is None or isinstance(scale, (int, float))):
        return "the attention's scale is not a constant"
    if mask is not None and not isinstance(mask, fx.Node):
        return "the attention mask is not a tensor"
    dtypes = {_dtype(x) for x in (q, k, v)}
    if len(dtypes) != 1:
        return f"query, key and value differ in dtype ({sorted(map(str, dtypes))})"
    return None


def _match_sdpa(n: fx.Node, order: dict) -> Union[_Match, str, None]:
    a = _sdpa_args(n)
    q = a.get("query")
    found = _kv_sources(a.get("key"), a.get("value"), q, bool(a.get("enable_gqa", False)))
    if found is None or isinstance(found, str):
        return found
    k, v, groups, nodes = found
    if a.get("dropout_p", 0.0) != 0.0:
        return "attention dropout is on"
    is_causal, scale, mask = a.get("is_causal", False), a.get("scale"), a.get("attn_mask")
    if not isinstance(is_causal, bool):
        return "the attention's causal flag is not a constant"
    if is_causal and mask is not None:
        return "both a mask and is_causal"
    reason = _common_checks(q, k, v, mask, scale, groups)
    if reason:
        return reason
    for src, first in ((k, nodes[2] if nodes else None), (v, nodes[5] if nodes else None)):
        written = first is not None and _mutated_between(src, first, n, order)
        if written:
            return f"the cache is written ({written}) between repeat_kv and the attention"
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(_shape(q)[3])
    return _Match(n, q, k, v, mask, None, scale, is_causal, groups, nodes)


def _arg(node: fx.Node, index: int, name: str, default=None):
    return node.kwargs.get(name, node.args[index] if len(node.args) > index else default)


def _match_eager(out: fx.Node, order: dict) -> Union[_Match, str, None]:
    """The eager chain ending in `out = matmul(p, repeat_kv(v))`, or why not."""
    if not _is(out, "call_function", _MATMUL) and not _is(out, "call_method", method="matmul"):
        return None
    if len(out.args) != 2:
        return None
    rv = _repeat_kv(out.args[1])
    if rv is None:
        return None  # not attention over repeated values: not this pass's business
    chain = [out]
    p = out.args[0]
    while _is(p, "call_method", method="to") or _is(p, "call_function", _DROPOUT):  # in either order
        if _is(p, "call_function", _DROPOUT) and _arg(p, 1, "p", 0.5) != 0.0 \
                and _arg(p, 2, "training", True) is not False:
            return "attention dropout is on"
        chain.append(p)
        p = p.args[0]
    sink_cut = None
    if _is(p, "call_function", (operator.getitem,)) and p.args[1] == (Ellipsis, slice(None, -1, None)):
        sink_cut, p = p, p.args[0]
        chain.append(sink_cut)
    if not (_is(p, "call_function", _SOFTMAX) or _is(p, "call_method", method="softmax")) \
            or _arg(p, 1, "dim") not in (-1, 3):
        return "the attention over repeated K/V is not softmax(scores, -1) @ V"
    if len(p.users) != 1:
        return "the attention weights are used outside the attention (output_attentions?)"
    chain.append(p)
    w, sinks = p.args[0], None
    if sink_cut is not None:  # GPT-OSS: w - max(w) over [scores | sink]
        if not (_is(w, "call_function", (operator.sub,)) and _is(w.args[1], "call_function", (operator.getitem,))):
            return "the sink logits are not joined as transformers' GPT-OSS attention does"
        mx = w.args[1].args[0]
        cat = w.args[0]
        if not (_is(mx, "call_method", method="max") and mx.args[0] is cat and _is(cat, "call_function", _CAT)):
            return "the sink logits are not joined as transformers' GPT-OSS attention does"
        chain += [w, w.args[1], mx, cat]
        parts = cat.args[0]
        if _arg(cat, 1, "dim", 0) not in (-1, 3) or not isinstance(parts, (list, tuple)) or len(parts) != 2:
            return "the sink logits are not one column after the scores"
        w, sink_expand = parts
        sink_reshape = sink_expand.args[0] if _is(sink_expand, "call_method", method="expand") else None
        if not _is(sink_reshape, "call_method", method="reshape") or not is_weight_node(sink_reshape.args[0]):
            return "the sink logits are not a per-head parameter"
        sinks = sink_reshape.args[0]
        chain += [sink_expand, sink_reshape]
    mask = None
    if _is(w, "call_function", (operator.add,)):
        chain.append(w)
        w, mask = w.args
    if not _is(w, "call_function", (operator.mul,)) or not isinstance(w.args[1], (int, float)):
        return "the scores are not matmul(q, K^T) * constant scale"
    scale = float(w.args[1])
    mm = w.args[0]
    chain.append(w)
    if not (_is(mm, "call_function", _MATMUL) or _is(mm, "call_method", method="matmul")) or len(mm.args) != 2:
        return "the scores are not matmul(q, K^T) * constant scale"
    q, kt = mm.args
    chain += [mm, kt]
    if not (_is(kt, "call_method", method="transpose") and set(kt.args[1:]) in ({2, 3}, {-2, -1})):
        return "the scores are not q @ K.transpose(2, 3)"
    rk = _repeat_kv(kt.args[0])
    if rk is None or rk.groups != rv.groups:
        return "K is not repeated like V"
    reason = _common_checks(q, rk.source, rv.source, mask, scale, rk.groups)
    if reason:
        return reason
    sink_shape = _shape(sinks) if sinks is not None else None
    if sinks is not None and sink_shape != (_shape(q)[1],):
        return f"the sink logits {sink_shape} are not one per query head"
    for rep in (rk, rv):
        written = _mutated_between(rep.source, rep.nodes[2], out, order)
        if written:
            return f"the cache is written ({written}) between repeat_kv and the attention"
    return _Match(out, q, rk.source, rv.source, mask, sinks, scale, False, rk.groups, chain + rk.nodes + rv.nodes)


def _replace(gm: fx.GraphModule, m: _Match) -> None:
    op = torch.ops.moecc.gqa_decode_attention.default
    with gm.graph.inserting_before(m.out):
        new = gm.graph.call_function(op, (m.query, m.key, m.value, m.mask, m.sinks, m.scale, m.is_causal))
    new.meta.update({k: v for k, v in m.out.meta.items() if k in ("example_value", "val", "nn_module_stack",
                                                                    "stack_trace", "source_fn_stack")})
    m.out.replace_all_uses_with(new)
    gm.graph.erase_node(m.out)
    changed = True
    while changed:  # erase the chain, last users first; whatever is still used stays
        changed = False
        for node in list(m.pattern):
            if node is not m.out and not node.users:
                gm.graph.erase_node(node)
                m.pattern.remove(node)
                changed = True


def run(ctx: PassContext) -> PassResult:
    counters = {"rewritten": 0, "declined": 0, "other_attention": 0}
    notes: list[str] = []
    if not ctx.options.kv_rewrite:
        return PassResult(NAME, counters, ["off (options kv_rewrite=False)"])
    import moecc.gqa  # noqa: F401  (defines moecc::gqa_decode_attention)

    graph = ctx.gm.graph
    shapes = set()
    order = {node: i for i, node in enumerate(graph.nodes)}
    for n in list(graph.nodes):
        if n not in order or n.op != "call_function":
            continue  # erased by an earlier rewrite
        if _is(n, "call_function", _SDPA):
            found = _match_sdpa(n, order)
            form = "sdpa"
        else:
            found = _match_eager(n, order)
            form = "eager"
        if found is None:
            counters["other_attention"] += form == "sdpa"
        elif isinstance(found, str):
            counters["declined"] += 1
            notes.append(f"{_module_path(n)}: GQA attention left as it was: {found}")
        else:
            _replace(ctx.gm, found)
            counters["rewritten"] += 1
            order = {node: i for i, node in enumerate(graph.nodes)}
            qs, ks = _shape(found.query), _shape(found.key)
            shapes.add(f"{form}: Hq={qs[1]} Hkv={ks[1]} D={qs[3]} L={ks[2]}{' sinks' if found.sinks else ''}")
    for s in sorted(shapes):
        notes.append(f"GQA over the KV cache in place ({s})")
    return PassResult(NAME, counters, notes)
