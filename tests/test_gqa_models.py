"""GQA decode attention end to end: greedy generate() with the static cache and
CompileConfig(backend="moecc") gives eager's tokens, logits within tolerance, on the trained
Qwen3-MoE model (SDPA over repeat_kv) and a random GPT-OSS (eager attention with sinks,
sliding-window layers), with passes/gqa_decode.py rewriting every attention layer."""

from __future__ import annotations

import pytest
import torch

import moecc
from moecc.models import build_model
from model_checks import assert_generated_logits_close, greedy_generate, moecc_compile_config

NEW_TOKENS = 6


def _prompts(batch: int, vocab: int, length: int):
    """Batch 1: one prompt; batch 2+: row 0 left-padded by 5, the rest full."""
    g = torch.Generator().manual_seed(batch * 100 + length)
    ids = torch.randint(2, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[0, :5] = 0
        ids[0, :5] = 0
    return ids, mask


def _generate(model, ids, mask, **kwargs):
    return greedy_generate(model, ids, mask, NEW_TOKENS, **kwargs)  # [B, T], [B, NEW_TOKENS, V]


def _check_model(model, batch: int, length: int, dtype=torch.float32, rewritten: int = None,
                 against: str = "eager", **options):
    """against "eager": transformers' dynamic-cache generate; "no_rewrite": the same compile
    with kv_rewrite=False (isolates the op where bf16 rounding already moves the compile)."""
    torch._dynamo.reset()
    ids, mask = _prompts(batch, model.config.vocab_size, length)
    report = moecc.CompileReport()
    with torch.no_grad():
        if against == "eager":
            expected, expected_logits = _generate(model, ids, mask)
        else:
            expected, expected_logits = _generate(model, ids, mask, cache_implementation="static",
                                                  compile_config=moecc_compile_config(moecc.CompileReport(),
                                                                               **{**options, "kv_rewrite": False}))
            torch._dynamo.reset()
        got, logits = _generate(model, ids, mask, cache_implementation="static",
                                compile_config=moecc_compile_config(report, **options))
    assert torch.equal(got, expected), f"batch {batch}: {got} != {expected}"
    assert_generated_logits_close(logits, expected_logits, dtype)
    assert report.graphs, "generate() did not compile the decode step"
    expected_count = model.config.num_hidden_layers if rewritten is None else rewritten
    for graph in report.graphs:
        gqa = next(p for p in graph.passes if p.name == "gqa_decode")
        assert gqa.counters["rewritten"] == expected_count, report.format()
        assert gqa.counters["declined"] == 0, gqa.notes
    return report


def _gpt_oss_random(dtype=torch.float32):
    from transformers import AutoModelForCausalLM, GptOssConfig

    config = GptOssConfig(vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                          num_experts_per_tok=2, sliding_window=8, max_position_embeddings=128,
                          layer_types=["sliding_attention", "full_attention"], bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0.0, 2.0)  # sinks that matter
        model.lm_head.weight.normal_(0.0, 1.0)  # decisive greedy margins, as a trained model has
    return model.to(dtype).eval()


@pytest.fixture(scope="module")
def qwen3():
    return build_model("qwen3-moe-stdlib")


@pytest.mark.parametrize("batch,length", [(1, 7), (2, 37)])  # 37 + 6: past a 32-slot block
def test_trained_qwen3_moe_static_cache_generate(qwen3, quiet, batch, length):
    report = _check_model(qwen3, batch, length)
    assert any("GQA over the KV cache in place (sdpa" in note for g in report.graphs for p in g.passes
               for note in p.notes)


def test_random_gpt_oss_sinks_and_sliding_window(quiet):
    """Prompt 13 + 6 new tokens in a window of 8: the sliding layer's mask hides old slots."""
    model = _gpt_oss_random()
    assert model.config._attn_implementation == "eager"  # GPT-OSS has no SDPA path
    report = _check_model(model, 2, 13)
    assert any("sinks" in note for g in report.graphs for p in g.passes for note in p.notes)


def test_trained_qwen3_moe_eager_attention(quiet):
    """attn_implementation="eager" (matmul-softmax-matmul over repeat_kv): the eager form."""
    model = build_model("qwen3-moe-stdlib")
    model.set_attn_implementation("eager")
    report = _check_model(model, 2, 9)
    assert any("GQA over the KV cache in place (eager" in note for g in report.graphs for p in g.passes
               for note in p.notes)


def test_option_off_leaves_attention_as_captured(qwen3, quiet):
    report = _check_model(qwen3, 2, 7, kv_rewrite=False, rewritten=0)
    assert report.pass_counter("gqa_decode", "rewritten") == 0


def test_bf16_qwen3(quiet):
    """bf16: on this prompt transformers' own static-cache generate already leaves the dynamic
    cache's tokens (bf16 near-ties), with or without moecc: compared with the same compile
    without the rewrite."""
    _check_model(build_model("qwen3-moe-stdlib").to(torch.bfloat16), 2, 11, dtype=torch.bfloat16,
                 against="no_rewrite")


@pytest.mark.slow
def test_trained_qwen3_batch8_inductor_rest_of_graph(qwen3, quiet):
    """The default path: everything but the MoE layers and the GQA op through Inductor."""
    _check_model(qwen3, 8, 20, rest_of_graph="inductor")
