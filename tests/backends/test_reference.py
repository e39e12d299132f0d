"""The reference op against the models' own eager MoE blocks, and routing by hand."""

from __future__ import annotations

import pytest
import torch

from moecc.backends.reference import moe_layer, route
from moecc.models import build_model
from moecc.spec import ExpertSpec, MoELayerSpec, RouterSpec
from moecc.weights import make_weights


def _block_and_weights(name):
    model = build_model(name, experts_implementation="eager")
    blk = next(m for m in model.modules() if hasattr(m, "experts") and isinstance(m.experts, torch.nn.Module))
    ex = blk.experts
    cfg = model.config
    if name == "gpt-oss-tiny":
        spec = MoELayerSpec(RouterSpec(8, 2, "topk_softmax", has_router_bias=True),
                            ExpertSpec(64, 32, "swiglu_oai", swiglu_alpha=ex.alpha, swiglu_limit=ex.limit,
                                       gate_up_layout="interleaved", gate_up_transposed=True,
                                       down_transposed=True, has_bias=True))
        w = make_weights(router_weight=blk.router.weight, router_bias=blk.router.bias, gate_up=ex.gate_up_proj,
                         down=ex.down_proj, gate_up_bias=ex.gate_up_proj_bias, down_bias=ex.down_proj_bias)
    elif name == "deepseek-v3-tiny":
        g, se = blk.gate, blk.shared_experts
        spec = MoELayerSpec(RouterSpec(8, 2, "sigmoid", n_group=4, topk_group=2, has_correction_bias=True,
                                       renormalize=True, renormalize_eps=1e-20, routed_scaling_factor=2.5,
                                       logits_in_fp32=True), ExpertSpec(64, 32, num_shared=cfg.n_shared_experts))
        w = make_weights(router_weight=g.weight, correction_bias=g.e_score_correction_bias, gate_up=ex.gate_up_proj,
                         down=ex.down_proj, shared_gate=se.gate_proj.weight, shared_up=se.up_proj.weight,
                         shared_down=se.down_proj.weight)
    else:
        spec = MoELayerSpec(RouterSpec(8, 2, "softmax", renormalize=True), ExpertSpec(64, ex.intermediate_dim))
        w = make_weights(router_weight=blk.gate.weight, gate_up=ex.gate_up_proj, down=ex.down_proj)
    return blk, w, spec


@pytest.mark.parametrize("name", ["qwen3-moe-tiny", "mixtral-tiny", "deepseek-v3-tiny", "gpt-oss-tiny"])
@pytest.mark.parametrize("tokens", [1, 13])
def test_reference_matches_the_models_eager_block(name, tokens):
    blk, w, spec = _block_and_weights(name)
    x = torch.randn(1, tokens, 64)
    with torch.no_grad():
        expected = blk(x)
        expected = expected[0] if isinstance(expected, tuple) else expected
        got = moe_layer(x.view(-1, 64), w, spec).view_as(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_softmax_routing_by_hand():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    w, ids = route(logits, RouterSpec(4, 2, renormalize=False))
    p = torch.softmax(logits, -1)[0]
    assert ids.tolist() == [[1, 2]]
    torch.testing.assert_close(w, torch.stack([p[1], p[2]]).unsqueeze(0))
    w, _ = route(logits, RouterSpec(4, 2, renormalize=True, routed_scaling_factor=2.0))
    torch.testing.assert_close(w.sum(), torch.tensor(2.0))


def test_group_limited_sigmoid_routing_by_hand():
    # Groups {0,1} and {2,3}; topk_group=1 keeps the group with the larger top-2 sum.
    logits = torch.tensor([[2.0, -3.0, 1.0, 0.9]])  # group sums: s(2)+s(-3)=0.93 < s(1)+s(.9)=1.44
    w, ids = route(logits, RouterSpec(4, 2, "sigmoid", n_group=2, topk_group=1))
    assert sorted(ids[0].tolist()) == [2, 3]  # expert 0 has the best score but its group loses
    bias = torch.tensor([0.0, 0.0, 0.0, -10.0])  # the correction bias steers selection only
    w, ids = route(logits, RouterSpec(4, 1, "sigmoid", has_correction_bias=True), bias)
    assert ids.tolist() == [[0]]
    torch.testing.assert_close(w, torch.sigmoid(logits[:, :1]))


def test_topk_softmax_routing_by_hand():
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0]])
    w, ids = route(logits, RouterSpec(4, 2, "topk_softmax"))
    assert ids.tolist() == [[1, 2]]
    torch.testing.assert_close(w, torch.softmax(torch.tensor([[5.0, 4.0]]), -1))


def test_wrong_hidden_shape_is_a_clear_error():
    _, w, spec = _block_and_weights("qwen3-moe-tiny")
    with pytest.raises(ValueError, match=r"\[T, 64\]"):
        moe_layer(torch.randn(3, 32), w, spec)


def test_experts_without_tokens_are_not_read():
    """The reference touches only experts that received tokens: poison the others."""
    spec = MoELayerSpec(RouterSpec(4, 1), ExpertSpec(8, 4))
    router = torch.zeros(4, 8)
    router[2] = 10.0  # every token with a positive feature sum picks expert 2
    gate_up, down = torch.randn(4, 8, 8), torch.randn(4, 8, 4)
    gate_up[[0, 1, 3]] = float("nan")
    down[[0, 1, 3]] = float("nan")
    out = moe_layer(torch.rand(5, 8), make_weights(router_weight=router, gate_up=gate_up, down=down), spec)
    assert torch.isfinite(out).all()
