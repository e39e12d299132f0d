"""Expert pruning: which experts to remove (the plan), and the eager model with them masked.

    config = parse_prune_config({"stats": "stats.json", "keep": 0.75, "criterion": "reap"})
    plan = plan_pruning(config.stats, config)          # per layer: removed expert ids
    with mask_experts(model, plan):                     # eager reference semantics
        logits = model(input_ids=ids).logits

The compile pass (passes/prune_experts.py) applies the same plan to the captured layers;
its result is defined as the eager model with the plan's experts masked: a masked expert
is never selected, everything else about routing (logits, normalisation, groups) stays.

Selection, per MoE layer of the statistics (moecc/routing_stats.py):
    criterion "reap"      lowest REAP score first (mean over the expert's routed tokens of
                          gate x expert-output norm, Lasby et al. 2025); "reap_sum": lowest
                          sum of the same over routed tokens (REAP x token count: the gate-
                          weighted output mass the layer loses, not the paper's score);
                          "frequency": fewest routed tokens first; "random": a seeded
                          permutation (the baseline the others are compared with).
    how many              round((1 - keep) * E), fewer where a constraint binds (noted):
                          at least top_k experts stay; with protect_super_experts an expert
                          whose largest intermediate activation exceeds SUPER_FACTOR x the
                          layer's median (moecc explain --routing's super-expert candidates;
                          Su et al. 2025) stays; with group-limited routing (DeepSeek) every
                          group keeps enough experts that the best topk_group groups always
                          hold top_k selectable experts (and two per group for top2_sum
                          group scores, which would otherwise become -inf).
Ties are broken by expert id, so a plan is a pure function of (statistics, config).
"""

from __future__ import annotations

import contextlib
import math
import statistics as pystats
import types
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from moecc.routing_report import SUPER_FACTOR
from moecc.routing_stats import LayerStats, RoutingStats, RoutingStatsError, load_stats

CRITERIA = ("reap", "reap_sum", "frequency", "random")
CONFIG_KEYS = ("stats", "keep", "max_loss", "data", "criterion", "protect_super_experts", "seed", "certified")


class PruningError(ValueError):
    """Pruning cannot be done as asked; the message names the problem and what to do."""


@dataclass(frozen=True)
class PruneConfig:
    """options["prune_experts"], validated. `stats` is loaded and checked here; it is None
    only with certified=True (remove the experts proven unreachable, nothing else)."""

    stats: Optional[RoutingStats] = field(compare=False, repr=False)
    keep: float = 1.0
    criterion: str = "reap"
    protect_super_experts: bool = True
    seed: int = 0
    stats_source: str = ""  # the path given, or "RoutingStats object"
    certified: bool = False  # also remove experts moecc.expert_certificates proves unreachable
    max_loss: Optional[float] = None  # nats per token: the pass chooses keep (moecc/pruning_budget.py)
    data: Any = field(default=None, compare=False, repr=False)  # max_loss's text path or token ids [N, W]


@dataclass(frozen=True)
class LayerPlan:
    """One layer: the experts to remove (router ids), and why fewer than asked if so."""

    name: str
    experts: int
    removed: tuple[int, ...]
    protected: tuple[int, ...] = ()
    note: str = ""

    @property
    def kept(self) -> tuple[int, ...]:
        gone = set(self.removed)
        return tuple(e for e in range(self.experts) if e not in gone)


@dataclass(frozen=True)
class PrunePlan:
    criterion: str
    keep: float
    layers: tuple[LayerPlan, ...]

    def layer(self, name: str) -> Optional[LayerPlan]:
        return next((lp for lp in self.layers if lp.name == name), None)

    @property
    def removed_experts(self) -> int:
        return sum(len(lp.removed) for lp in self.layers)

    def to_dict(self) -> dict:
        return {"criterion": self.criterion, "keep": self.keep,
                "layers": [{"name": lp.name, "experts": lp.experts, "removed": list(lp.removed),
                            "protected": list(lp.protected), "note": lp.note} for lp in self.layers]}


