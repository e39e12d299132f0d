"""Routing statistics of an eager MoE model on calibration text: who gets tokens, how much
each expert matters, which experts fire together.

    stats = record_routing(model, batches)          # batches: [B, W] input-id tensors
    stats.save("stats.json"); stats = load_stats("stats.json"); stats.check_model(model)

Per MoE layer and routed expert: token counts (token-expert pairs routed to it), summed
gate weight, the REAP score (Lasby et al. 2025, router-weighted expert activation pruning:
mean over the tokens routed to the expert of gate weight x L2 norm of the expert's output
for that token; 0 for an unused expert), the largest |activation| seen in the expert's
intermediate (the input of its down projection: "super experts", Su et al. 2025, show
massive activations there) and co-activation counts (how often two experts are selected
for the same token). These feed `moecc explain --routing`, `moecc plan-placement` and the
pruning pass that will follow (issue 12).

How routing is observed: the mechanism of `moecc eval` (moecc/evaluate.py): a forward
pre-hook keeps each MoE block's input and the block's own router (`block.gate(x)` ->
logits, weights, indices) is re-run on it; the gate weights are the router's final ones
(after renormalisation and any routed scaling factor), as the layer applies them. Expert
outputs are recomputed from the experts module's weights (transformers 5 layout:
`gate_up_proj [E, 2N, K]` = [gate; up], `down_proj [E, K, N]`, `act_fn`); other layouts
(GPT-OSS's transposed, biased experts) are refused with a message. Shared experts are not
routed and not recorded.

File format (JSON, `format` "moecc-routing-stats", `schema_version` 1): a model
fingerprint (model_type, decoder layer count, MoE layer names, experts per layer, top-k),
the layers, and at top level `logical_count` [1, num_hidden_layers, E]: the array SGLang's
expert-distribution recorder dumps in "stat" mode (its `dump_record`: `logical_count` of
shape [buffered steps, layers, logical experts]; dense layers are zero rows) and that its
`--init-expert-location FILE.json` reads, so a moecc file seeds SGLang's EPLB directly and
`RoutingStats.from_sglang` turns an SGLang dump into counts-only statistics. docs/routing.md
documents the mapping.

Shapes: T tokens of a batch (B windows x W bytes), D hidden size (= K), E routed experts,
k experts per token, N expert intermediate size.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field

import torch

FORMAT = "moecc-routing-stats"
SCHEMA_VERSION = 1


class RoutingStatsError(ValueError):
    """Statistics that cannot be used (bad file, other model); the message says what to do."""


@dataclass
class LayerStats:
    """One MoE layer's routing. Lists are per expert; coactivation is [E, E]."""

    name: str                        # module path, e.g. "model.layers.1.mlp"
    layer_index: int                 # decoder layer index (SGLang's layer axis)
    experts: int
    top_k: int
    tokens: int                      # tokens routed through this layer
    counts: list[int]                # token-expert pairs per expert; sums to tokens * top_k
    gate_weight_sum: list[float] | None = None
    reap: list[float] | None = None  # mean of gate * ||expert output|| over routed tokens; 0 if unused
    max_activation: list[float] | None = None  # max |act(gate) * up| seen, 0 if unused
    coactivation: list[list[int]] | None = None  # tokens selecting both experts; symmetric, zero diagonal

    def load(self) -> list[float]:
        """Share of this layer's token-expert pairs per expert."""
        total = sum(self.counts)
        return [c / total if total else 0.0 for c in self.counts]


@dataclass
class ModelFingerprint:
    """What statistics must match to be used on a model."""

    model_type: str
    num_hidden_layers: int
    moe_layers: list[str]
    experts: list[int]   # per MoE layer
    top_k: list[int]     # per MoE layer


