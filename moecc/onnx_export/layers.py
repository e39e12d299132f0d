"""Find a model's MoE blocks the way the moecc backend does, and swap each for one moecc op.

    layers = find_moe_layers(model, example_inputs)      # capture, as torch.compile(backend="moecc")
    swapped = swap_moe_layers(model, layers)             # a copy whose MoE blocks are MoELayerModule

Capture (moecc.capture) runs inside a throw-away torch.compile backend, so recognition and
its numerical verification are exactly the backend's. Each captured layer's weights are
turned into the canonical layout (backends/reference/experts.py, the expert-fusion pass's
function), so an exported layer always reads gate_up [E', 2N, K] and down [E', K, N].

Assumption: a captured region is its whole module (the module's forward maps hidden
states to the layer output, or to (output, router scores) as GPT-OSS's does).
`swap_moe_layers` checks that on the example inputs, module by module, and refuses a
layer whose swapped module does not reproduce the original.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from moecc.spec import MoELayerSpec
from moecc.weights import MOE_WEIGHT_FIELDS, MoEWeights


@dataclass
class FoundLayer:
    """One captured MoE block: its module path, canonical spec and canonical weights."""

    path: str  # dotted module path, e.g. "model.layers.0.mlp"
    module_class: str
    spec: MoELayerSpec  # canonical layout (experts.canonical is True)
    weights: MoEWeights  # canonical tensors; None for absent fields


class MoELayerModule(torch.nn.Module):
    """One MoE layer as one moecc op: hidden [..., K] -> [..., K].

    The weights are buffers named by their MoEWeights field, so an exported graph names
    its initializers `<module path>.<field>`. `kernel_backend` picks the op it calls
    (moecc.ops.OP_NAMES); export always uses the reference op, which the ONNX
    translation replaces.
    """

    def __init__(self, spec: MoELayerSpec, weights: MoEWeights, kernel_backend: str = "reference",
                 extra_outputs: int = 0):
        super().__init__()
        self.spec_json = spec.to_json()
        self.kernel_backend = kernel_backend
        # A block returning (output, router scores) (GPT-OSS) is replaced by one returning
        # (output, None): the models read only the output at inference.
        self.extra_outputs = extra_outputs
        self.fields = tuple(f for f in MOE_WEIGHT_FIELDS if getattr(weights, f) is not None)
        for f in self.fields:
            self.register_buffer(f, getattr(weights, f))

    @property
    def spec(self) -> MoELayerSpec:
        return MoELayerSpec.from_json(self.spec_json)

    def weights(self) -> MoEWeights:
        return MoEWeights(**{f: getattr(self, f) if f in self.fields else None for f in MOE_WEIGHT_FIELDS})

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        import moecc.ops  # noqa: F401  (defines the moecc ops)
        from moecc.ops import op_for_backend

        k = hidden.shape[-1]
        flat = hidden.reshape(-1, k)  # [T, K]
        out = op_for_backend(self.kernel_backend)(flat, *self.weights(), self.spec_json)  # [T, K]
        out = out.view_as(hidden)
        return (out, *([None] * self.extra_outputs)) if self.extra_outputs else out

    def extra_repr(self) -> str:
        return self.spec.describe()


def canonical_layer(spec: MoELayerSpec, weights: MoEWeights) -> tuple[MoELayerSpec, MoEWeights]:
    """The same layer in the canonical layout (what the expert-fusion pass produces)."""
    from moecc.backends.reference.experts import canonical_expert_weights

    if spec.experts.canonical:
        return spec, weights
    experts = canonical_expert_weights(weights, spec.experts)
    weights = weights._replace(gate_up=experts.gate_up, down=experts.down, gate_up_bias=experts.gate_up_bias,
                               down_bias=experts.down_bias, up=None, shared_gate=None, shared_up=None,
                               shared_down=None)
    spec = spec.replace(experts={"gate_up_layout": "concat", "gate_up_transposed": False,
                                 "down_transposed": False, "shared_fused": spec.experts.num_shared > 0})
    return spec, weights


def find_moe_layers(model: torch.nn.Module, example_inputs: Sequence[Any],
                    example_kwargs: Optional[dict] = None) -> tuple[list[FoundLayer], list[str]]:
    """Capture `model` on the example inputs -> (layers, notes on regions left alone)."""
    import moecc.ops  # noqa: F401
    from moecc.capture import capture_moe_layers, real_input_values
    from moecc.options import CompileOptions

    found: list[FoundLayer] = []
    notes: list[str] = []

    def recording_backend(gm, inputs):
        report = capture_moe_layers(gm, inputs, CompileOptions())
        by_name = {node.name: value for node, value in real_input_values(gm, inputs).items()}
        for c in report.captured:
            weights = MoEWeights(**{f: by_name[c.weights[f]] if f in c.weights else None
                                    for f in MOE_WEIGHT_FIELDS})
            spec, weights = canonical_layer(c.spec, weights)
            found.append(FoundLayer(c.module_path, c.module_class, spec, weights))
        notes.extend(f"{s.module_path} ({s.module_class}) not captured: {s.reason}" for s in report.skipped)
        return gm.forward

    compiled = torch.compile(model, backend=recording_backend, dynamic=False)
    with torch.no_grad():
        compiled(*example_inputs, **(example_kwargs or {}))
    unique = {layer.path: layer for layer in found}  # a recompile captures a layer again
    return list(unique.values()), notes


def swap_moe_layers(model: torch.nn.Module, layers: Sequence[FoundLayer], example_inputs: Sequence[Any],
                    example_kwargs: Optional[dict] = None, rtol: float = 1e-4
                    ) -> tuple[torch.nn.Module, list[FoundLayer], list[str]]:
    """A shallow copy of `model` whose captured MoE blocks are MoELayerModules.

    Each block's original output on the example inputs is compared with its swapped
    module's (relative max error <= rtol, fp32); a block that differs, or returns
    something other than one tensor, stays as it was and gets a note.
    Returns (model copy, layers swapped, notes).
    """
    inputs_seen = _record_block_io(model, [layer.path for layer in layers], example_inputs, example_kwargs)
    swapped_model = copy.copy(model)  # parameters shared; module tree rebuilt along the swapped paths
    swapped_model._modules = dict(model._modules)
    kept, notes = [], []
    for layer in layers:
        seen = inputs_seen.get(layer.path)
        if seen is None:
            notes.append(f"{layer.path}: not called on the example inputs; left as it was")
            continue
        hidden, expected = seen
        extra = 0
        if isinstance(expected, tuple) and expected and isinstance(expected[0], torch.Tensor):
            expected, extra = expected[0], len(expected) - 1  # (output, router scores): GPT-OSS
        if not isinstance(expected, torch.Tensor) or expected.shape != hidden.shape:
            notes.append(f"{layer.path}: returns {type(expected).__name__}, not the layer output; left as it was")
            continue
        module = MoELayerModule(layer.spec, layer.weights, extra_outputs=extra)
        with torch.no_grad():
            got = module(hidden)
        got = got[0] if extra else got
        err = relative_error(got, expected)
        if not err <= rtol:
            notes.append(f"{layer.path}: the moecc op differs from the module by {err:.2e} (relative); "
                         "the captured region is not the whole module; left as it was")
            continue
        set_submodule(swapped_model, layer.path, module)
        kept.append(layer)
    return swapped_model, kept, notes


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """max |got - expected| / max |expected| in fp64 (NaN when either is not finite)."""
    got, expected = got.double(), expected.double()
    if not (torch.isfinite(got).all() and torch.isfinite(expected).all()):
        return float("nan")
    scale = expected.abs().max().clamp(min=1e-30)
    return ((got - expected).abs().max() / scale).item()


def _record_block_io(model, paths, example_inputs, example_kwargs) -> dict[str, tuple]:
    """path -> (first positional input, output) of each block on one eager forward."""
    seen: dict[str, tuple] = {}
    handles = []
    for path in paths:
        module = model.get_submodule(path)

        def hook(mod, args, output, _path=path):
            if _path not in seen and args:
                seen[_path] = (args[0].detach().clone(), output)

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(*example_inputs, **(example_kwargs or {}))
    finally:
        for h in handles:
            h.remove()
    return seen


def set_submodule(root: torch.nn.Module, path: str, module: torch.nn.Module) -> None:
    """Replace root.<path> by `module`, copying (shallowly) every parent on the way so the
    original model is left untouched."""
    parts = path.split(".")
    parent = root
    for name in parts[:-1]:
        child = copy.copy(parent.get_submodule(name))
        child._modules = dict(child._modules)
        parent._modules[name] = child
        parent = child
    parent._modules[parts[-1]] = module
