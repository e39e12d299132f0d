"""Every MoE architecture of the installed transformers, as a tiny random model.

    names = moe_architectures()              # model folders whose experts use the interface
    model, info = build_tiny_model("olmoe")  # default config shrunk to tiny widths

An architecture is a transformers model folder whose modeling file calls
`use_experts_implementation` (the experts interface moecc captures through). Its tiny
model is the folder's default config with every size field it has shrunk to test widths
(hidden 64, 2-4 layers, 8 experts, top-2; table `_TINY_FIELDS`); per-layer lists are cut
to the new depth. Vision-language and omni models contribute their text decoder (the
part with the MoE layers): the text sub-config is shrunk and built on its own.

Assumptions: a config class can be built without arguments (transformers' convention);
size fields use the names below (any it does not know keep their default, and the build
is refused if the result is not tiny, see MAX_TINY_PARAMS). Nothing is downloaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

# A tiny model above this many parameters means a size field the shrinker does not know.
MAX_TINY_PARAMS = 20_000_000

# field -> tiny value; applied only to fields the config already has with an int value.
_TINY_FIELDS: dict[str, int] = {
    "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "ffn_hidden_size": 128,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64, "shared_intermediate_size": 32,
    "moe_shared_expert_intermediate_size": 32, "dense_intermediate_size": 128,
    "num_attention_heads": 4, "head_dim": 16, "attention_head_dim": 16,
    "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "qk_head_dim": 16, "o_lora_rank": 16, "o_groups": 2,
    "index_head_dim": 16, "index_n_heads": 2, "index_topk": 4,
    "linear_key_head_dim": 16, "linear_value_head_dim": 16, "linear_num_key_heads": 2,
    "linear_num_value_heads": 4, "linear_head_dim": 16, "linear_num_heads": 4,
    "mamba_n_heads": 8, "mamba_num_heads": 8, "mamba_d_head": 16, "mamba_head_dim": 16, "mamba_d_state": 16,
    "mamba_dt_rank": 8, "ssm_state_size": 16, "n_groups": 1, "mamba_n_groups": 1, "mamba_expand": 2,
    "router_hidden_size": 32, "gated_norm_rank": 8,
    "num_experts": 8, "num_local_experts": 8, "n_routed_experts": 8, "moe_num_experts": 8,
    "num_experts_per_tok": 2, "num_experts_per_token": 2, "moe_k": 2, "moe_topk": 2, "top_k_experts": 2,
    "sliding_window": 32, "max_window_layers": 2,
    "num_nextn_predict_layers": 0, "moe_layer_end_index": 3,
}
# Architectures whose default config has no MoE layers (or a field the generic shrinking
# cannot derive): the fields that make the tiny model an MoE model. Documented in
# docs/coverage.md with the table.
ARCH_OVERRIDES: dict[str, dict[str, Any]] = {
    "gemma4": {"num_experts": 8, "top_k_experts": 2, "moe_intermediate_size": 32,
               "vocab_size_per_layer_input": 256, "hidden_size_per_layer_input": 16, "enable_moe_block": True},
    "dots1": {"n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 1},
    # default mrope_section [8, 12, 12] (hard-coded in the model) covers a 128-wide head
    "glm4v_moe": {"rope_parameters": {"mrope_section": [1, 1, 2]}},
}
_MOE_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_experts_per_tok",
               "num_experts_per_token", "moe_k", "moe_topk", "top_k_experts", "moe_intermediate_size")
_DEPTH_FIELDS = ("num_hidden_layers", "n_layers", "num_layers")
_DENSE_PREFIX_FIELDS = ("first_k_dense_replace", "num_dense_layers", "moe_layer_start_index")
_TEXT_CONFIG_PATHS = (("text_config",), ("thinker_config", "text_config"))
TINY_LAYERS = 2


@dataclass
class TinyModelInfo:
    architecture: str  # the transformers model folder, e.g. "qwen2_moe"
    model_class: str  # the class built, e.g. "Qwen2MoeForCausalLM"
    config_class: str
    text_decoder_only: bool  # a multimodal model of which the text decoder was built
    parameters: int
    has_lm_head: bool  # output has `.logits` (else `.last_hidden_state` is compared)


class CannotBuild(Exception):
    """transformers (or the shrinking) could not produce a runnable tiny model."""


def moe_architectures() -> list[str]:
    """Model folders of the installed transformers whose modeling code uses the experts interface."""
    import transformers

    root = os.path.join(os.path.dirname(transformers.__file__), "models")
    found = []
    for folder in sorted(os.listdir(root)):
        path = os.path.join(root, folder)
        if not os.path.isdir(path):
            continue
        for name in os.listdir(path):
            if name.startswith("modeling_") and name.endswith(".py"):
                with open(os.path.join(path, name), encoding="utf-8") as f:
                    if "use_experts_implementation" in f.read():
                        found.append(folder)
                        break
    return found


def default_config(architecture: str):
    """The architecture's config class built with its defaults (no arguments)."""
    from transformers import CONFIG_MAPPING

    try:
        config_cls = CONFIG_MAPPING[architecture]
    except KeyError as exc:
        raise CannotBuild(f"transformers registers no config for model type {architecture!r}") from exc
    try:
        return config_cls()
    except Exception as exc:  # noqa: BLE001 - any failure of transformers' own default is reported
        raise CannotBuild(f"{config_cls.__name__}() fails: {_one_line(exc)}") from exc


