"""MLA absorbed decode end to end: greedy generate() with the static cache and
CompileConfig(backend="moecc") gives eager's tokens, logits within tolerance, on the
trained DeepSeek-V3-style model and a random DeepSeek-V2 (V2-Lite layout: no q LoRA)."""

from __future__ import annotations

import pytest
import torch

import moecc
from moecc.models import build_model
from moecc.tolerances import check_close
from model_checks import assert_generated_logits_close, greedy_generate, moecc_compile_config

NEW_TOKENS = 6


def _deepseek_v2_random(dtype=torch.float32):
    from transformers import AutoModelForCausalLM, DeepseekV2Config

    config = DeepseekV2Config(vocab_size=256, hidden_size=96, intermediate_size=192, moe_intermediate_size=48,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                              n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                              first_k_dense_replace=1, kv_lora_rank=24, q_lora_rank=None,
                              qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=20,
                              max_position_embeddings=128, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 1.0)  # decisive greedy margins, as a trained model has
    return model.to(dtype).eval()


def _prompts(batch: int, vocab: int):
    """Batch 1: one prompt; batch 2+: row 0 left-padded (a shorter prompt), the rest full."""
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(2, vocab, (batch, 7), generator=g)
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[0, :3] = 0
        ids[0, :3] = 0
    return ids, mask


def _generate(model, ids, mask, **kwargs):
    return greedy_generate(model, ids, mask, NEW_TOKENS, **kwargs)  # [B, T], [B, NEW_TOKENS, V]


def _check_model(model, batches=(1, 2), dtype=torch.float32, **options):
    layers = model.config.num_hidden_layers
    for batch in batches:
        torch._dynamo.reset()
        ids, mask = _prompts(batch, model.config.vocab_size)
        report = moecc.CompileReport()
        with torch.no_grad():
            expected, expected_logits = _generate(model, ids, mask)
            got, logits = _generate(model, ids, mask, cache_implementation="static",
                                    compile_config=moecc_compile_config(report, **options))
        assert torch.equal(got, expected), f"batch {batch}: {got} != {expected}"
        assert_generated_logits_close(logits, expected_logits, dtype)
        assert report.graphs, "generate() did not compile the decode step"
        for graph in report.graphs:
            absorb = next(p for p in graph.passes if p.name == "mla_absorb")
            assert absorb.counters["rewritten"] == layers, report.format()
            assert absorb.counters["declined"] == 0, absorb.notes


@pytest.fixture(scope="module")
def trained_v3():
    return build_model("deepseek-v3-stdlib")


@pytest.fixture(scope="module")
def random_v2():
    return _deepseek_v2_random()


def test_trained_deepseek_v3_static_cache_generate(trained_v3, quiet):
    _check_model(trained_v3)


def test_random_deepseek_v2_static_cache_generate(random_v2, quiet):
    _check_model(random_v2, batches=(1, 2, 8))


def test_option_off_leaves_attention_as_captured(random_v2, quiet):
    ids, mask = _prompts(1, random_v2.config.vocab_size)
    report = moecc.CompileReport()
    with torch.no_grad():
        expected, _ = _generate(random_v2, ids, mask)
        got, _ = _generate(random_v2, ids, mask, cache_implementation="static",
                           compile_config=moecc_compile_config(report, kv_rewrite=False))
    assert torch.equal(got, expected)
    assert report.pass_counter("mla_absorb", "rewritten") == 0


def test_bf16_deepseek_v2(quiet):
    _check_model(_deepseek_v2_random(torch.bfloat16), batches=(2,), dtype=torch.bfloat16)


@pytest.mark.slow
def test_trained_deepseek_v3_inductor_rest_of_graph(trained_v3, quiet):
    """The default path: everything but the MoE layers and the MLA op through Inductor."""
    _check_model(trained_v3, batches=(2,), rest_of_graph="inductor")


def test_prefill_without_cache(random_v2, quiet):
    """A whole-model forward without a cache: the latent is the fresh projection, causal
    attention over the prompt (the op's expanded or absorbed form, by arithmetic)."""
    ids, mask = _prompts(2, random_v2.config.vocab_size)
    report = moecc.CompileReport()
    compiled = torch.compile(random_v2, backend="moecc",
                             options={"report": report, "kernel_backend": "reference", "rest_of_graph": "eager"})
    with torch.no_grad():
        expected = random_v2(ids, attention_mask=mask, use_cache=False).logits
        got = compiled(ids, attention_mask=mask, use_cache=False).logits
    check_close(got, expected)
    assert report.pass_counter("mla_absorb", "rewritten") == random_v2.config.num_hidden_layers, report.format()
