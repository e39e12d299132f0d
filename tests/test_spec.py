"""The layer spec: validation and the JSON round trip the op carries."""

from __future__ import annotations

import pytest

from moecc.spec import ExpertSpec, MoELayerSpec, RouterSpec, SpecError


def _spec(**router):
    return MoELayerSpec(RouterSpec(num_experts=8, top_k=2, **router), ExpertSpec(64, 32))


def test_json_round_trip_is_exact():
    spec = MoELayerSpec(RouterSpec(256, 8, "sigmoid", n_group=8, topk_group=4, has_correction_bias=True,
                                   renormalize=True, renormalize_eps=1e-20, routed_scaling_factor=2.5),
                        ExpertSpec(7168, 2048, num_shared=1), source="model.layers.3.mlp")
    assert MoELayerSpec.from_json(spec.to_json()) == spec


@pytest.mark.parametrize("router, message", [
    (dict(scoring="relu"), "scoring"),
    (dict(n_group=3), "divide"),
    (dict(n_group=4, topk_group=5), "topk_group"),
    (dict(scoring="topk_softmax", has_correction_bias=True), "topk_softmax"),
])
def test_invalid_router_is_refused(router, message):
    with pytest.raises(SpecError, match=message):
        _spec(**router)


def test_top_k_bounds_and_activation():
    with pytest.raises(SpecError, match="top_k"):
        MoELayerSpec(RouterSpec(4, 5), ExpertSpec(8, 8))
    with pytest.raises(SpecError, match="activation"):
        MoELayerSpec(RouterSpec(4, 1), ExpertSpec(8, 8, activation="relu"))


def test_corrupted_spec_text_is_a_clear_error():
    with pytest.raises(SpecError, match="not a valid moecc layer spec"):
        MoELayerSpec.from_json('{"router": {}}')


def test_canonical_layout_flag():
    assert ExpertSpec(8, 8).canonical
    assert not ExpertSpec(8, 8, gate_up_layout="interleaved").canonical
    assert not ExpertSpec(8, 8, num_shared=1).canonical
    assert ExpertSpec(8, 8, num_shared=1, shared_fused=True).canonical