@dataclass
class RoutingStats:
    fingerprint: ModelFingerprint
    layers: list[LayerStats]
    data: str = ""                    # what the statistics were recorded on
    source: str = "moecc"             # "moecc" (record_routing) or "sglang" (counts only)
    extra: dict = field(default_factory=dict)

    # --- file format -------------------------------------------------------------------
    def sglang_logical_count(self) -> list[list[list[int]]]:
        """[1, num_hidden_layers, E]: SGLang's stat-mode `logical_count` (dense layers zero)."""
        width = max(self.fingerprint.experts)
        rows = [[0] * width for _ in range(self.fingerprint.num_hidden_layers)]
        for layer in self.layers:
            rows[layer.layer_index] = list(layer.counts) + [0] * (width - layer.experts)
        return [rows]

    def to_dict(self) -> dict:
        return {"format": FORMAT, "schema_version": SCHEMA_VERSION, "source": self.source, "data": self.data,
                "fingerprint": asdict(self.fingerprint), "logical_count": self.sglang_logical_count(),
                "layers": [asdict(layer) for layer in self.layers], "extra": self.extra}

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f)
            f.write("\n")

    def to_sglang(self) -> dict:
        """What SGLang's stat-mode `dump_record` returns (`output_mode="object"`)."""
        return {"rank": 0, "logical_count": torch.tensor(self.sglang_logical_count()),
                "average_utilization_rate_over_window": None}

    @classmethod
    def from_dict(cls, raw, where: str = "statistics") -> "RoutingStats":
        """Validate and build; every problem is a RoutingStatsError naming `where` and the field."""
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise RoutingStatsError(f"{where}: not a moecc routing-statistics file (no \"format\": \"{FORMAT}\"); "
                                    "make one with `moecc calibrate MODEL --data PATH --out stats.json`")
        if raw.get("schema_version") != SCHEMA_VERSION:
            raise RoutingStatsError(f"{where}: schema_version {raw.get('schema_version')!r}, this moecc reads "
                                    f"{SCHEMA_VERSION}; re-run `moecc calibrate` with this version")
        try:
            fp = ModelFingerprint(**raw["fingerprint"])
            layers = [LayerStats(**layer) for layer in raw["layers"]]
        except (KeyError, TypeError) as exc:
            raise RoutingStatsError(f"{where}: missing or unexpected field ({exc}); the file is corrupted, "
                                    "re-run `moecc calibrate`") from exc
        stats = cls(fp, layers, str(raw.get("data", "")), str(raw.get("source", "moecc")), raw.get("extra") or {})
        stats.validate(where)
        return stats

    def validate(self, where: str = "statistics") -> None:
        """Internal consistency: list lengths, count sums, finite non-negative numbers."""
        fp = self.fingerprint
        if [layer.name for layer in self.layers] != fp.moe_layers or len(fp.experts) != len(self.layers) \
                or len(fp.top_k) != len(self.layers):
            raise RoutingStatsError(f"{where}: the layers do not match the fingerprint's {len(fp.moe_layers)} MoE "
                                    "layers; the file is corrupted, re-run `moecc calibrate`")
        for layer, e, k in zip(self.layers, fp.experts, fp.top_k):
            bad = _layer_problem(layer, e, k, fp.num_hidden_layers)
            if bad:
                raise RoutingStatsError(f"{where}: layer {layer.name}: {bad}; the file is corrupted, "
                                        "re-run `moecc calibrate`")

    @classmethod
    def from_sglang(cls, dump, model, data: str = "sglang") -> "RoutingStats":
        """Counts-only statistics from an SGLang stat-mode dump (dict, or a .pt / .json path).

        `logical_count` [steps, layers, E] (or [layers, E]) is summed over steps; the model
        gives the MoE layers' names and top-k. REAP, activations and co-activation are not
        in SGLang's dump and stay None.
        """
        where = dump if isinstance(dump, str) else "SGLang dump"
        if isinstance(dump, str):
            if dump.endswith(".pt"):
                dump = torch.load(dump, weights_only=True, map_location="cpu")
            else:
                with open(dump) as f:
                    dump = json.load(f)
        if not isinstance(dump, dict) or "logical_count" not in dump:
            raise RoutingStatsError(f"{where}: no 'logical_count' (an SGLang expert-distribution stat dump has one)")
        counts = torch.as_tensor(dump["logical_count"])
        counts = counts.sum(0) if counts.dim() == 3 else counts  # [layers, E]
        fp = fingerprint(model)
        if counts.dim() != 2 or counts.shape[0] != fp.num_hidden_layers or counts.shape[1] < max(fp.experts):
            raise RoutingStatsError(f"{where}: logical_count has shape {tuple(counts.shape)}, the model has "
                                    f"{fp.num_hidden_layers} layers of up to {max(fp.experts)} experts: "
                                    "recorded on another model")
        layers = []
        for name, e, k in zip(fp.moe_layers, fp.experts, fp.top_k):
            row = counts[decoder_layer_index(name, fp.moe_layers)][:e].long().tolist()
            tokens, rest = divmod(sum(row), k)
            if rest:
                raise RoutingStatsError(f"{where}: layer {name}: counts sum {sum(row)} is not a multiple of "
                                        f"top-k {k}: recorded on another model")
            layers.append(LayerStats(name, decoder_layer_index(name, fp.moe_layers), e, k, tokens, row))
        if len({layer.tokens for layer in layers}) > 1:
            # Every MoE layer routes every token: unequal totals mean other layers were counted.
            raise RoutingStatsError(f"{where}: the model's MoE layers would have seen different token counts "
                                    f"({[layer.tokens for layer in layers]}): recorded on another model")
        return cls(fp, layers, data, "sglang")

    # --- use on a model ----------------------------------------------------------------
    def check_model(self, model) -> None:
        """Raise RoutingStatsError if these statistics were recorded on a differently shaped model."""
        mine, theirs = self.fingerprint, fingerprint(model)
        for what in ("model_type", "num_hidden_layers", "moe_layers", "experts", "top_k"):
            a, b = getattr(mine, what), getattr(theirs, what)
            if a != b:
                shown = (lambda v: f"{len(v)} layers {v}" if isinstance(v, list) and len(v) > 4 else repr(v))
                raise RoutingStatsError(f"statistics recorded on another model: {what} is {shown(a)} in the "
                                        f"statistics, {shown(b)} in this model; calibrate this model "
                                        "(`moecc calibrate MODEL --data PATH --out stats.json`)")


