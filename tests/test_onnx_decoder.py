"""The decode step with its KV cache as ONNX (moecc.onnx_export.decoder): exported with the MoE
layers as onnxruntime's fused operators, greedy decoding in onnxruntime gives eager
transformers' tokens and logits, left padding included.

One export per model, module-scoped (~10-20 s each on CPU).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")
pytest.importorskip("transformers")

from moecc.models import build_model  # noqa: E402
from moecc.onnx_export.decoder import OnnxDecoder, export_onnx_decoder  # noqa: E402

RTOL = 1e-4  # fp32 logits, relative to their max magnitude
NEW_TOKENS = 6


@pytest.fixture(scope="module", params=["qwen3-moe-tiny", "deepseek-v3-tiny"])
def exported(request, tmp_path_factory):
    model = build_model(request.param).eval()
    path = str(tmp_path_factory.mktemp("decoder") / f"{request.param}.onnx")
    report = export_onnx_decoder(model, path)
    return request.param, model, path, report


def _prompts(vocab: int):
    """Two prompts of lengths 7 and 4, the shorter left-padded: [2, 7] ids and mask."""
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(1, vocab, (2, 7), generator=gen)
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    return ids, mask


def test_decoder_file_routes_moe_layers_to_onnxruntime_and_checks_one_step(exported):
    name, model, path, report = exported
    assert report.layers, "no MoE layer exported"
    assert all(layer.route.startswith("com.microsoft.MoE") for layer in report.layers), report.summary()
    assert report.max_relative_error is not None and report.max_relative_error <= RTOL
    decoder = OnnxDecoder(path)
    names = [i.name for i in decoder.session.get_inputs()]
    layers = model.config.num_hidden_layers
    assert names[:4] == ["input_ids", "attention_mask", "past_0_key", "past_0_value"] and len(names) == 2 + 2 * layers
    assert [o.name for o in decoder.session.get_outputs()][:2] == ["logits", "present_0_key"]


def test_onnxruntime_greedy_decode_matches_eager_generate(exported):
    name, model, path, _ = exported
    ids, mask = _prompts(model.config.vocab_size)
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                  do_sample=False, pad_token_id=0)[:, ids.shape[1]:]
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        first = model(ids, attention_mask=mask, position_ids=position_ids).logits[:, -1]  # [B, V]
    res = OnnxDecoder(path).greedy(ids.numpy(), NEW_TOKENS, attention_mask=mask.numpy())
    assert np.isfinite(res.first_logits).all()
    err = np.abs(res.first_logits - first.numpy()).max() / np.abs(first.numpy()).max()
    assert err <= RTOL, f"{name}: prefill logits differ by {err:.2e} (relative)"
    assert res.tokens.tolist() == expected.tolist(), name
    assert len(res.step_ms) == NEW_TOKENS - 1 and all(t > 0 for t in res.step_ms)


def test_bad_input_is_refused(exported, tmp_path):
    _, model, path, _ = exported
    with pytest.raises(ValueError, match=">= 2"):
        export_onnx_decoder(model, str(tmp_path / "x.onnx"), batch=1)
    import onnx
    from onnx import TensorProto, helper

    plain = helper.make_model(helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])]))
    onnx.save(plain, str(tmp_path / "plain.onnx"))
    with pytest.raises(ValueError, match="not a decoder file"):
        OnnxDecoder(str(tmp_path / "plain.onnx"))


def test_cli_writes_a_quantized_decoder(tmp_path, capsys):
    """`moecc export --format onnx --decoder --precision int4`: QMoE layers in a decoder file
    that OnnxDecoder runs (the one-step check against the quantised model ran inside)."""
    from moecc.cli import main

    assert main(["export", "--format", "onnx", "--decoder", "--model", "qwen3-moe-tiny", "--precision", "int4",
                 "--group-size", "32", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert text.count("com.microsoft.QMoE") == 2 and "max relative error" in text
    res = OnnxDecoder(str(tmp_path / "decoder.onnx")).greedy(np.array([[5, 9, 200, 31]]), 3)
    assert res.tokens.shape == (1, 3) and np.isfinite(res.first_logits).all()