def text_config_of(config) -> tuple[Any, bool]:
    """(the config holding the MoE decoder, whether it is a multimodal model's sub-config)."""
    for path in _TEXT_CONFIG_PATHS:
        sub = config
        for attr in path:
            sub = getattr(sub, attr, None)
        if sub is not None and hasattr(sub, "hidden_size"):
            return sub, True
    return config, False


def shrink(config, layers: int = TINY_LAYERS) -> None:
    """Shrink a (text) config in place to tiny widths and `layers` decoder layers (+ dense prefix)."""
    values = config.to_dict()
    depth_field = next((f for f in _DEPTH_FIELDS if isinstance(values.get(f), int)), None)
    old_depth = values.get(depth_field) if depth_field else None
    prefix = 0
    for f in _DENSE_PREFIX_FIELDS:
        if isinstance(values.get(f), int) and values[f] > 0:
            prefix = 1
            _set(config, f, 1)
    for value in values.values():  # a per-layer MLP kind list that starts dense
        if isinstance(value, list) and value and value[0] == "dense" and "sparse" in value:
            prefix = 1
    new_depth = layers + prefix
    heads_before = values.get("num_attention_heads")
    for name, tiny in _TINY_FIELDS.items():
        if name in _MOE_FIELDS and name in values and values[name] is None:
            _set(config, name, tiny)  # an MoE count left unset by the default (dense default)
        elif isinstance(values.get(name), int) and not isinstance(values.get(name), bool):
            if name in ("n_groups", "mamba_n_groups", "o_groups"):
                tiny = min(tiny, values[name])
            _set(config, name, tiny if values[name] > 0 else 0)
    old_rope, old_head = values.get("qk_rope_head_dim"), values.get("head_dim")
    if isinstance(old_rope, int) and isinstance(old_head, int) and old_rope > 0 and old_head % old_rope == 0:
        # MLA: head_dim is the rotary part (DeepSeek) or a multiple set by a partial rotary factor
        _set(config, "head_dim", config.qk_rope_head_dim * (old_head // old_rope))
    for name, tiny in _TINY_FIELDS.items():  # per-modality sizes (ERNIE-VL: [text, vision] experts)
        if isinstance(values.get(name), list) and values[name] and all(isinstance(v, int) for v in values[name]):
            _set(config, name, [tiny] * len(values[name]))
    kv = values.get("num_key_value_heads")
    if isinstance(kv, int):
        _set(config, "num_key_value_heads", 1 if kv == 1 else 4 if kv == heads_before else 2)
    _shrink_groups(config, values)
    if depth_field:
        _set(config, depth_field, new_depth)
        for name, value in values.items():
            if isinstance(value, (list, str)) and old_depth and len(value) == old_depth and name != "model_type":
                _set(config, name, _first_layers(value, new_depth))
        if isinstance(values.get("mlp_only_layers"), list):
            _set(config, "mlp_only_layers", [])  # layer indices kept dense: none in a tiny model
    vocab = getattr(config, "vocab_size", None)
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        token = values.get(name)
        if isinstance(vocab, int) and isinstance(token, int) and token >= vocab:
            _set(config, name, vocab - 1)
        elif isinstance(vocab, int) and isinstance(token, list):
            _set(config, name, [min(t, vocab - 1) for t in token])
    _shrink_rope_sections(config, values)
    if isinstance(values.get("qk_head_dim"), int) and isinstance(values.get("qk_nope_head_dim"), int):
        _set(config, "qk_head_dim", config.qk_nope_head_dim + config.qk_rope_head_dim)
    for name in ("tie_word_embeddings",):
        if name in values:
            _set(config, name, False)


def _first_layers(per_layer, depth: int):
    """The first `depth` entries of a per-layer list; a dense prefix ("dense", "mlp", ...)
    longer than one layer is cut to one so that the tiny model keeps MoE layers."""
    kept = list(per_layer[:depth])
    moe_kinds = [v for v in per_layer if isinstance(v, str) and v.lower() in ("sparse", "moe")]
    if moe_kinds and kept and kept[-1] not in moe_kinds:
        kept = kept[:1] + [moe_kinds[0]] * (depth - 1)
    return "".join(kept) if isinstance(per_layer, str) else kept


def _shrink_rope_sections(config, values: dict) -> None:
    """Multimodal RoPE splits the rotary half-dimension into sections (e.g. [8, 12, 12]):
    scale them to the tiny head so they still sum to it."""
    rope = getattr(config, "rope_parameters", None)
    if not isinstance(rope, dict) or not isinstance(rope.get("mrope_section"), list):
        return
    old_head = values.get("head_dim") or values["hidden_size"] // values["num_attention_heads"]
    new_head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    sections = rope["mrope_section"]
    target = max(len(sections), sum(sections) * new_head // old_head)
    scaled = [max(1, s * target // sum(sections)) for s in sections]
    scaled[-1] += target - sum(scaled)
    config.rope_parameters = {**rope, "mrope_section": scaled}


def _shrink_groups(config, values: dict) -> None:
    """Group-limited routing: 4 groups of 2 experts, best 2 groups (when the model groups)."""
    for group_field in ("n_group", "num_expert_group"):
        if isinstance(values.get(group_field), int) and values[group_field] > 1:
            _set(config, group_field, 4)
            if isinstance(values.get("topk_group"), int):
                _set(config, "topk_group", 2)


def _set(config, name: str, value) -> None:
    try:
        setattr(config, name, value)
    except Exception:  # noqa: BLE001 - a read-only / derived property: leave it to the config
        pass


def build_tiny_model(architecture: str, *, dtype=None, seed: int = 0, layers: int = TINY_LAYERS):
    """(model in eval mode, TinyModelInfo) for an architecture; raises CannotBuild."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    config = default_config(architecture)
    text, is_sub = text_config_of(config)
    shrink(text, layers)
    for name, value in ARCH_OVERRIDES.get(architecture, {}).items():
        old = getattr(text, name, None)
        _set(text, name, {**old, **value} if isinstance(old, dict) and isinstance(value, dict) else value)
    torch.manual_seed(seed)
    model_cls = _decoder_class(architecture, text)
    try:
        model = model_cls(text) if model_cls is not None else AutoModelForCausalLM.from_config(text)
    except Exception as exc:  # noqa: BLE001 - transformers failed building its own model
        raise CannotBuild(f"building {type(text).__name__} fails: {_one_line(exc)}") from exc
    params = sum(p.numel() for p in model.parameters())
    if params > MAX_TINY_PARAMS:
        raise CannotBuild(f"shrunk model still has {params / 1e6:.0f} M parameters: a size field the "
                          "shrinker does not know (moecc/architectures.py _TINY_FIELDS)")
    _decisive_routing(model)
    if dtype is not None:
        model = model.to(dtype)
    info = TinyModelInfo(architecture, type(model).__name__, type(config).__name__, is_sub, params,
                         has_lm_head=hasattr(model, "lm_head") or "ForCausalLM" in type(model).__name__)
    return model.eval(), info


def _decoder_class(architecture: str, text_config):
    """The model class to build for a (text) config: None for AutoModelForCausalLM's own
    choice; else the modeling module's class for exactly this config class, a causal LM
    first (multimodal text configs are often not registered with the Auto classes)."""
    import importlib

    from transformers import AutoModelForCausalLM
    from transformers.modeling_utils import PreTrainedModel

    try:
        AutoModelForCausalLM._model_mapping[type(text_config)]
        return None
    except KeyError:
        pass
    module = importlib.import_module(f"transformers.models.{architecture}.modeling_{architecture}")
    classes = [c for c in vars(module).values() if isinstance(c, type) and issubclass(c, PreTrainedModel)
               and getattr(c, "config_class", None) is type(text_config)
               and not c.__name__.endswith("PreTrainedModel")]
    classes.sort(key=lambda c: (not c.__name__.endswith("ForCausalLM"), not c.__name__.endswith("Model"), c.__name__))
    if not classes:
        raise CannotBuild(f"transformers has no model class for {type(text_config).__name__} in {module.__name__}")
    return classes[0]


def _decisive_routing(model) -> None:
    """Wider router weights and biases, as moecc.models does: tiny random models otherwise
    route near-uniformly, so near-ties would make any comparison fragile."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gate.weight", "router.weight", "gate.wg.weight")):
                p.normal_(0.0, 0.5)
            elif name.endswith("lm_head.weight"):
                p.normal_(0.0, 1.0)
        for name, b in list(model.named_buffers()) + list(model.named_parameters()):
            if name.endswith(("e_score_correction_bias", "expert_bias")) and b.is_floating_point():
                b.normal_(0.0, 0.1)


def _one_line(exc: BaseException | None) -> str:
    text = " ".join(str(exc).split()) if exc is not None else ""
    text = f"{type(exc).__name__}: {text}" if exc is not None else text
    return text[:300]


def default_build_error(architecture: str) -> str | None:
    """Why eager transformers cannot build the architecture from its default config, or None.

    Built on the meta device (shapes only, nothing allocated), so full-size defaults cost
    seconds, not memory. Such architectures are listed, not counted for or against moecc.
    """
    import torch

    try:
        config = default_config(architecture)
        text, _ = text_config_of(config)
        model_cls = _decoder_class(architecture, text)
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model_cls(text) if model_cls is not None else AutoModelForCausalLM.from_config(text)
    except CannotBuild as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - transformers' own failure is the finding
        return _one_line(exc)
    return None
