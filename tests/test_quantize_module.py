"""moecc.quantize_: packed experts replace the originals, before compiling.

Checked: the swapped layers compute the reference semantics on the dequantised weights
(eager), torch.compile takes them as they are (no second quantisation; TVM kernels where
apache-tvm is installed, else the reference op) and matches eager; the original expert
stacks are freed and the model's bytes shrink by the format's ratio; per-layer overrides
by module path pick the formats, in quantize_ and in the compile-time pass (and `moecc
explain`); bad input is a clear error; generate() works on the quantised trained model.
"""

from __future__ import annotations

import gc
import importlib.util
import weakref
from types import SimpleNamespace

import pytest
import torch

from moecc.backends import reference
from moecc.backends.reference.quantized import dequantize
from moecc.capture.report import CompileReport
from moecc.models import build_model
from moecc.precision import PerLayerPrecision, PrecisionError
from moecc.quantize_module import QuantizedMoELayer, quantize_, tensor_bytes

KERNELS = "tvm" if importlib.util.find_spec("tvm") else "reference"
LAYERS = ("model.layers.0.mlp", "model.layers.1.mlp")  # qwen3-moe-tiny: K = 64, N = 32, E = 8


def _ids(vocab: int, shape=(2, 12)) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def tiny():
    """qwen3-moe-tiny (fp32) quantize_'d to int8, with what it was before."""
    model = build_model("qwen3-moe-tiny")
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        original = model(ids).logits
    experts = [model.get_submodule(p).experts for p in LAYERS]
    refs = [weakref.ref(p) for e in experts for p in e.parameters()]
    expert_bytes = sum(p.numel() * p.element_size() for e in experts for p in e.parameters())
    bytes_before = tensor_bytes(model)
    del experts
    report = quantize_(model, "int8")
    gc.collect()
    return SimpleNamespace(model=model, ids=ids, original=original, refs=refs, expert_bytes=expert_bytes,
                           bytes_before=bytes_before, report=report)


def _layers(model) -> list[QuantizedMoELayer]:
    return [m for m in model.modules() if isinstance(m, QuantizedMoELayer)]


def test_blocks_replaced_and_reported(tiny):
    assert [type(tiny.model.get_submodule(p)) for p in LAYERS] == [QuantizedMoELayer] * 2
    assert [r.path for r in tiny.report.layers] == list(LAYERS)
    for r, layer in zip(tiny.report.layers, _layers(tiny.model)):
        assert r.format == "int8 per-row" and r.weight_sqnr >= 35 and r.output_sqnr >= 30
        assert layer.spec.experts.weight_format == "int8" and layer.spec.source == r.path
        assert layer.gate_up.dtype == torch.uint8 and layer.gate_up_scale.dtype == torch.float32
        assert r.line() == layer.precision_note and "weight SQNR" in tiny.report.format()