def _layer_problem(layer: LayerStats, experts: int, top_k: int, num_layers: int) -> str | None:
    if layer.experts != experts or layer.top_k != top_k:
        return f"experts/top-k {layer.experts}/{layer.top_k} differ from the fingerprint's {experts}/{top_k}"
    if not 0 <= layer.layer_index < num_layers:
        return f"layer_index {layer.layer_index} outside 0..{num_layers - 1}"
    if len(layer.counts) != experts:
        return f"{len(layer.counts)} counts for {experts} experts"
    if any((not isinstance(c, int)) or c < 0 for c in layer.counts):
        return "counts must be non-negative integers"
    if sum(layer.counts) != layer.tokens * top_k:
        return f"counts sum to {sum(layer.counts)}, not tokens x top-k = {layer.tokens} x {top_k}"
    for key in ("gate_weight_sum", "reap", "max_activation"):
        values = getattr(layer, key)
        if values is None:
            continue
        if len(values) != experts:
            return f"{len(values)} {key} values for {experts} experts"
        if not all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in values):
            return f"{key} holds a negative, NaN or infinite value"
    co = layer.coactivation
    if co is not None:
        if len(co) != experts or any(len(row) != experts for row in co):
            return f"coactivation is not {experts} x {experts}"
        if any(co[i][j] != co[j][i] or co[i][j] < 0 for i in range(experts) for j in range(experts)) \
                or any(co[i][i] for i in range(experts)):
            return "coactivation is not symmetric, non-negative, zero on the diagonal"
    return None


