"""moecc.quantize_: pack a model's routed experts in place, before compiling.

    report = moecc.quantize_(model, "int8")          # or a config / a dict with "overrides"
    print(report.format())                           # per layer: format, SQNR, why
    compiled = torch.compile(model, backend="moecc") # takes the packed layers as they are

The precision pass (passes/precision_lowering.py) packs the expert stacks at compile time
and keeps the packed copies beside the model's own parameters. quantize_ packs them
instead of the originals: each captured MoE block (the module capture recognises, e.g.
`model.layers.0.mlp`, router included) is replaced by a `QuantizedMoELayer` holding

    router weights (the original tensors, not copied), packed uint8 gate_up [E', 2N, K/P]
    and down [E', K, N/P] with fp32 scales (backends/reference/quantized.py's layout),
    biases in their dtype, and the layer spec (weight_format, group_size, activations)

and the block (with its expert stacks) is dropped, layer by layer: nothing in moecc keeps a
reference to it, so its storages are freed unless the caller holds one (of the old block
or its parameters). Packing runs without autograd: a graph from the packed scales back
to the parameters would keep them alive.

How a block becomes a layer: the model runs once under a throw-away torch.compile backend
that calls moecc's capture (recognition + numerical verification, exactly the backend's),
so the spec is the one `torch.compile(backend="moecc")` would build. Each block is then
called on random hidden states and compared with the moecc op on its original weights; a
block whose module is more than its captured region (a trailing norm, other outputs)
stays as it was, with a note. Shared experts (DeepSeek) are folded into the stack first,
as expert fusion does at compile time, and packed with it.

Per layer the format is chosen exactly as the pass chooses it (the same `_choose`: the
config's chain, weight and output SQNR bounds, strict), under per-layer overrides by
module path (moecc.precision.PerLayerPrecision); a layer whose config is None or whose
chain ends in "keep" keeps its block untouched.

Eager forward runs the packed layer on the reference op (dequantising each used expert:
the semantics every kernel is tested against); compiling hands the op node to the pass
pipeline, where capture finds nothing left to capture, the precision pass counts the
layer as `prepacked`, and lower_kernels binds it to the TVM llvm kernels on a CPU.

Memory (docs/precision.md has the measurement): each layer's original block is dropped
the moment its packed layer is swapped in, so its stacks are freed before the next layer
is packed. That needs one full garbage collection after the capture run: Dynamo's tracing
leaves cyclic garbage that references every module it traced. Expert stacks are single
tensors [E, ., .], whose storage can only be freed whole, so the reachable peak of an
in-place quantize_ is the model before it + one layer's packed stack (allocated once, at
its final size, filled expert by expert) + one expert's fp32 temporaries (+ one layer's
canonical copy where the source layout must be re-laid out); the model ends at its
quantised size. "Quantised size + one expert" needs the originals never resident at
once: moecc.load_quantized reads a saved quantised model tensor by tensor.
"""

from __future__ import annotations

import gc
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from moecc.onnx_export.layers import MoELayerModule, canonical_layer, set_submodule
from moecc.precision import PerLayerPrecision, PrecisionError, config_for, format_name, parse_precision
from moecc.spec import MoELayerSpec
from moecc.weights import MOE_WEIGHT_FIELDS, MoEWeights

# The expert tensors packing replaces (everything else the layer reads is kept as it is).
PACKED_SOURCES = ("gate_up", "up", "down", "shared_gate", "shared_up", "shared_down")
PROBE_SHAPE = (2, 8)  # [B, T] random hidden states for the whole-block check


class QuantizedMoELayer(MoELayerModule):
    """One MoE layer with packed experts, as one moecc op: hidden [..., K] -> [..., K].

    Buffers named by MoEWeights field (gate_up / down uint8, gate_up_scale / down_scale
    fp32, the router weights as they were); `precision_note` says what quantize_ chose.
    """

    def __init__(self, spec: MoELayerSpec, weights: MoEWeights, precision_note: str = "", extra_outputs: int = 0):
        super().__init__(spec, weights, extra_outputs=extra_outputs)
        self.precision_note = precision_note


@dataclass
class LayerResult:
    path: str
    format: str  # "int8 per-row", "int4 g32 a8", or "kept" (block untouched)
    weight_sqnr: Optional[float] = None  # worst expert, dB
    output_sqnr: Optional[float] = None  # layer output on random hidden states, dB
    why: str = ""  # fallbacks taken, or why the block was kept

    def line(self) -> str:
        if self.format == "kept":
            return f"{self.path}: kept ({self.why})"
        return (f"{self.path}: {self.format}: weight SQNR >= {self.weight_sqnr:.1f} dB, output SQNR "
                f"{self.output_sqnr:.1f} dB" + (f" ({self.why})" if self.why else ""))


