"""Find candidate MoE regions in a Dynamo graph.

A region is every node that ran inside one module instance (FX `nn_module_stack`) that
(a) selects experts with top-k (or with max + masked_fill: PhiMoE's sparsemixer) and (b) reads a stacked expert weight (a 3-D parameter
[E, ., .]). Among nested candidates the innermost wins, so a decoder layer containing an
MoE block yields the block. This covers transformers' SparseMoeBlock/MoE/MLP classes and
hand-written gpt-fast-style modules alike, without a list of class names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from moecc.capture.graph_utils import call_name, example_value, is_call, is_weight_node


@dataclass
class Region:
    key: str  # nn_module_stack key of the module
    path: str  # dotted module path, e.g. "model.layers.0.mlp"
    module_class: str
    nodes: list[fx.Node]  # graph order


def _stack(node: fx.Node) -> dict:
    return node.meta.get("nn_module_stack") or {}


def _clean_path(raw: str) -> str:
    # "L['self'].model.layers.0.mlp" -> "model.layers.0.mlp"
    for prefix in ("L['self'].", "L['self']", "L['fn'].", "self."):
        if raw.startswith(prefix):
            return raw[len(prefix):]
    return raw


def _is_stacked_weight(node: fx.Node) -> bool:
    v = example_value(node)
    return is_weight_node(node) and v is not None and hasattr(v, "dim") and v.dim() == 3


def find_moe_regions(graph: fx.Graph) -> list[Region]:
    paths: dict[str, tuple[str, str]] = {}
    with_topk: set[str] = set()
    with_experts: set[str] = set()
    with_max: set[str] = set()  # sparsemixer (PhiMoE) selects with max + masked_fill instead of topk
    with_masked_fill: set[str] = set()
    for n in graph.nodes:
        if n.op == "placeholder":
            continue
        stack = _stack(n)
        for key, (raw_path, cls) in stack.items():
            paths[key] = (_clean_path(str(raw_path)), getattr(cls, "__name__", str(cls)))
        if is_call(n, "topk"):
            with_topk.update(stack)
        if is_call(n, "max") and (len(n.args) > 1 or "dim" in n.kwargs):
            with_max.update(stack)
        if is_call(n, "masked_fill"):
            with_masked_fill.update(stack)
        if any(_is_stacked_weight(a) for a in n.all_input_nodes):
            with_experts.update(stack)
    candidates = (with_topk | (with_max & with_masked_fill)) & with_experts
    innermost = [
        k for k in candidates
        if not any(o != k and paths[o][0].startswith(paths[k][0] + ".") for o in candidates)
        and paths[k][0] != ""  # the whole model is never a layer
    ]
    regions = []
    for key in innermost:
        nodes = [n for n in graph.nodes if n.op != "placeholder" and key in _stack(n)]
        regions.append(Region(key, paths[key][0], paths[key][1], nodes))
    regions.sort(key=lambda r: min(_order(graph, n) for n in r.nodes))
    return regions


def without_trailing_submodule(region: Region) -> Region | None:
    """The region without a child module that runs last on the combined output (AXK1's
    `post_mlp_layernorm`), or None when there is no such tail.

    The tail stays in the graph after the moecc op, so capture can take the MoE part of a
    block that normalises its own output; verification then checks the shorter region.
    """
    last = region.nodes[-1]
    inner = [_clean_path(str(p)) for p, _ in _stack(last).values()]
    child = next((p for p in inner if p.startswith(region.path + ".")), None)
    if child is None:
        return None
    cut = len(region.nodes)
    while cut > 0 and any(_clean_path(str(p)) == child for p, _ in _stack(region.nodes[cut - 1]).values()):
        cut -= 1
    tail = region.nodes[cut:]
    if not tail or cut == 0 or any(is_call(n, "topk") or any(_is_stacked_weight(a) for a in n.all_input_nodes)
                                   for n in tail):
        return None
    return Region(region.key, region.path, region.module_class, region.nodes[:cut])


def find_unrouted_expert_modules(graph: fx.Graph, regions: list[Region]) -> list[tuple[str, str, str]]:
    """Modules that read stacked expert weights outside every region: their experts are
    used but no torch.topk selects them (e.g. PhiMoE's sparsemixer picks with max/argmax
    and masking). Returns (block path, block class, reason) per block, the block being
    the experts module's parent, so that a user can see and file the router variant."""
    covered = [r.path for r in regions]
    blocks: dict[str, tuple[str, set[str]]] = {}
    for n in graph.nodes:
        if n.op == "placeholder" or not any(_is_stacked_weight(a) for a in n.all_input_nodes):
            continue
        paths = [(_clean_path(str(p)), getattr(c, "__name__", str(c))) for p, c in _stack(n).values()]
        if not paths or any(p == r or p.startswith(r + ".") for p, _ in paths for r in covered):
            continue
        # only an experts module (by attribute or class name): other 3-D weights (convs) are not experts
        if not (paths[-1][0].endswith(".experts") or paths[-1][1].endswith("Experts")):
            continue
        parent = paths[-2] if len(paths) > 1 else paths[-1]
        blocks.setdefault(parent[0], (parent[1], set()))
    found = []
    for path, (cls, _) in blocks.items():
        # ops run by the block itself and its router, not inside the experts module
        ops = sorted({call_name(n) for n in graph.nodes if n.op != "placeholder"
                      and any(_clean_path(str(p)) == path for p, _ in _stack(n).values())
                      and not any(_clean_path(str(p)).startswith(path + ".experts") for p, _ in _stack(n).values())}
                     - {""})
        found.append((path, cls, "stacked expert weights are used here, but no torch.topk selects the experts: "
                      f"the router is a variant moecc does not recognise (block ops: {', '.join(ops[:16])})"))
    return found


def _order(graph: fx.Graph, node: fx.Node) -> int:
    for i, n in enumerate(graph.nodes):
        if n is node:
            return i
    return -1


def find_eager_experts_modules(graph: fx.Graph) -> list[str]:
    """Experts modules whose graph shows transformers' eager loop.

    The eager implementation builds a one_hot expert mask, sums it and asks which experts
    were hit (`greater(...).nonzero()`); Dynamo graph-breaks at `nonzero`, so the experts'
    weights never reach any graph. The graph holding the mask often comes from a resumed
    frame without module metadata, so the op signature (one_hot feeding greater) decides,
    and the module path is reported when known.
    """
    found = []
    for n in graph.nodes:
        if not is_call(n, "one_hot"):
            continue
        reach, frontier = set(), [n]
        while frontier:
            for u in frontier.pop().users:
                if u not in reach:
                    reach.add(u)
                    frontier.append(u)
        if not any(is_call(u, "greater", "gt") for u in reach):
            continue
        paths = [_clean_path(str(p)) for p, cls in _stack(n).values()
                 if getattr(cls, "__name__", "").endswith("Experts")]
        found.append(paths[-1] if paths else "<experts loop>")
    return sorted(set(found))