def load_stats(path: str) -> RoutingStats:
    """Read a statistics file; a missing, truncated or corrupted file is a RoutingStatsError."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError as exc:
        raise RoutingStatsError(f"{path}: no such statistics file; make one with `moecc calibrate MODEL "
                                "--data PATH --out stats.json`") from exc
    except UnicodeDecodeError as exc:
        raise RoutingStatsError(f"{path}: not a text file; give the JSON `moecc calibrate` wrote") from exc
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RoutingStatsError(f"{path}: truncated or not JSON ({exc.msg} at line {exc.lineno}, column "
                                f"{exc.colno}); re-run `moecc calibrate`") from exc
    return RoutingStats.from_dict(raw, path)


# --- recording ---------------------------------------------------------------------------

def decoder_layer_index(name: str, names: list[str]) -> int:
    """The decoder layer of a module path ("model.layers.3.mlp" -> 3), else its position."""
    match = re.search(r"layers\.(\d+)\.", name)
    return int(match.group(1)) if match else names.index(name)


def fingerprint(model) -> ModelFingerprint:
    from moecc.evaluate import moe_blocks

    blocks = moe_blocks(model)
    config = model.config
    return ModelFingerprint(str(getattr(config, "model_type", type(model).__name__)),
                            int(getattr(config, "num_hidden_layers", len(blocks))),
                            [name for name, _ in blocks], [_num_experts(b) for _, b in blocks],
                            [_top_k(b) for _, b in blocks])


def _num_experts(block) -> int:
    return int(block.gate.weight.shape[0])


def _top_k(block) -> int:
    k = getattr(block.gate, "top_k", None)
    if k is None:
        raise RoutingStatsError(f"{type(block.gate).__name__}: router has no top_k attribute; routing "
                                "statistics support transformers' MoE routers")
    return int(k)


class _LayerAccumulator:
    """Running sums of one MoE layer (int64 counts, fp64 sums)."""

    def __init__(self, name: str, index: int, block):
        self.name, self.index, self.block = name, index, block
        e = _num_experts(block)
        self.experts, self.top_k = e, _top_k(block)
        experts = block.experts
        gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
        hidden = block.gate.weight.shape[1]
        ok = (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.dim() == 3
              and down.dim() == 3 and gate_up.shape[0] == e and gate_up.shape[2] == hidden
              and down.shape[1] == hidden and gate_up.shape[1] == 2 * down.shape[2]
              and not getattr(experts, "is_transposed", False) and not getattr(experts, "has_bias", False)
              and getattr(experts, "gate_up_proj_bias", None) is None)
        if not ok:
            raise RoutingStatsError(f"{name}: experts module {type(experts).__name__} is not in the layout "
                                    "record_routing reads (gate_up_proj [E, 2N, K], down_proj [E, K, N], no "
                                    "biases); its routing cannot be recorded yet")
        self.tokens = 0
        self.counts = torch.zeros(e, dtype=torch.int64)
        self.gate_sum = torch.zeros(e, dtype=torch.float64)
        self.reap_sum = torch.zeros(e, dtype=torch.float64)
        self.max_act = torch.zeros(e, dtype=torch.float64)
        self.coact = torch.zeros(e, e, dtype=torch.int64)

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        """Route x [T, D] with the block's router and add its statistics."""
        e, experts = self.experts, self.block.experts
        _, weights, idx = self.block.gate(x)  # weights [T, k] (as the layer applies them), idx [T, k]
        weights = weights.double()
        t = x.shape[0]
        self.tokens += t
        flat = idx.reshape(-1)  # [T*k]
        self.counts += torch.bincount(flat, minlength=e).cpu()
        self.gate_sum.index_add_(0, flat.cpu(), weights.reshape(-1).cpu())
        hot = torch.zeros(t, e, dtype=torch.float64, device=x.device).scatter_(1, idx, 1.0)  # [T, E] 0/1
        co = (hot.T @ hot).round().long().cpu()  # [E, E], exact in fp64
        co.fill_diagonal_(0)
        self.coact += co
        for ex in torch.unique(flat).tolist():
            tok, slot = torch.where(idx == ex)  # routed tokens of expert ex, and their top-k slot
            gate, up = torch.nn.functional.linear(x[tok], experts.gate_up_proj[ex]).chunk(2, dim=-1)  # [t, N] x2
            h = experts.act_fn(gate) * up  # [t, N]: the down projection's input
            y = torch.nn.functional.linear(h, experts.down_proj[ex])  # [t, D]
            norms = y.double().norm(dim=-1)  # [t]
            self.reap_sum[ex] += float((weights[tok, slot] * norms).sum())
            self.max_act[ex] = max(float(self.max_act[ex]), float(h.abs().max()))

    def result(self) -> LayerStats:
        counts = self.counts
        reap = torch.where(counts > 0, self.reap_sum / counts.clamp(min=1), torch.zeros_like(self.reap_sum))
        return LayerStats(self.name, self.index, self.experts, self.top_k, self.tokens, counts.tolist(),
                          self.gate_sum.tolist(), reap.tolist(), self.max_act.tolist(), self.coact.tolist())


def record_routing(model, batches, *, data: str = "", progress: bool = False,
                   description: str = "calibrate") -> RoutingStats:
    """Run the eager `model` on `batches` and record routing statistics of every MoE block.

    batches: an iterable of input-id tensors [B, W] (or dicts of forward kwargs); `len()`
    is used for the progress bar when it has one. The model is not modified; hooks are
    removed afterwards. Raises RoutingStatsError if the model has no MoE block or an
    experts layout it cannot read, and if any recorded number is not finite.
    """
    from rich.progress import track

    from moecc.evaluate import _RouterInputs, moe_blocks

    blocks = moe_blocks(model)
    if not blocks:
        raise RoutingStatsError(f"{type(model).__name__}: no MoE block (a module with .gate and .experts) "
                                "to record")
    names = [n for n, _ in blocks]
    accs = {n: _LayerAccumulator(n, decoder_layer_index(n, names), b) for n, b in blocks}
    recorder = _RouterInputs(blocks)
    try:
        with torch.no_grad():
            for batch in track(batches, description=description, disable=not progress):
                if isinstance(batch, dict):
                    model(**batch)
                else:
                    model(input_ids=batch)
                for name, x in recorder.take().items():  # x: [T, D]
                    if x is not None:
                        accs[name].add(x)
    finally:
        recorder.remove()
    stats = RoutingStats(fingerprint(model), [accs[n].result() for n in names], data)
    stats.validate("recorded statistics")  # NaN or inf in the model's activations fails here
    return stats
