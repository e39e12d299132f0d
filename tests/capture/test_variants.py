"""Layer variants beyond the four built-in families, each on the transformers model that
uses it: compiled logits match eager (fp32), one moecc op per MoE block, and the spec
names the variant.

    qwen2_moe     gated shared expert: sigmoid(shared_expert_gate(x)) * shared(x)
    afmoe         sigmoid routing with an `expert_bias` selection bias
    ernie4_5_moe  softmax + [1, E] selection bias, renormalisation clamped at norm_min
    beam          routed_scaling_factor applied to the experts' sum in the block
    kolibri1      selection on raw logits + bias, weights = sigmoid of the selected logits
    inkling2      softcapped SwiGLU experts (tanh caps on gate and up)
    minimax_m3_vl shared MLP with one fused gate/up Linear, narrower than the experts
    nemotron_h    non-gated ReLU^2 experts and shared MLP
    phimoe        sparsemixer routing (max + masked softmax, no topk)
    axk1          a norm on the block's output (left in the graph after the moecc op)
    deepseek_v4   sqrt(softplus) scores; its hash-routed layers are declined with a reason
"""

from __future__ import annotations

import pytest
import torch
from model_checks import assert_logits_close, compile_with_report

from moecc.architectures import build_tiny_model

CASES = {
    "qwen2_moe": lambda s: s.experts.shared_gated and s.experts.num_shared == 2,
    "afmoe": lambda s: s.router.scoring == "sigmoid" and s.router.has_correction_bias,
    "ernie4_5_moe": lambda s: s.router.scoring == "softmax" and s.router.has_correction_bias
    and s.router.renormalize_min > 0,
    "beam": lambda s: s.router.routed_scaling_factor == 2.5 and s.router.n_group == 4,
    "kolibri1": lambda s: s.router.select_on_logits and s.router.has_correction_bias,
    "inkling2": lambda s: s.experts.activation == "swiglu_softcap" and s.experts.gate_softcap > 0,
    "minimax_m3_vl": lambda s: s.experts.shared_gate_up_fused and s.experts.shared_intermediate_size == 32,
    "nemotron_h": lambda s: not s.experts.gated and s.experts.activation == "relu2" and s.experts.num_shared == 1,
    "phimoe": lambda s: s.router.scoring == "sparsemixer" and s.router.sparsemixer_eps > 0,
    "axk1": lambda s: s.router.n_group == 4 and s.experts.num_shared == 1,
}


def _moe_blocks(model) -> int:
    return sum(1 for m in model.modules() if isinstance(getattr(m, "experts", None), torch.nn.Module))


@pytest.mark.parametrize("arch", list(CASES))
def test_variant_captured_and_matches_eager(arch, quiet):
    model, _ = build_tiny_model(arch)
    model.set_experts_implementation("grouped_mm")
    compiled, report = compile_with_report(model)
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eager = model(ids).logits
        got = compiled(ids).logits
    assert_logits_close(got, eager)
    assert len(report.captured) == _moe_blocks(model) >= 1, report.format()
    assert report.skipped == []
    for layer in report.captured:
        assert layer.verified and CASES[arch](layer.spec), layer.spec.describe()


def test_sqrt_softplus_router_captured_hash_router_declined(quiet):
    model, _ = build_tiny_model("deepseek_v4")
    model.set_experts_implementation("grouped_mm")
    compiled, report = compile_with_report(model)
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_logits_close(compiled(ids).logits, model(ids).logits)
    assert [c.spec.router.scoring for c in report.captured] == ["sqrt_softplus"]
    assert len(report.skipped) == 1 and "no torch.topk selects the experts" in report.skipped[0].reason


def test_gated_shared_layers_stay_on_reference_when_kernels_lack_them(quiet):
    """kernel_backend='tvm': the TVM kernels treat shared experts as weight-1 experts, so
    the lowering keeps gated layers on the reference op (and says why)."""
    model, _ = build_tiny_model("qwen2_moe")
    model.set_experts_implementation("grouped_mm")
    compiled, report = compile_with_report(model, kernel_backend="tvm")
    ids = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert_logits_close(compiled(ids).logits, model(ids).logits)
    layers = _moe_blocks(model)
    assert report.pass_counter("lower_kernels", "reference") == layers
    assert report.pass_counter("lower_kernels", "tvm") == 0
    notes = [n for g in report.graphs for p in g.passes for n in p.notes]
    assert any("gated shared experts" in n for n in notes), notes


def test_reference_gated_shared_experts_definition():
    """The reference op's gated shared experts equal routed + sigmoid(x g^T) * shared, and
    differ from ungated ones (so capture verification can tell the two apart)."""
    from moecc.backends.reference import moe_layer
    from moecc.spec import ExpertSpec, MoELayerSpec, RouterSpec
    from moecc.weights import make_weights

    g = torch.Generator().manual_seed(0)
    e, k, n, t = 4, 16, 8, 6
    w = make_weights(router_weight=torch.randn(e, k, generator=g), gate_up=torch.randn(e, 2 * n, k, generator=g),
                     down=torch.randn(e, k, n, generator=g), shared_gate=torch.randn(n, k, generator=g),
                     shared_up=torch.randn(n, k, generator=g), shared_down=torch.randn(k, n, generator=g),
                     shared_expert_gate=torch.randn(1, k, generator=g))
    x = torch.randn(t, k, generator=g)
    router = RouterSpec(num_experts=e, top_k=2)
    gated = MoELayerSpec(router, ExpertSpec(k, n, num_shared=1, shared_gated=True))
    plain = MoELayerSpec(router, ExpertSpec(k, n, num_shared=1))
    unshared = MoELayerSpec(router, ExpertSpec(k, n))
    routed = moe_layer(x, w, unshared)
    shared = moe_layer(x, w, plain) - routed
    expected = routed + torch.sigmoid(x @ w.shared_expert_gate.T) * shared
    torch.testing.assert_close(moe_layer(x, w, gated), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(moe_layer(x, w, plain), expected, rtol=1e-3, atol=1e-3)
