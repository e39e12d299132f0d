"""The trained models shipped in moecc/trained/: they load, they learned something (well
below the unigram entropy of held-out text), their routers specialise, and compiled with
backend="moecc" they match eager within the bounds of trained_eval.py (reference and TVM
kernels here; Triton in backends/test_trained_triton.py). Results are computed once per module."""

from __future__ import annotations

import os

import pytest
import torch

from moecc.evaluate import evaluate
from moecc.models import TRAINED_DIR, TRAINED_MODELS, build_model, trained_model_dir
from moecc.tokenizer import ByteTokenizer
from trained_eval import assert_matches_eager

# "A wide margin": the model's held-out code bits per byte at most 70% of the unigram
# entropy of the same text (the best any byte-frequency model can do on it).
MAX_RATIO_TO_UNIGRAM = 0.7
SHIPPED_LIMIT_MB = 25


@pytest.fixture(scope="module")
def reference_results():
    """Per model: the reference kernels, the rest of the graph eager, 4 kB per domain."""
    torch._dynamo.reset()
    out = {name: evaluate(name, {"kernel_backend": "reference", "rest_of_graph": "eager"}, max_bytes=4096,
                          batch=8, progress=False) for name in TRAINED_MODELS}
    torch._dynamo.reset()
    return out


def test_everything_shipped_fits_the_size_budget():
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(TRAINED_DIR) for f in fs)
    assert total <= SHIPPED_LIMIT_MB * 1e6, f"{total / 1e6:.1f} MB shipped under {TRAINED_DIR}"


@pytest.mark.parametrize("name", TRAINED_MODELS)
def test_loads_with_plain_transformers_and_a_byte_tokenizer(name):
    from transformers import AutoModelForCausalLM

    path = trained_model_dir(name)
    assert os.path.isfile(os.path.join(path, "CARD.md"))
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = ByteTokenizer()
    ids = tok("def f(x):\n    return x", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 256) and torch.isfinite(logits).all()
    assert tok.decode(ids[0]) == "def f(x):\n    return x"


@pytest.mark.parametrize("name", TRAINED_MODELS)
def test_beats_the_unigram_baseline_by_a_wide_margin(reference_results, name):
    for domain in ("code", "english"):
        d = reference_results[name].domains[domain]
        assert d.eager_bpb <= MAX_RATIO_TO_UNIGRAM * d.unigram_bpb, (name, domain, d.eager_bpb, d.unigram_bpb)


@pytest.mark.parametrize("name", TRAINED_MODELS)
def test_reference_kernels_match_eager(reference_results, name):
    assert_matches_eager(reference_results[name], "reference")


def test_routers_are_specialised_and_the_unbalanced_model_has_cold_experts(reference_results):
    balanced = reference_results["qwen3-moe-stdlib"].layers
    free = reference_results["qwen3-moe-stdlib-noaux"].layers
    # Trained routers are not uniform: some layer concentrates its load.
    for layers in (balanced, free):
        assert min(layer.eager_entropy for layer in layers) < 0.98
    # Without the load-balancing loss routing concentrates further and experts go cold.
    assert min(layer.eager_entropy for layer in free) < min(layer.eager_entropy for layer in balanced)
    assert sum(layer.cold_experts for layer in free) > sum(layer.cold_experts for layer in balanced)


def test_deepseek_layers_are_captured_with_groups_and_a_shared_expert(reference_results):
    import moecc

    result = reference_results["deepseek-v3-stdlib"]
    assert result.moe_layers == 2  # first_k_dense_replace=1: layer 0 is dense
    model = build_model("deepseek-v3-stdlib")
    report = moecc.CompileReport()
    compiled = torch.compile(model, backend="moecc", options={"report": report, "kernel_backend": "reference",
                                                              "rest_of_graph": "eager"})
    with torch.no_grad():
        compiled(torch.zeros(1, 8, dtype=torch.long))
    spec = report.captured[0].spec
    assert spec.router.n_group == 4 and spec.router.topk_group == 2 and spec.router.scoring == "sigmoid"
    assert "shared" in spec.describe()


@pytest.mark.tvm
def test_tvm_kernels_match_eager():
    for name in TRAINED_MODELS:
        torch._dynamo.reset()
        result = evaluate(name, {"kernel_backend": "tvm", "rest_of_graph": "eager"}, max_bytes=1024, batch=2,
                          seq_len=128, progress=False)
        assert_matches_eager(result, "tvm")