def parse_prune_config(value: Any) -> Optional[PruneConfig]:
    """None / a dict / a PruneConfig -> PruneConfig (or None); bad values raise PruningError."""
    if value is None or isinstance(value, PruneConfig):
        return value
    if not isinstance(value, dict):
        raise PruningError(f"expected a dict like {{'stats': 'stats.json', 'keep': 0.75}}, got {value!r}")
    unknown = sorted(set(value) - set(CONFIG_KEYS))
    if unknown:
        raise PruningError(f"unknown key(s) {unknown}; valid keys: {', '.join(CONFIG_KEYS)}")
    max_loss = value.get("max_loss")
    if max_loss is not None:
        if isinstance(max_loss, bool) or not isinstance(max_loss, (int, float)) or not math.isfinite(max_loss) \
                or max_loss <= 0:
            raise PruningError(f"'max_loss' is the allowed rise of the mean next-token loss in nats, > 0; "
                               f"got {max_loss!r}")
        if "keep" in value:
            raise PruningError("give 'keep' or 'max_loss', not both: with 'max_loss' the pass chooses keep")
        if "stats" not in value:
            raise PruningError("'max_loss' needs 'stats' (the experts are ranked by them)")
    data = value.get("data")
    if data is not None and not (isinstance(data, str) or (isinstance(data, torch.Tensor) and data.dim() == 2)):
        raise PruningError(f"'data' (for max_loss) must be a text file or folder, or token ids [N, W]; "
                           f"got {type(data).__name__}")
    certified = value.get("certified", False)
    if not isinstance(certified, bool):
        raise PruningError(f"'certified' must be True or False, got {certified!r}")
    if "stats" not in value:
        if certified and value.get("keep", 1.0) == 1.0:
            return PruneConfig(None, 1.0, certified=True, stats_source="certificates only")
        raise PruningError("'stats' is required (a statistics file from `moecc calibrate` or a RoutingStats), "
                           "unless only certified experts are removed: {'certified': True}")
    stats = value["stats"]
    if isinstance(stats, str):
        source = stats
        try:
            stats = load_stats(stats)
        except RoutingStatsError as exc:
            raise PruningError(str(exc)) from exc
    elif isinstance(stats, RoutingStats):
        source = "RoutingStats object"
        try:
            stats.validate("the RoutingStats given")
        except RoutingStatsError as exc:
            raise PruningError(str(exc)) from exc
    else:
        raise PruningError(f"'stats' must be a path or a moecc.RoutingStats, got {type(stats).__name__}")
    keep = value.get("keep", 1.0)
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not math.isfinite(keep) \
            or not 0 < keep <= 1:
        raise PruningError(f"'keep' is the fraction of experts kept per layer, in (0, 1]; got {keep!r}")
    criterion = value.get("criterion", "reap")
    if criterion not in CRITERIA:
        raise PruningError(f"'criterion' must be one of {', '.join(map(repr, CRITERIA))}; got {criterion!r}")
    if criterion in ("reap", "reap_sum") and any(layer.reap is None for layer in stats.layers):
        raise PruningError(f"{source}: no REAP scores (counts-only statistics, e.g. from SGLang); use "
                           "criterion 'frequency' or record with `moecc calibrate`")
    protect = value.get("protect_super_experts", True)
    if not isinstance(protect, bool):
        raise PruningError(f"'protect_super_experts' must be True or False, got {protect!r}")
    seed = value.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise PruningError(f"'seed' must be an int, got {seed!r}")
    return PruneConfig(stats, float(keep), criterion, protect, seed, source, certified,
                       None if max_loss is None else float(max_loss), data)


def super_experts(layer: LayerStats) -> list[int]:
    """Experts whose largest intermediate activation exceeds SUPER_FACTOR x the layer's median."""
    if layer.max_activation is None:
        return []
    median = pystats.median(layer.max_activation)
    return [e for e, a in enumerate(layer.max_activation) if median > 0 and a > SUPER_FACTOR * median]


