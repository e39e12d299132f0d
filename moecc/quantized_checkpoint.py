"""Save a moecc.quantize_'d model to one safetensors file and load it back, without re-quantising.

    moecc.save_quantized(model, "qwen3-int8.safetensors")
    model = moecc.load_quantized(None, "qwen3-int8.safetensors")      # the config saved in the file
    model = moecc.load_quantized(config, "qwen3-int8.safetensors")    # a transformers config
    model = moecc.load_quantized(fresh_model, "qwen3-int8.safetensors")  # a model of the same architecture

The file is a plain safetensors file (any safetensors reader opens it): every parameter and
buffer of the model by its state-dict name, the packed experts included (`<layer
path>.gate_up` uint8, `.gate_up_scale` fp32, ...; backends/reference/quantized.py's layout),
plus string metadata that says how to rebuild the model around them:

    format        "moecc-quantized";  version: "1" (a newer version is refused)
    layers        JSON {module path: {"spec": layer spec JSON, "extra_outputs": n,
                  "note": what quantize_ chose}}: the modules that become QuantizedMoELayers
    aliases       JSON {name: stored name}: tensors the model shares (tied embeddings) stored once
    config        the transformers config JSON when the model has one (load_quantized(None, ...))
    moecc_version, model_class: for the reader's information

Non-persistent buffers (rotary inv_freq) are stored too, so a model built on the meta device
(no memory) is complete once loaded. Loading: the target model is built on the meta device
(config given) or taken as it is (model given); each module the file lists is replaced by a
QuantizedMoELayer over the file's tensors (the original block is dropped: a materialised
model frees it), then every other tensor is assigned, not copied (`assign` semantics:
the file's dtype wins, like from_pretrained's). Everything is checked before the model is
touched: the names must match one to one (missing and unexpected names listed), shapes
must match; a file that is not a moecc checkpoint, is truncated or has a damaged header is
a QuantizedCheckpointError saying what to do. No original weight is ever allocated. On a
CPU, safetensors memory-maps the file and the loaded tensors are backed by that mapping:
pages are read when first used (measured: a 2.43 GiB int8 model is 0.44 GiB resident
after loading and one short forward; docs/precision.md), so do not overwrite the file
in place while the model is alive (deleting it is safe on Linux).
"""

from __future__ import annotations

import json
import os
from typing import Any, Union

import torch

from moecc.quantize_module import QuantizedMoELayer, set_submodule_in_place
from moecc.spec import MoELayerSpec
from moecc.weights import MOE_WEIGHT_FIELDS, MoEWeights

FORMAT = "moecc-quantized"
VERSION = 1


class QuantizedCheckpointError(ValueError):
    """The file cannot be loaded into this model (what is wrong and what to do is in the message)."""


def save_quantized(model: torch.nn.Module, path: Union[str, os.PathLike]) -> None:
    """Write `model` (after moecc.quantize_) to one safetensors file at `path`."""
    from safetensors.torch import save_file

    layers = {name: {"spec": m.spec_json, "extra_outputs": m.extra_outputs, "note": m.precision_note}
              for name, m in model.named_modules() if isinstance(m, QuantizedMoELayer)}
    if not layers:
        raise QuantizedCheckpointError(f"{type(model).__name__} has no QuantizedMoELayer: run moecc.quantize_(model, "
                                       "config) first (a plain model saves with save_pretrained)")
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    stored: dict[int, tuple[str, torch.Tensor]] = {}  # storage address -> (first name, tensor)
    for name, t in _named_tensors(model):
        if t.device.type == "meta":
            raise QuantizedCheckpointError(f"{name} is on the meta device: there is nothing to save")
        t = t.detach()
        key = t.untyped_storage().data_ptr()
        if key in stored:
            first, other = stored[key]
            if (other.dtype, other.shape, other.stride(), other.storage_offset()) == \
                    (t.dtype, t.shape, t.stride(), t.storage_offset()):
                aliases[name] = first  # the same tensor under two names (tied weights): stored once
                continue
            t = t.clone()  # another view of a shared storage: stored as its own copy (safetensors needs that)
        else:
            stored[key] = (name, t)
        tensors[name] = t.contiguous()
    metadata = {"format": FORMAT, "version": str(VERSION), "layers": json.dumps(layers), "aliases": json.dumps(aliases),
                "model_class": f"{type(model).__module__}.{type(model).__qualname__}", "moecc_version": _version()}
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        metadata["config"] = config.to_json_string(use_diff=False)
    save_file(tensors, os.fspath(path), metadata=metadata)


def load_quantized(model_or_config: Any, path: Union[str, os.PathLike], *, device: str = "cpu") -> torch.nn.Module:
    """The quantised model saved at `path`, in eval mode.

    model_or_config: a model of the saved architecture (changed in place and returned), a
        transformers config (the model is built from it on the meta device, so nothing but
        the file's tensors is ever allocated), or None (the config saved in the file).
    """
    from safetensors import safe_open

    path = os.fspath(path)
    try:
        handle = safe_open(path, framework="pt", device=device)
        metadata = handle.metadata() or {}
        names = set(handle.keys())
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for a bad header
        raise QuantizedCheckpointError(f"{path} is not a readable safetensors file ({type(exc).__name__}: {exc}); "
                                       "it may be truncated or damaged: save it again with moecc.save_quantized"
                                       ) from exc
    layers, aliases = _read_metadata(path, metadata)
    model = _target_model(model_or_config, metadata, path)
    _check_matches(model, layers, aliases, names, handle, path)
    try:
        for layer_path, entry in layers.items():
            spec = MoELayerSpec.from_json(entry["spec"])
            weights = MoEWeights(**{f: handle.get_tensor(f"{layer_path}.{f}") if f"{layer_path}.{f}" in names else None
                                    for f in MOE_WEIGHT_FIELDS})
            module = QuantizedMoELayer(spec, weights, entry.get("note", ""), extra_outputs=int(entry.get("extra_outputs", 0)))
            set_submodule_in_place(model, layer_path, module)  # the original block is dropped here
        loaded: dict[str, torch.Tensor] = {}
        for name in sorted(names):
            if _under_layer(name, layers):
                continue
            loaded[name] = _assign(model, name, handle.get_tensor(name))
        for name, source in aliases.items():
            if not _under_layer(name, layers):
                _assign(model, name, loaded[source], same_object=True)
    except Exception as exc:  # noqa: BLE001 - a data error safetensors finds only when a tensor is read
        raise QuantizedCheckpointError(f"{path}: reading the tensors failed ({type(exc).__name__}: {exc}); the file "
                                       "may be truncated or damaged: save it again with moecc.save_quantized") from exc
    return model.eval()