def test_eager_is_the_reference_on_dequantised_weights(tiny):
    for layer in _layers(tiny.model):
        spec, w = layer.spec, layer.weights()
        hidden = torch.randn(3, 5, spec.experts.hidden_size, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            got = layer(hidden)  # [3, 5, K]
        dense = w._replace(gate_up=dequantize(w.gate_up, w.gate_up_scale, "int8"),
                           down=dequantize(w.down, w.down_scale, "int8"), gate_up_scale=None, down_scale=None)
        dense_spec = spec.replace(experts={"weight_format": "dense", "group_size": 0})
        expected = reference.moe_layer(hidden.reshape(-1, spec.experts.hidden_size), dense, dense_spec)
        torch.testing.assert_close(got.reshape(expected.shape), expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        logits = tiny.model(tiny.ids).logits
    rel = ((logits - tiny.original).norm() / tiny.original.norm()).item()
    assert 0 < rel < 0.02, rel  # > 0: the weights really are packed; int8 keeps the logits close


def test_compile_takes_packed_layers_as_they_are(tiny):
    torch._dynamo.reset()
    report = CompileReport()
    compiled = torch.compile(tiny.model, backend="moecc", options={
        "report": report, "kernel_backend": KERNELS, "rest_of_graph": "eager", "precision": "int4"})
    with torch.no_grad():
        eager = tiny.model(tiny.ids).logits
        out = compiled(tiny.ids).logits
    assert report.pass_counter("precision_lowering", "prepacked") == 2
    assert report.pass_counter("precision_lowering", "layers") == 0  # options' int4 does not pack them again
    assert report.pass_counter("lower_kernels", KERNELS) == 2
    assert len(report.captured) == 0  # nothing left to capture: the op is already there
    assert torch.isfinite(out).all()
    err = ((out - eager).abs().max() / eager.abs().max()).item()
    assert err <= 1e-4, err


def test_originals_freed_and_bytes_shrink(tiny):
    assert all(r() is None for r in tiny.refs), "an original expert stack is still alive"
    packed = sum(getattr(layer, f).numel() * getattr(layer, f).element_size() for layer in _layers(tiny.model)
                 for f in ("gate_up", "down", "gate_up_scale", "down_scale"))
    after = tensor_bytes(tiny.model)
    assert after == tiny.report.param_bytes_after and tiny.report.param_bytes_before == tiny.bytes_before
    assert after == tiny.bytes_before - tiny.expert_bytes + packed
    # int8 per row from fp32: 1 byte per weight + one fp32 scale per row of C values
    k, n = 64, 32
    expected_ratio = (2 * n * k * (1 + 4 / k) + k * n * (1 + 4 / n)) / (3 * n * k * 4)
    assert packed / tiny.expert_bytes == pytest.approx(expected_ratio, rel=1e-9)


def test_overrides_pick_formats_exact_path_first():
    model = build_model("qwen3-moe-tiny")
    report = quantize_(model, {"format": "int4", "group_size": 16,
                               "overrides": {"model.layers.*": None, "model.layers.0.mlp": "int8"}})
    assert isinstance(model.model.layers[0].mlp, QuantizedMoELayer)
    assert model.model.layers[0].mlp.spec.experts.weight_format == "int8"
    assert type(model.model.layers[1].mlp).__name__ == "Qwen3MoeSparseMoeBlock"  # kept as it was
    assert [r.format for r in report.layers] == ["int8 per-row", "kept"]
    model = build_model("qwen3-moe-tiny")
    report = quantize_(model, PerLayerPrecision(None, {"model.layers.1.mlp": {"format": "int4", "group_size": 16}}))
    assert [r.format for r in report.layers] == ["kept", "int4 g16"]
    with torch.no_grad():
        assert torch.isfinite(model(_ids(model.config.vocab_size)).logits).all()


def test_pass_applies_overrides_and_notes_unmatched_patterns():
    torch._dynamo.reset()
    model = build_model("qwen3-moe-tiny")
    report = CompileReport()
    compiled = torch.compile(model, backend="moecc", options={
        "report": report, "kernel_backend": "reference", "rest_of_graph": "eager",
        "precision": {"format": "int8", "overrides": {"model.layers.1.mlp": None, "model.layers.9.*": "int4"}}})
    with torch.no_grad():
        compiled(_ids(model.config.vocab_size))
    assert report.pass_counter("precision_lowering", "int8") == 1
    assert report.pass_counter("precision_lowering", "dense") == 1
    text = report.format()
    assert "model.layers.0.mlp: int8 per-row: weight SQNR" in text
    assert "model.layers.1.mlp: kept (override: 'model.layers.1.mlp'" in text
    assert "override 'model.layers.9.*' matches no MoE layer in this graph" in text


def test_explain_shows_each_layers_format_under_overrides(capsys, quiet):
    from moecc.cli import main

    assert main(["explain", "qwen3-moe-tiny", "--kernel-backend", "reference", "--precision",
                 '{"format": "int4", "group_size": 16, "overrides": {"model.layers.1.*": "int8"}}']) == 0
    out = capsys.readouterr().out
    assert "model.layers.0.mlp: int4 g16: weight SQNR" in out and "model.layers.1.mlp: int8 per-row" in out


def test_bad_input_errors_clearly():
    model = build_model("qwen3-moe-tiny")
    with pytest.raises(PrecisionError, match=r"override\(s\) \['model.layers.7.mlp'\] match no MoE layer"):
        quantize_(model, {"format": "int8", "strict": True, "overrides": {"model.layers.7.mlp": "int4"}})
    assert all(type(model.get_submodule(p)).__name__ == "Qwen3MoeSparseMoeBlock" for p in LAYERS)  # untouched
    report = quantize_(model, {"format": "int8", "overrides": {"model.layers.7.mlp": "int4"}})
    assert "override 'model.layers.7.mlp' matches no MoE layer" in report.format()
    assert [r.format for r in report.layers] == ["int8 per-row"] * 2
    with pytest.raises(PrecisionError, match="unknown precision 'fp8'; valid: None, 'dense', 'int8'"):
        quantize_(model, "fp8")
    with pytest.raises(PrecisionError, match="override 'a.b': unknown precision 'int3'"):
        quantize_(model, {"format": "int8", "overrides": {"a.b": "int3"}})
    with pytest.raises(PrecisionError, match="quantize_ needs a format"):
        quantize_(model, None)
    with pytest.raises(PrecisionError, match="pass example_inputs"):
        quantize_(torch.nn.Linear(4, 4), "int8")


def test_strict_config_refuses_a_format_that_does_not_fit():
    model = build_model("qwen3-moe-tiny")
    with pytest.raises(PrecisionError, match="group size 128 does not divide the reduction axis 64.*strict=True"):
        quantize_(model, {"format": "int4", "strict": True})


def test_generate_on_quantized_trained_model():
    model = build_model("qwen3-moe-stdlib")
    prompt = torch.tensor([list(b"def main():\n    ")])
    with torch.no_grad():
        original = model.generate(prompt, max_new_tokens=12, do_sample=False)
    report = quantize_(model, "int8")
    assert [r.format for r in report.layers] == ["int8 per-row"] * 3
    with torch.no_grad():
        tokens = model.generate(prompt, max_new_tokens=12, do_sample=False)  # [1, P + 12]
        # greedy with the KV cache == greedy read off one full forward of the same (quantised) model
        full = model(tokens).logits.argmax(-1)[0, prompt.shape[1] - 1:-1]
    assert tokens.shape == (1, prompt.shape[1] + 12)
    assert torch.equal(full, tokens[0, prompt.shape[1]:])
    agree = (tokens == original).float().mean().item()
    assert agree >= 0.9, agree  # int8 on this model: top-1 agreement 99.6% (docs/precision.md)