@dataclass
class QuantizeReport:
    """What quantize_ did: one LayerResult per captured MoE block, plus notes."""

    layers: list[LayerResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    param_bytes_before: int = 0  # parameters + buffers of the model, bytes
    param_bytes_after: int = 0

    @property
    def packed(self) -> list[LayerResult]:
        return [r for r in self.layers if r.format != "kept"]

    def format(self) -> str:
        lines = [r.line() for r in self.layers] + self.notes
        lines.append(f"model tensors: {self.param_bytes_before / 2**20:,.1f} MiB -> "
                     f"{self.param_bytes_after / 2**20:,.1f} MiB")
        return "\n".join(lines)


def tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes of the distinct storages behind the model's parameters and buffers."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen and t.device.type != "meta":
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def quantize_(model: torch.nn.Module, config: Any, *, example_inputs: Optional[Sequence[Any]] = None,
              example_kwargs: Optional[dict] = None) -> QuantizeReport:
    """Replace each MoE block of `model` by a QuantizedMoELayer with packed experts, in place.

    config: anything options["precision"] takes ("int8", "int4", "w8a8", "w4a8", a config,
        a dict, with "overrides" by module path; moecc/precision.py).
    example_inputs / example_kwargs: one forward's arguments for the capture run; default
        for a transformers causal LM: input_ids [1, 8] of zeros with use_cache=False.
    Raises PrecisionError for a bad config, a strict config whose format a layer cannot
    meet, or (strict PerLayerPrecision) an override pattern that matches no MoE layer.
    """
    precision = parse_precision(config)
    if precision is None:
        raise PrecisionError("quantize_ needs a format ('int8', 'int4', 'w8a8', 'w4a8', a config, or a dict "
                             "with 'overrides'); None / 'dense' would change nothing")
    inputs, kwargs = _example_call(model, example_inputs, example_kwargs)
    report = QuantizeReport(param_bytes_before=tensor_bytes(model))
    found, report.notes = _capture(model, inputs, kwargs)
    # Dynamo's tracing leaves cyclic garbage (its variable trackers, side-effect tables) that
    # references every nn.Module it traced, the experts modules included: without a full
    # collection here no original stack is freed at its swap below, only when the cyclic
    # collector next runs (measured: after quantize_ returned, so the peak held every packed
    # layer beside every original; docs/precision.md).
    gc.collect()
    if isinstance(precision, PerLayerPrecision):
        unmatched = precision.unmatched([path for path, _, _ in found])
        if unmatched and precision.strict:
            raise PrecisionError(f"precision override(s) {unmatched} match no MoE layer of this model; captured "
                                 f"layers: {[path for path, _, _ in found]}. Fix the module paths or set strict=False.")
        report.notes += [f"override {p!r} matches no MoE layer (captured: {len(found)} layers)" for p in unmatched]
    from moecc.passes.precision_lowering import _choose, lowered_spec

    for index in range(len(found)):
        path, spec, weights = found[index]
        found[index] = None  # this loop's references are the last to the original stacks
        layer_config = config_for(precision, path)
        if layer_config is None:
            report.layers.append(LayerResult(path, "kept", why="no format for this path (override)"))
            continue
        block = model.get_submodule(path)
        extra, mismatch = _whole_block_check(block, spec, weights)
        if mismatch:
            report.layers.append(LayerResult(path, "kept", why=mismatch))
            continue
        with torch.no_grad():  # no autograd graph: it would keep the original parameters alive
            canon_spec, canon = canonical_layer(spec, weights)  # views where the layout allows
            chosen, why = _choose(canon_spec, canon, layer_config, seed=index)
        if chosen is None:
            report.layers.append(LayerResult(path, "kept", why=why))
            continue
        cfg, packed, (weight_sqnr, output_sqnr) = chosen
        kept = {f: getattr(canon, f) for f in MOE_WEIGHT_FIELDS if f not in PACKED_SOURCES}
        new_weights = MoEWeights(**{**{f: _detached(t) for f, t in kept.items()}, **{f: None for f in PACKED_SOURCES},
                                    **{f: t.detach() for f, t in packed.items()}})
        result = LayerResult(path, format_name(cfg), weight_sqnr, output_sqnr, why)
        module = QuantizedMoELayer(lowered_spec(canon_spec, cfg), new_weights, result.line(), extra_outputs=extra)
        set_submodule_in_place(model, path, module)
        # Drop this loop's references: the old block held the last others, so the original
        # stacks are freed here, before the next layer is packed (tests check it).
        del block, weights, canon, packed, chosen, new_weights, kept
        report.layers.append(result)
    report.param_bytes_after = tensor_bytes(model)
    return report


def set_submodule_in_place(root: torch.nn.Module, path: str, module: torch.nn.Module) -> None:
    """root.<path> = module (the model itself changes; compare onnx_export's copying set_submodule)."""
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


def _detached(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.detach()  # same storage, a plain tensor (buffers, not parameters)


def _example_call(model, example_inputs, example_kwargs) -> tuple[tuple, dict]:
    if example_inputs is not None:
        return tuple(example_inputs), dict(example_kwargs or {})
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "vocab_size"):
        raise PrecisionError(f"quantize_ cannot guess an input for {type(model).__name__}: pass "
                             "example_inputs=(...) (and example_kwargs) for one forward call")
    device = next(model.parameters()).device
    return (), {"input_ids": torch.zeros(1, 8, dtype=torch.long, device=device), "use_cache": False,
                **(example_kwargs or {})}


def _capture(model, inputs, kwargs) -> tuple[list, list[str]]:
    """[(module path, captured spec, original weights)] as torch.compile(backend="moecc")
    would capture them, and notes on regions capture left alone."""
    import moecc.ops  # noqa: F401  (the op the capture rewrites regions to)
    from moecc.capture import capture_moe_layers, real_input_values
    from moecc.options import CompileOptions

    found: dict[str, tuple] = {}
    notes: list[str] = []

    def recording_backend(gm, graph_inputs):
        graph_report = capture_moe_layers(gm, graph_inputs, CompileOptions())
        by_name = {node.name: value for node, value in real_input_values(gm, graph_inputs).items()}
        for c in graph_report.captured:
            weights = MoEWeights(**{f: by_name[c.weights[f]] if f in c.weights else None for f in MOE_WEIGHT_FIELDS})
            found.setdefault(c.module_path, (c.module_path, c.spec, weights))
        notes.extend(f"{s.module_path} ({s.module_class}) not captured: {s.reason}" for s in graph_report.skipped)
        return gm.forward

    compiled = torch.compile(model, backend=recording_backend, dynamic=False)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # uncaptured regions are reported as notes
        compiled(*inputs, **kwargs)
    layers = list(found.values())
    found.clear()  # Dynamo's cache keeps the backend (and its closure) alive: no tensors in it
    return layers, sorted(set(notes))


def _whole_block_check(block, spec: MoELayerSpec, weights: MoEWeights) -> tuple[int, str]:
    """(extra outputs, '' or why not): does the moecc op on the original weights compute
    what the whole block module computes? (capture verified its region; the module may do
    more: a trailing norm, a second output that is not router scores.)"""
    from moecc.backends.reference import moe_layer
    from moecc.tolerances import ROUTING_FLIP_FRACTION, token_mismatch_fraction

    k = spec.experts.hidden_size
    dtype = weights.router_weight.dtype
    if dtype not in ROUTING_FLIP_FRACTION:
        dtype = weights.gate_up.dtype
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(*PROBE_SHAPE, k, generator=gen).to(weights.gate_up.device, dtype)  # [B, T, K]
    try:
        with torch.no_grad():
            out = block(hidden)
            expected = moe_layer(hidden.reshape(-1, k), weights, spec)  # [B*T, K]
    except Exception as exc:  # noqa: BLE001 - a block that wants more than hidden states: kept, with why
        return 0, f"the block cannot be called with hidden states alone ({type(exc).__name__}: {exc})"
    extra = 0
    if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):
        out, extra = out[0], len(out) - 1  # (output, router scores): GPT-OSS; models read the output only
    if not isinstance(out, torch.Tensor) or out.shape != hidden.shape:
        return 0, f"the block returns {type(out).__name__}, not the layer output"
    frac = token_mismatch_fraction(expected, out.reshape(expected.shape), dtype)
    if frac > ROUTING_FLIP_FRACTION.get(dtype, 0.0):
        return 0, (f"the block computes more than its captured MoE region ({frac:.0%} of tokens differ: "
                   "a trailing norm?)")
    return extra, ""
