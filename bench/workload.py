"""What one benchmark point runs on: the layer spec, its weights and its input.

Each reference shape (moecc/shapes.py) is benchmarked with the router of the model it
comes from, so routing cost and the experts it selects are realistic:

    mixtral-8x7b      softmax -> top-2, renormalised
    qwen3-30b-a3b     softmax -> top-8, renormalised (norm_topk_prob=True)
    deepseek-v2-lite  softmax -> top-6, not renormalised
    deepseek-v3       sigmoid + correction bias, group-limited (4 of 8 groups),
                      renormalised, scaled by 2.5, router matmul in fp32

Only routed experts are benchmarked (no shared experts): the roofline floor of
ARCHITECTURE.md counts U routed experts. Weights are canonical (gate_up [E, 2N, K],
down [E, K, N]) and random with unit-scale activations; never zeros.
"""

from __future__ import annotations

import dataclasses

import torch

from moecc.shapes import MoEShape
from moecc.spec import ExpertSpec, MoELayerSpec, RouterSpec
from moecc.weights import MoEWeights, make_weights

_ROUTERS = {
    "mixtral-8x7b": dict(scoring="softmax", renormalize=True),
    "qwen3-30b-a3b": dict(scoring="softmax", renormalize=True),
    "deepseek-v2-lite": dict(scoring="softmax", renormalize=False),
    "deepseek-v3": dict(scoring="sigmoid", has_correction_bias=True, n_group=8, topk_group=4,
                        renormalize=True, renormalize_eps=1e-20, routed_scaling_factor=2.5,
                        logits_in_fp32=True),
}
TINY_SUFFIX = "@tiny"


def base_name(shape: MoEShape) -> str:
    """The reference shape a (possibly tiny) shape was derived from."""
    return shape.name.removesuffix(TINY_SUFFIX)


def layer_spec(shape: MoEShape) -> MoELayerSpec:
    """The benchmark's layer: the model's router, SwiGLU experts, canonical layout."""
    router = _ROUTERS.get(base_name(shape), dict(scoring="softmax", renormalize=True))
    return MoELayerSpec(
        router=RouterSpec(num_experts=shape.num_experts, top_k=shape.top_k, **router),
        experts=ExpertSpec(hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size),
        source=f"bench:{shape.name}",
    )


def tiny_shape(shape: MoEShape, hidden: int = 64, intermediate: int = 32) -> MoEShape:
    """Same experts, top-k and router as `shape`, CPU-sized widths (for smoke runs and tests)."""
    return dataclasses.replace(shape, name=shape.name + TINY_SUFFIX, hidden_size=hidden,
                               intermediate_size=intermediate)


def random_weights(spec: MoELayerSpec, dtype: torch.dtype, device: torch.device | str,
                   seed: int = 0) -> MoEWeights:
    """Canonical random weights, scaled so every activation stays O(1)."""
    e, k, n = spec.router.num_experts, spec.experts.hidden_size, spec.experts.intermediate_size
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*size: int, std: float, dt: torch.dtype = dtype) -> torch.Tensor:
        return torch.randn(*size, generator=gen, device=device, dtype=dt).mul_(std)

    correction = None
    if spec.router.has_correction_bias:
        correction = randn(e, std=0.02, dt=torch.float32)  # [E] small, as trained ones are
    return make_weights(
        router_weight=randn(e, k, std=k ** -0.5),  # [E, K]: logits ~ N(0, 1)
        correction_bias=correction,
        gate_up=randn(e, 2 * n, k, std=k ** -0.5),  # [E, 2N, K]
        down=randn(e, k, n, std=n ** -0.5),  # [E, K, N]
    )


def random_hidden(tokens: int, hidden_size: int, dtype: torch.dtype, device: torch.device | str,
                  seed: int) -> torch.Tensor:
    """Fresh hidden states [T, K] ~ N(0, 1)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(tokens, hidden_size, generator=gen, device=device, dtype=dtype)


def distinct_experts_hit(hidden: torch.Tensor, weights: MoEWeights, spec: MoELayerSpec) -> int:
    """U: how many distinct routed experts the reference routing selects for `hidden`."""
    from moecc.backends.reference import route, router_logits

    logits = router_logits(hidden, weights.router_weight, weights.router_bias, spec.router)  # [T, E]
    _, ids = route(logits, spec.router, weights.correction_bias)  # [T, k]
    return int(torch.unique(ids).numel())
