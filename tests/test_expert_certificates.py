"""Data-free unreachable-expert certificates (moecc/expert_certificates.py): what they
prove holds on adversarial inputs at the bound, removing certified experts leaves a trained
model's outputs bit-identical, and nothing is certified where nothing can be proven."""

from __future__ import annotations

import copy

import torch

import moecc

from moecc.expert_certificates import (RouterFacts, certified_plan, certify, certify_model,
                                       rmsnorm_input_bound)
from moecc.pruning import mask_experts
from routing_fixtures import trained_model


def _selected(facts: RouterFacts, h: torch.Tensor) -> set[int]:
    """Experts the router selects for inputs h [T, K] (logit ranking or sigmoid + bias)."""
    logits = h.double() @ facts.weight.double().T + (facts.bias.double() if facts.bias is not None else 0)
    choice = torch.sigmoid(logits) if facts.scoring == "sigmoid" else logits
    if facts.scoring == "softmax" and facts.correction is not None:
        choice = torch.softmax(logits, dim=-1)  # probability + bias (ERNIE-style)
    if facts.correction is not None:
        choice = choice + facts.correction.double()
    return set(choice.topk(facts.top_k, dim=-1).indices.reshape(-1).tolist())


def _adversarial(facts: RouterFacts, j: int, bound: float, n: int = 2000) -> torch.Tensor:
    """Random inputs on the sphere of radius `bound`, plus the ones pushing j up against each other."""
    gen = torch.Generator().manual_seed(0)
    k = facts.weight.shape[1]
    h = torch.randn(n, k, generator=gen, dtype=torch.float64)
    pushes = (facts.weight[j].double() - facts.weight.double())  # [E, K]: toward j, away from i
    h = torch.cat([h, pushes[pushes.norm(dim=-1) > 0], facts.weight[j:j + 1].double()])
    return h / h.norm(dim=-1, keepdim=True) * bound


def test_dominated_and_masked_experts_are_never_selected_at_the_bound():
    gen = torch.Generator().manual_seed(1)
    e, k, bound = 8, 16, 2.0
    w = torch.randn(e, k, generator=gen) * 0.1
    bias = torch.zeros(e)
    bias[3] = -5.0                      # far behind everyone: provably never in the top-2
    bias[5] = float("-inf")             # masked by hand
    facts = RouterFacts(w, bias, None, top_k=2, scoring="softmax")
    certs = {c.expert: c for c in certify(facts, bound)}
    assert set(certs) == {3, 5} and certs[3].kind == "dominated" and certs[5].kind == "masked"
    assert len(certs[3].witnesses) >= 2
    for j in certs:
        assert j not in _selected(facts, _adversarial(facts, j, bound))
    # The same gap is no proof when inputs may be 100x larger: none is claimed.
    assert {c.expert for c in certify(facts, 100 * bound)} == {5}


def test_sigmoid_correction_bias_certificate_is_sound():
    gen = torch.Generator().manual_seed(2)
    e, k, bound = 8, 16, 3.0
    w = torch.randn(e, k, generator=gen) * 0.05
    corr = torch.zeros(e)
    corr[6] = -1.5  # sigmoid differences are at most 1: everyone stays ahead
    facts = RouterFacts(w, None, corr, top_k=2, scoring="sigmoid")
    certs = certify(facts, bound)
    assert [c.expert for c in certs] == [6]
    assert 6 not in _selected(facts, _adversarial(facts, 6, bound))
    corr[6] = -0.01  # a tiny bias: nothing provable
    assert certify(facts, bound) == []


def test_duplicated_router_rows_rank_by_their_biases():
    """Rows 0, 1, 2 equal: under softmax probability + correction bias (no other proof)
    expert 2, with two equal-row experts of higher bias, is never selected, at any input
    norm; equal biases tie and are not certified."""
    gen = torch.Generator().manual_seed(3)
    e, k, bound = 6, 16, 50.0
    w = torch.randn(e, k, generator=gen)
    w[1] = w[2] = w[0]
    corr = torch.tensor([0.02, 0.01, 0.0, 0.0, 0.0, 0.0])
    facts = RouterFacts(w, None, corr, top_k=2, scoring="softmax")
    certs = certify(facts, bound)
    assert [(c.expert, c.kind, set(c.witnesses)) for c in certs] == [(2, "duplicate", {0, 1})]
    assert "router row equal to experts [0, 1]" in certs[0].detail
    h = torch.cat([_adversarial(facts, 2, bound), _adversarial(facts, 2, 0.01)])
    picked = _selected(facts, h)
    assert 2 not in picked and {0, 1} <= picked  # the duplicates are reachable, the certified one not
    corr[1] = 0.0  # now 1 and 2 tie: only one expert (0) is surely ahead of 2
    assert certify(facts, bound) == []
    # Sigmoid: the same rows with a router bias in 0's favour need only c_0 > c_2 (the
    # general rule would ask c_0 - c_2 > (b_0 - b_2) / 4 = 0.25).
    bias = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    corr = torch.tensor([0.02, 0.01, 0.0, 0.0, 0.0, 0.0])
    sig = RouterFacts(w, bias, corr, top_k=2, scoring="sigmoid")
    assert [c.expert for c in certify(sig, bound)] == [2]
    assert 2 not in _selected(sig, _adversarial(sig, 2, bound))


def test_certified_experts_removed_leave_the_trained_model_unchanged():
    model = copy.deepcopy(trained_model("deepseek-v3-stdlib"))
    assert all(not c for c in certify_model(model).values())  # trained routers: nothing to prove
    gate = model.model.layers[1].mlp.gate
    with torch.no_grad():
        gate.e_score_correction_bias[5] -= 1.5  # expert 5 can no longer win against its group
    norm = model.model.layers[1].post_attention_layernorm.weight.detach()
    assert rmsnorm_input_bound(norm) == 128 ** 0.5 * float(norm.abs().max())
    certs = certify_model(model)
    assert [c.expert for c in certs["model.layers.1.mlp"]] == [5] and not certs["model.layers.2.mlp"]
    assert set(certs["model.layers.1.mlp"][0].witnesses) == {4, 6, 7}  # its group of 4
    plan = certified_plan(model, certs)
    ids = torch.randint(0, 256, (2, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        with mask_experts(model, plan):
            after = model(input_ids=ids).logits
    assert torch.isfinite(before).all() and torch.equal(before, after)
    assert "expert 5: dominated" in plan.layers[0].note


def test_the_pass_removes_certified_experts_and_reports_the_certificate():
    model = copy.deepcopy(trained_model("deepseek-v3-stdlib"))
    with torch.no_grad():
        model.model.layers[2].mlp.gate.e_score_correction_bias[9] -= 1.5
    report = moecc.CompileReport()
    compiled = torch.compile(model, backend="moecc", options={
        "prune_experts": {"certified": True}, "report": report, "kernel_backend": "reference",
        "rest_of_graph": "eager"})
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = compiled(input_ids=ids).logits, model(input_ids=ids).logits
    torch._dynamo.reset()
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert report.pass_counter("prune_experts", "certified") == 1
    assert report.pass_counter("prune_experts", "experts_removed") == 1
    text = report.format()
    assert "model.layers.2.mlp: certified unreachable: expert 9 dominated by [8, 10, 11]" in text
    assert "model.layers.1.mlp: no expert provably unreachable (router input norm <=" in text