def group_floor(n_group: int, topk_group: int, top_k: int, group_scoring: str = "top2_sum") -> int:
    """Experts every group must keep so that group-limited routing can always pick top_k."""
    if n_group <= 1:
        return 0
    return max(2 if group_scoring == "top2_sum" else 1, math.ceil(top_k / topk_group))


def plan_pruning(stats: RoutingStats, config: PruneConfig,
                 groups: Optional[dict[str, tuple[int, int]]] = None) -> PrunePlan:
    """The experts to remove per layer of `stats`.

    groups: {layer name: (n_group, experts each group must keep)} for group-limited
    routers (group_floor); layers not named have no groups.
    """
    layers = []
    for index, layer in enumerate(stats.layers):
        scores = _scores(layer, config, index)  # [E], low = removed first
        protected = super_experts(layer) if config.protect_super_experts else []
        n_group, floor = (groups or {}).get(layer.name, (1, 0))
        size = layer.experts // n_group
        live = [size] * n_group
        want = round((1.0 - config.keep) * layer.experts)
        limit = min(want, layer.experts - layer.top_k)
        removed = []
        for e in sorted(range(layer.experts), key=lambda e: (scores[e], e)):
            if len(removed) == limit:
                break
            if e in protected or live[e // size] <= floor:
                continue
            removed.append(e)
            live[e // size] -= 1
        note = ""
        if len(removed) < want:
            why = [f"top_k={layer.top_k} must stay"] if limit < want else []
            why += [f"super experts {protected} protected"] if protected else []
            why += [f"each of {n_group} groups keeps >= {floor}"] if n_group > 1 else []
            note = f"removed {len(removed)} of the {want} asked: {', '.join(why)}"
        layers.append(LayerPlan(layer.name, layer.experts, tuple(sorted(removed)), tuple(protected), note))
    return PrunePlan(config.criterion, config.keep, tuple(layers))


def _scores(layer: LayerStats, config: PruneConfig, index: int) -> list[float]:
    if config.criterion == "reap":
        return list(layer.reap)
    if config.criterion == "reap_sum":
        # Why a sum: the paper's mean ranks an expert routed 23 tokens with large outputs
        # above one routed 6,000 (docs/pruning.md, "REAP vs frequency"); the sum weighs
        # each expert's saliency by how often the layer needs it.
        return [r * c for r, c in zip(layer.reap, layer.counts)]
    if config.criterion == "frequency":
        return [float(c) for c in layer.counts]
    gen = torch.Generator().manual_seed(config.seed * 1000 + index)
    return torch.randperm(layer.experts, generator=gen).double().tolist()


# --- the eager reference: the model with the plan's experts masked -----------------------

def router_groups(model) -> dict[str, tuple[int, int]]:
    """{block name: (n_group, group floor)} of the model's group-limited routers."""
    from moecc.evaluate import moe_blocks

    out = {}
    for name, block in moe_blocks(model):
        n_group = int(getattr(block.gate, "num_group", getattr(block.gate, "n_group", 1)) or 1)
        if n_group > 1:
            out[name] = (n_group, group_floor(n_group, int(block.gate.topk_group), int(block.gate.top_k)))
    return out


def plan_for_model(model, config: PruneConfig) -> PrunePlan:
    """Check the statistics fit `model` (else PruningError) and plan with its router groups."""
    try:
        config.stats.check_model(model)
    except RoutingStatsError as exc:
        raise PruningError(str(exc)) from exc
    return plan_pruning(config.stats, config, router_groups(model))


@contextlib.contextmanager
def mask_experts(model, plan: PrunePlan):
    """Within the block, the eager `model` never selects the plan's removed experts.

    Routers with a score-correction bias (DeepSeek-V3's sigmoid router): the bias of a
    masked expert is -inf, so its selection score is -inf after normalisation and before
    group scoring, while the weights still come from the unbiased scores. Softmax top-k
    routers (Qwen3-MoE, Mixtral, Qwen2-MoE: `weight`, `top_k`, `norm_topk_prob`): the
    forward is replaced by the same computation with the masked probabilities set to -inf
    before top-k. Other routers raise PruningError. Everything is restored on exit.
    """
    from moecc.evaluate import moe_blocks

    blocks = dict(moe_blocks(model))
    undo = []
    try:
        for lp in plan.layers:
            if not lp.removed:
                continue
            if lp.name not in blocks:
                raise PruningError(f"the plan names layer {lp.name}, which this model does not have: "
                                   "the statistics were recorded on another model")
            gate = blocks[lp.name].gate
            if gate.weight.shape[0] != lp.experts:
                raise PruningError(f"{lp.name}: the plan is for {lp.experts} experts, the router has "
                                   f"{gate.weight.shape[0]}: the statistics were recorded on another model")
            masked = torch.tensor(lp.removed, dtype=torch.long, device=gate.weight.device)
            bias = getattr(gate, "e_score_correction_bias", None)
            if isinstance(bias, torch.Tensor):
                saved = bias.detach().clone()
                with torch.no_grad():
                    bias.index_fill_(0, masked.to(bias.device), float("-inf"))
                undo.append(lambda b=bias, s=saved: b.data.copy_(s))
            elif hasattr(gate, "norm_topk_prob") and hasattr(gate, "top_k"):
                gate.forward = types.MethodType(_masked_softmax_router(masked), gate)
                undo.append(lambda g=gate: delattr(g, "forward"))
            else:
                raise PruningError(f"{lp.name}: mask_experts does not know router {type(gate).__name__} "
                                   "(it handles score-correction-bias and softmax top-k routers)")
        yield model
    finally:
        for fn in reversed(undo):
            fn()


def _masked_softmax_router(masked: torch.Tensor):
    """transformers' softmax top-k router forward, masked experts never selected."""

    def forward(self, hidden_states):
        x = hidden_states.reshape(-1, self.weight.shape[1])  # [T, K]
        logits = torch.nn.functional.linear(x, self.weight)  # [T, E]
        probs = torch.softmax(logits, dtype=torch.float, dim=-1)  # [T, E]: all experts normalise
        choice = probs.index_fill(-1, masked, float("-inf"))
        ids = torch.topk(choice, self.top_k, dim=-1).indices  # [T, k]
        weights = probs.gather(1, ids)  # [T, k]
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights.to(logits.dtype), ids

    return forward


def expert_bytes(model) -> dict[str, int]:
    """{block name: bytes of one routed expert's weights} (gate_up + down, as stored)."""
    from moecc.evaluate import moe_blocks

    out = {}
    for name, block in moe_blocks(model):
        e = int(block.gate.weight.shape[0])
        tensors = [t for t in block.experts.parameters() if t.dim() >= 2 and t.shape[0] == e]
        out[name] = sum(t.numel() * t.element_size() for t in tensors) // e
    return out


def keep_for_max_loss(model, stats: RoutingStats, batches, max_loss: float, criterion: str = "reap",
                      candidates=(0.875, 0.75, 0.625, 0.5, 0.375, 0.25)) -> float:
    """The smallest keep among `candidates` whose mean next-byte loss on `batches` rises by at
    most `max_loss` (nats) over the unpruned model, trying them in order and stopping at the
    first miss; 1.0 if none fits. Eager and masked: the pass gives the same model."""
    def loss() -> float:
        total, count = 0.0, 0
        with torch.no_grad():
            for ids in batches:
                logits = model(input_ids=ids).logits[:, :-1].double()  # [B, W-1, V]
                total += float(torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"))
                count += ids[:, 1:].numel()
        return total / count

    base, best = loss(), 1.0
    for keep in candidates:
        config = parse_prune_config({"stats": stats, "keep": keep, "criterion": criterion})
        with mask_experts(model, plan_for_model(model, config)):
            if loss() - base > max_loss:
                break
        best = keep
    return best
