"""Built-in MoE models: small, download-free models for the demo, eval and tests.

Two kinds:
- random-weight configs (BUILTIN_MODELS): a transformers config family plus the few
  fields that make it tiny;
- trained models shipped in moecc/trained/<name>/ (TRAINED_MODELS): byte-level language
  models trained on the Python standard library (moecc/training/, docs/models.md).

`load_config` also accepts a path to a transformers config.json (or a folder holding
one), so every command that takes a model takes either; `build_model` loads the trained
weights for a trained name or a folder with model.safetensors, random weights otherwise.

    build_model("qwen3-moe-tiny", dtype=torch.bfloat16, experts_implementation="grouped_mm")
    build_model("qwen3-moe-stdlib")   # trained, fp32
"""

from __future__ import annotations

import json
import os
from typing import Any

from moecc.shapes import MoEShape

_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)

# name -> (transformers model_type, overrides); all have 8 routed experts, top-2.
BUILTIN_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen3-moe-tiny": ("qwen3_moe", dict(_COMMON, head_dim=16, moe_intermediate_size=32, num_experts=8,
                                         num_experts_per_tok=2, norm_topk_prob=True)),
    "mixtral-tiny": ("mixtral", dict(_COMMON, head_dim=16, num_local_experts=8, num_experts_per_tok=2,
                                     intermediate_size=48)),
    "deepseek-v3-tiny": ("deepseek_v3", dict(_COMMON, moe_intermediate_size=32, n_routed_experts=8,
                                             num_experts_per_tok=2, n_group=4, topk_group=2, n_shared_experts=1,
                                             first_k_dense_replace=1, routed_scaling_factor=2.5,
                                             norm_topk_prob=True, q_lora_rank=None, kv_lora_rank=16,
                                             qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, head_dim=8,
                                             num_hidden_layers=3, num_key_value_heads=4)),
    "gpt-oss-tiny": ("gpt_oss", dict(_COMMON, head_dim=16, num_local_experts=8, num_experts_per_tok=2,
                                     intermediate_size=32, sliding_window=32,
                                     layer_types=["sliding_attention", "full_attention"],
                                     # YaRN's implied factor must match the configured 32
                                     max_position_embeddings=131072)),
    # The demo's default: 2 layers of 64 experts (hidden 1024, width 512, top-8; ~0.8 GB in
    # fp32): builds and compiles in seconds on a laptop CPU, yet wide enough that the MoE
    # layers, not per-op overhead, dominate a forward pass.
    "qwen3-moe-demo": ("qwen3_moe", dict(_COMMON, hidden_size=1024, head_dim=64, num_attention_heads=16,
                                         num_key_value_heads=4, moe_intermediate_size=512, num_experts=64,
                                         num_experts_per_tok=8, norm_topk_prob=True, vocab_size=2048,
                                         intermediate_size=2048)),
}

# Trained byte-level models shipped with moecc (see docs/models.md and each CARD.md).
TRAINED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "trained")
TRAINED_MODELS = ("qwen3-moe-stdlib", "qwen3-moe-stdlib-noaux", "deepseek-v3-stdlib")
# Fixed held-out text (code/*.py, english/*.txt) that `moecc eval` reads by default.
HELDOUT_DIR = os.path.join(TRAINED_DIR, "heldout")
DEMO_MODEL = "qwen3-moe-stdlib"


def model_names() -> list[str]:
    return list(TRAINED_MODELS) + list(BUILTIN_MODELS)


def trained_model_dir(name_or_path: str) -> str | None:
    """The folder of a trained model (a built-in trained name, or a folder with weights), else None."""
    if name_or_path in TRAINED_MODELS:
        path = os.path.join(TRAINED_DIR, name_or_path)
        if not os.path.isfile(os.path.join(path, "model.safetensors")):
            raise FileNotFoundError(f"{path}/model.safetensors is missing: this moecc install lacks the trained "
                                    f"weights; reinstall moecc, or retrain with python -m moecc.training.train "
                                    f"{name_or_path} --out {path}")
        return path
    if os.path.isdir(name_or_path) and os.path.isfile(os.path.join(name_or_path, "model.safetensors")):
        return name_or_path
    return None


def load_config(name_or_path: str):
    """A transformers config from a built-in name or a config.json path."""
    from transformers import AutoConfig

    if name_or_path in BUILTIN_MODELS:
        model_type, overrides = BUILTIN_MODELS[name_or_path]
        return AutoConfig.for_model(model_type, **overrides)
    if name_or_path in TRAINED_MODELS:
        name_or_path = os.path.join(TRAINED_DIR, name_or_path)
    if os.path.isdir(name_or_path):
        name_or_path = os.path.join(name_or_path, "config.json")
    if not os.path.isfile(name_or_path):
        raise FileNotFoundError(
            f"{name_or_path!r} is neither a built-in model ({', '.join(model_names())}) nor a config.json file"
        )
    with open(name_or_path) as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{name_or_path} is not valid JSON: {exc}") from exc
    if "model_type" not in raw:
        raise ValueError(f"{name_or_path} has no 'model_type'; is it a transformers config.json?")
    return AutoConfig.for_model(raw.pop("model_type"), **raw)


def build_model(name_or_path: str, *, dtype=None, experts_implementation: str = "grouped_mm",
                seed: int = 0, device: str = "cpu", **overrides):
    """A causal-LM in eval mode: trained weights for a trained model (name or folder with
    model.safetensors), else random weights (init std raised so routing is not degenerate)."""
    import torch
    from transformers import AutoModelForCausalLM

    trained = trained_model_dir(name_or_path)
    if trained is not None:
        return load_trained(trained, dtype=dtype, experts_implementation=experts_implementation, device=device,
                            **overrides)
    config = load_config(name_or_path)
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.set_experts_implementation(experts_implementation)
    with torch.no_grad():
        # Tiny random models with the default init route almost uniformly; wider router
        # weights and score-correction biases make routing decisive, as in trained models.
        # A wide LM head gives greedy decoding margins well above bf16 rounding noise, as
        # trained models have; with the default init, near-ties flip tokens in bf16.
        for name, p in model.named_parameters():
            if name.endswith(("gate.weight", "router.weight")):
                p.normal_(0.0, 0.5)
            elif name == "lm_head.weight":
                p.normal_(0.0, 1.0)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.1)
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return model.eval()


def moe_shape_from_config(config, name: str = "model") -> MoEShape:
    """The routed-expert shape (E, top-k, K, N) of a transformers MoE config."""
    experts = _first_attr(config, "num_experts", "num_local_experts", "n_routed_experts")
    top_k = _first_attr(config, "num_experts_per_tok", "moe_topk", "top_k")
    inter = _first_attr(config, "moe_intermediate_size", "intermediate_size")
    if experts is None or top_k is None or inter is None:
        raise ValueError(f"{name}: config has no MoE fields (num_experts / num_experts_per_tok / moe_intermediate_size)")
    return MoEShape(name, int(experts), int(top_k), int(config.hidden_size), int(inter))


def _first_attr(config, *names):
    for n in names:
        v = getattr(config, n, None)
        if v:
            return v
    return None


def load_trained(path: str, *, dtype=None, experts_implementation: str = "grouped_mm", device: str = "cpu",
                 **overrides):
    """A shipped (or retrained) byte-level model from its folder, in eval mode.

    The weights are stored in fp32; `dtype` casts after loading (default fp32).
    """
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32, **overrides)
    model.set_experts_implementation(experts_implementation)
    return model.to(device).eval()
