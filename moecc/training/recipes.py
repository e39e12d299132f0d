"""The shipped models' configurations and training hyperparameters, one recipe per model.

Sized for a shared 2-core CPU and a few MB each: byte vocabulary (256), hidden 128,
3 layers, 16 routed experts of width 64, top-2, sequences of 256 bytes. The step counts
are what the CPU time of the 2026-12-02 run allowed (one step of 16 x 256 bytes is about
0.4 s (Qwen3) / 0.6 s (DeepSeek) of one core); each CARD.md gives the time it took.

- qwen3-moe-stdlib: Qwen3-MoE (softmax top-k renormalised, GQA), trained with
  transformers' load-balancing loss.
- qwen3-moe-stdlib-noaux: the same without the load-balancing loss, so routing is free to
  collapse and some experts go cold (what dead-expert elimination is for).
- deepseek-v3-stdlib: DeepSeek-V3 (sigmoid router + score-correction bias, 4 expert groups
  of which 2 are kept, one shared expert, a dense first layer, MLA attention with
  q_lora_rank 64 / kv_lora_rank 32). transformers has no auxiliary loss for it; the
  correction bias is trained the DeepSeek-V3 way (auxiliary-loss-free balancing: after each
  step, bias += speed * sign(mean load - expert load)).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

_SHARED = dict(
    vocab_size=256,
    hidden_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    num_experts_per_tok=2,
    moe_intermediate_size=64,
    norm_topk_prob=True,
    rms_norm_eps=1e-6,
)

_QWEN3 = dict(_SHARED, num_key_value_heads=2, head_dim=32, num_experts=16, intermediate_size=256,
              decoder_sparse_step=1, mlp_only_layers=[])

_DEEPSEEK = dict(_SHARED, num_key_value_heads=4, n_routed_experts=16, n_group=4, topk_group=2,
                 n_shared_experts=1, first_k_dense_replace=1, intermediate_size=256,
                 routed_scaling_factor=2.5, q_lora_rank=64, kv_lora_rank=32, qk_rope_head_dim=16,
                 qk_nope_head_dim=32, v_head_dim=32, head_dim=16)


@dataclass(frozen=True)
class Recipe:
    """One model: its transformers config and how it is trained."""

    name: str
    model_type: str
    config: dict[str, Any]
    steps: int = 700
    batch: int = 16
    seq_len: int = 256
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.01
    code_share: float = 0.75          # fraction of each batch drawn from code, the rest English
    aux_loss_coef: float = 0.0        # transformers' load-balancing loss (Qwen3-MoE only)
    bias_update_speed: float = 0.0    # DeepSeek-V3 auxiliary-loss-free balancing
    seed: int = 0
    notes: list[str] = field(default_factory=list)


RECIPES: dict[str, Recipe] = {
    r.name: r for r in (
        Recipe("qwen3-moe-stdlib", "qwen3_moe", _QWEN3, aux_loss_coef=0.01,
               notes=["load-balancing loss (router_aux_loss_coef 0.01)"]),
        Recipe("qwen3-moe-stdlib-noaux", "qwen3_moe", _QWEN3, aux_loss_coef=0.0, seed=1, steps=400,
               notes=["no load-balancing loss: some experts go cold"]),
        Recipe("deepseek-v3-stdlib", "deepseek_v3", _DEEPSEEK, bias_update_speed=1e-3, steps=300,
               notes=["auxiliary-loss-free balancing: correction bias += 1e-3 * sign(mean load - load) per step"]),
    )
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise KeyError(f"no training recipe {name!r}; known: {', '.join(RECIPES)}")
    return RECIPES[name]
