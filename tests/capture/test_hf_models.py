"""Capture of unmodified transformers MoE models: every MoE layer becomes one moecc op.

Four model families x two graph-friendly experts implementations x two dtypes, each with
fullgraph=True: the op count equals the model's MoE block count, logits match eager, and
greedy generate() gives identical tokens with the dynamic and the static cache.
"""

from __future__ import annotations

import pytest
import torch
from model_checks import assert_logits_close, compile_with_report, moe_block_count

import moecc
from moecc.models import BUILTIN_MODELS, build_model

MODELS = ["qwen3-moe-tiny", "mixtral-tiny", "deepseek-v3-tiny", "gpt-oss-tiny"]
IMPLS = ["grouped_mm", "batched_mm"]
DTYPES = [torch.float32, torch.bfloat16]
EXPECTED_CLASS = {"qwen3-moe-tiny": "Qwen3MoeSparseMoeBlock", "mixtral-tiny": "MixtralSparseMoeBlock",
                  "deepseek-v3-tiny": "DeepseekV3MoE", "gpt-oss-tiny": "GptOssMLP"}


def _ids(seed=1, shape=(2, 7)):
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", MODELS)
def test_logits_match_eager_and_every_layer_captured(name, impl, dtype, quiet):
    model = build_model(name, dtype=dtype, experts_implementation=impl)
    compiled, report = compile_with_report(model)
    ids = _ids()
    with torch.no_grad():
        eager = model(ids).logits
        got = compiled(ids).logits
    assert_logits_close(got, eager)
    layers = moe_block_count(model)
    assert layers >= 2
    assert len(report.graphs) == 1
    assert len(report.captured) == layers, report.format()
    assert report.skipped == []
    assert report.pass_counter("lower_kernels", "reference") == layers
    for layer in report.captured:
        assert layer.verified and layer.module_class == EXPECTED_CLASS[name]
        assert layer.experts_implementation == impl


def _generate(model, ids, **kw):
    return model.generate(ids, max_new_tokens=5, do_sample=False, **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", MODELS)
def test_generate_same_greedy_tokens_dynamic_and_static_cache(name, impl, dtype, quiet):
    model = build_model(name, dtype=dtype, experts_implementation=impl)
    ids = _ids(seed=3, shape=(1, 5))
    with torch.no_grad():
        expected = _generate(model, ids)
        report = moecc.CompileReport()
        model.forward = torch.compile(model.forward, backend="moecc",
                                      options={"report": report, "kernel_backend": "reference",
                                               "rest_of_graph": "eager"})
        dynamic = _generate(model, ids)
        static = _generate(model, ids, cache_implementation="static")
    assert torch.equal(dynamic, expected)
    assert torch.equal(static, expected)
    layers = moe_block_count(model)
    assert report.graphs and all(len(g.captured) == layers for g in report.graphs), report.format()


def test_transformers_compile_config_path(quiet):
    """generate(compile_config=CompileConfig(backend="moecc")): transformers compiles the
    decode step itself (on CPU only when told to compile on all devices)."""
    from transformers.generation.configuration_utils import CompileConfig

    model = build_model("qwen3-moe-tiny")
    ids = _ids(seed=3, shape=(1, 5))
    report = moecc.CompileReport()
    config = CompileConfig(backend="moecc", mode=None,
                           options={"report": report, "kernel_backend": "reference", "rest_of_graph": "eager"})
    config._compile_all_devices = True
    with torch.no_grad():
        expected = _generate(model, ids)
        got = _generate(model, ids, cache_implementation="static", compile_config=config)
    assert torch.equal(got, expected)
    assert report.graphs and len(report.captured) >= moe_block_count(model)

    # transformers' default CompileConfig: mode="reduce-overhead", no options, Inductor.
    default = CompileConfig(backend="moecc")
    default._compile_all_devices = True
    torch._dynamo.reset()
    with torch.no_grad():
        got = _generate(model, ids, cache_implementation="static", compile_config=default)
    assert default.mode == "reduce-overhead" and torch.equal(got, expected)


def test_inductor_rest_of_graph_and_reduce_overhead_mode(quiet):
    """The default path: the rest of the graph through Inductor, with torch.compile's mode."""
    model = build_model("mixtral-tiny")
    report = moecc.CompileReport()
    compiled = torch.compile(model, backend="moecc", mode="reduce-overhead")
    compiled_opts = torch.compile(model, backend="moecc",
                                  options={"report": report, "mode": "max-autotune-no-cudagraphs"})
    ids = _ids()
    with torch.no_grad():
        eager = model(ids).logits
        assert_logits_close(compiled(ids).logits, eager)
        assert_logits_close(compiled_opts(ids).logits, eager)
    assert report.graphs[0].rest_of_graph == "inductor"
    assert len(report.captured) == moe_block_count(model)


def test_builtin_model_names_are_the_tested_ones():
    assert set(MODELS) <= set(BUILTIN_MODELS)