def _named_tensors(model: torch.nn.Module):
    """(name, tensor) for every parameter and buffer, non-persistent buffers and shared ones included."""
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)


def _read_metadata(path: str, metadata: dict) -> tuple[dict, dict]:
    if metadata.get("format") != FORMAT:
        raise QuantizedCheckpointError(f"{path} is not a moecc quantised checkpoint (its metadata has no "
                                       f"'format': '{FORMAT}'); write one with moecc.save_quantized, or load a plain "
                                       "transformers checkpoint with from_pretrained")
    try:
        version = int(metadata.get("version", ""))
        layers, aliases = json.loads(metadata["layers"]), json.loads(metadata.get("aliases", "{}"))
    except (KeyError, ValueError) as exc:
        raise QuantizedCheckpointError(f"{path}: damaged moecc metadata ({exc}); save it again with "
                                       "moecc.save_quantized") from exc
    if version > VERSION:
        raise QuantizedCheckpointError(f"{path} was written in moecc checkpoint version {version}; this moecc reads "
                                       f"up to {VERSION}: upgrade moecc")
    return layers, aliases


def _target_model(model_or_config: Any, metadata: dict, path: str) -> torch.nn.Module:
    if isinstance(model_or_config, torch.nn.Module):
        return model_or_config
    config = model_or_config
    if config is None:
        if "config" not in metadata:
            raise QuantizedCheckpointError(f"{path} holds no model config (the model had none): pass the model, "
                                           "built as it was before quantize_, as the first argument")
        from transformers import AutoConfig

        saved = json.loads(metadata["config"])
        config = AutoConfig.for_model(saved.pop("model_type"), **saved)
    if not hasattr(config, "model_type"):
        raise QuantizedCheckpointError(f"load_quantized takes a model, a transformers config or None, "
                                       f"not {type(model_or_config).__name__}")
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # no memory: every tensor is assigned from the file
        return AutoModelForCausalLM.from_config(config)


def _check_matches(model: torch.nn.Module, layers: dict, aliases: dict, names: set, handle, path: str) -> None:
    """Raise before anything changes unless the file's names and shapes fit the model one to one."""
    for layer_path in layers:
        try:
            model.get_submodule(layer_path)
        except AttributeError:
            raise QuantizedCheckpointError(f"{path}: the quantised layer {layer_path!r} is not a module of this "
                                           f"{type(model).__name__}: the file was saved from another architecture "
                                           "or configuration") from None
    expected = {name: tuple(t.shape) for name, t in _named_tensors(model) if not _under_layer(name, layers)}
    in_file = {n for n in names | set(aliases) if not _under_layer(n, layers)}
    missing, unexpected = sorted(set(expected) - in_file), sorted(in_file - set(expected))
    bad_alias = sorted(n for n, s in aliases.items() if s not in names)
    if missing or unexpected or bad_alias:
        raise QuantizedCheckpointError(
            f"{path} does not match this {type(model).__name__}: missing {_few(missing)}, unexpected {_few(unexpected)}"
            + (f", aliases to absent tensors {_few(bad_alias)}" if bad_alias else "")
            + ": the file was saved from another architecture or configuration")
    for layer_path in layers:
        if f"{layer_path}.gate_up" not in names or f"{layer_path}.router_weight" not in names:
            raise QuantizedCheckpointError(f"{path}: the quantised layer {layer_path!r} has no packed experts in the "
                                           "file (damaged file): save it again with moecc.save_quantized")
    wrong = [f"{n}: file {tuple(handle.get_slice(n).get_shape())} vs model {shape}" for n, shape in expected.items()
             if n in names and tuple(handle.get_slice(n).get_shape()) != shape]
    if wrong:
        raise QuantizedCheckpointError(f"{path} does not match this {type(model).__name__}: shapes differ ("
                                       f"{_few(wrong)}): the file was saved from another configuration")


def _assign(model: torch.nn.Module, name: str, tensor: torch.Tensor, same_object: bool = False) -> torch.Tensor:
    """Put `tensor` at `name` (a parameter stays a Parameter, with its requires_grad); returns what was set."""
    owner_path, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_path) if owner_path else model
    if attr in owner._parameters:
        old = owner._parameters[attr]
        if not (same_object and isinstance(tensor, torch.nn.Parameter)):
            tensor = torch.nn.Parameter(tensor, requires_grad=old.requires_grad if old is not None else False)
        owner._parameters[attr] = tensor
    else:
        owner._buffers[attr] = tensor
    return tensor


def _under_layer(name: str, layers: dict) -> bool:
    return any(name.startswith(p + ".") for p in layers)


def _few(items: list, n: int = 5) -> str:
    return "[]" if not items else str(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def _version() -> str:
    import moecc

    return moecc.__version__
