"""Random canonical MoE layers for kernel tests (shared by the Triton and TVM tests).

Canonical: gate/up concatenated [E', 2N, K], down [E', K, N], shared experts fused as
the last S of the stack (E' = E + S). Weights are scaled by 1/sqrt(fan-in) so outputs
are O(1) and the dtype tolerances in moecc/tolerances.py are meaningful.
"""

from __future__ import annotations

import torch

from moecc.spec import ExpertSpec, MoELayerSpec, RouterSpec
from moecc.weights import MoEWeights, make_weights


def make_layer(router: RouterSpec, k: int = 64, n: int = 32, *, activation="silu", bias=False, num_shared=0,
               dtype=torch.float32, swiglu_limit=7.0, device="cpu") -> tuple[MoELayerSpec, MoEWeights]:
    spec = MoELayerSpec(router, ExpertSpec(k, n, activation=activation, has_bias=bias, num_shared=num_shared,
                                           shared_fused=num_shared > 0, swiglu_limit=swiglu_limit))
    e, stack = router.num_experts, router.num_experts + num_shared

    def rnd(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, device=device) * scale).to(dt)

    weights = make_weights(
        router_weight=rnd(e, k, scale=k ** -0.5),
        router_bias=rnd(e, scale=0.1) if router.has_router_bias else None,
        correction_bias=rnd(e, scale=0.1, dt=torch.float32) if router.has_correction_bias else None,
        gate_up=rnd(stack, 2 * n, k, scale=k ** -0.5),
        down=rnd(stack, k, n, scale=n ** -0.5),
        gate_up_bias=rnd(stack, 2 * n, scale=0.1) if bias else None,
        down_bias=rnd(stack, k, scale=0.1) if bias else None,
    )
    return spec, weights


def tie_free_hidden(spec: MoELayerSpec, weights: MoEWeights, tokens: int, dtype: torch.dtype,
                    device="cpu", margin: float = 2e-3, tries: int = 50) -> torch.Tensor:
    """Random hidden states [T, K] whose expert selection has no near-tie.

    Two correct implementations may break a rounding-level tie between the k-th and the
    (k+1)-th expert differently, which changes a whole expert's contribution to that
    token. Rows whose selection scores (logits for softmax / top-k-softmax routers, which
    select monotonically in them; sigmoid + correction bias for sigmoid routers) have
    the k-th and (k+1)-th best closer than `margin` are redrawn.
    """
    from moecc.backends.reference.routing import router_logits

    router = spec.router
    x = torch.randn(tokens, spec.experts.hidden_size, device=device).to(dtype)
    if router.top_k >= router.num_experts:
        return x  # every expert is selected: nothing to tie
    for _ in range(tries):
        scores = router_logits(x, weights.router_weight, weights.router_bias, router)  # [T, E]
        if router.scoring == "sigmoid":
            scores = torch.sigmoid(scores)
            if weights.correction_bias is not None:
                scores = scores + weights.correction_bias.float()
        best = scores.topk(router.top_k + 1, dim=-1).values  # [T, k+1], descending
        tied = (best[:, -2] - best[:, -1]) < margin  # [T]
        if not tied.any():
            return x
        x[tied] = torch.randn(int(tied.sum()), spec.experts.hidden_size, device=device).to(dtype)
    raise RuntimeError("could not draw hidden states without a routing near-tie; lower the margin")


def check_tvm_against_reference(spec: MoELayerSpec, weights: MoEWeights, tokens: int, dtype: torch.dtype,
                                config: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The TVM op on tie-free hidden states [T, K] against the reference op computed in fp32
    on the same inputs (the kernels' math), within `dtype`'s tolerance; returns (x, reference)."""
    from moecc.backends import reference
    from moecc.backends.tvm import moe_layer
    from moecc.tolerances import check_close

    x = tie_free_hidden(spec, weights, tokens, dtype)
    out = moe_layer(x, weights, spec, config)
    assert out.dtype == dtype and out.shape == x.shape
    ref = reference.moe_layer(x.float(), weights, spec)
    check_close(out.float() if dtype == torch.float32 else out, ref.to(dtype), dtype)
    return x, ref
