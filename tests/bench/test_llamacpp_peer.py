"""The llama.cpp peer (bench/llamacpp_peer.py): GGUF layout, quantisation, and llama.cpp's
logits and greedy tokens against transformers eager on the same (tiny) weights.

Tests needing gguf / llama-cpp-python skip without them (they are optional, not in CI);
the error a missing package raises and the refusal of unsupported configs always run.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from moecc.bench import llamacpp_peer as peer

PROMPT = [3, 141, 59, 26, 5, 35, 89, 79, 32, 38, 46, 26]
NEW_TOKENS = 8


def tiny_config(**overrides):
    from transformers import AutoConfig

    kw = dict(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
              num_hidden_layers=2, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
              max_position_embeddings=256, tie_word_embeddings=False, initializer_range=0.1)
    kw.update(overrides)
    return AutoConfig.for_model("qwen3_moe", **kw)


def tiny_model(seed: int = 0, **overrides):
    """fp32 tiny Qwen3-MoE whose weights are exactly representable in F16, so writing F16
    loses nothing and llama.cpp vs transformers differs only by arithmetic. Norm weights
    are random (not all ones) so a swapped or dropped norm changes the logits."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(**overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            p.copy_(p.half().float())
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def f16_path(model, tmp_path_factory):
    pytest.importorskip("gguf")
    return peer.write_gguf(model, tmp_path_factory.mktemp("gguf") / "tiny-F16.gguf", progress=False)


# --- always run ----------------------------------------------------------------------


def test_missing_packages_name_what_to_install(model, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)          # import now raises ImportError
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(peer.LlamaCppUnavailable, match="pip install gguf"):
        peer.write_gguf(model, tmp_path / "x.gguf")
    with pytest.raises(peer.LlamaCppUnavailable, match="pip install llama-cpp-python"):
        peer.decode_ms_per_step(tmp_path / "x.gguf", [1, 2], 2, 1)
    with pytest.raises(peer.LlamaCppUnavailable, match="pip install llama-cpp-python"):
        peer.quantize_gguf(tmp_path / "x.gguf", tmp_path / "y.gguf", "Q8_0")


def test_quantize_rejects_unknown_type(tmp_path):
    with pytest.raises(ValueError, match="Q4_K_M"):
        peer.quantize_gguf(tmp_path / "x.gguf", tmp_path / "y.gguf", "Q3_XYZ")


@pytest.mark.parametrize("override, reason", [
    (dict(norm_topk_prob=False), "norm_topk_prob"),
    (dict(mlp_only_layers=[1]), "mlp_only_layers"),
    (dict(attention_bias=True), "attention_bias"),
])
def test_refuses_configs_llama_cpp_computes_differently(override, reason):
    with pytest.raises(ValueError, match=reason):
        peer.check_supported(tiny_config(**override))
    peer.check_supported(tiny_config())  # the default tiny config is accepted


# --- GGUF layout (needs gguf) --------------------------------------------------------


def test_gguf_metadata_and_tensor_layout(model, f16_path):
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(str(f16_path))
    cfg = model.config

    def kv(key):
        field = reader.get_field(key)
        assert field is not None, f"missing GGUF key {key}"
        return field.contents()

    assert kv("general.architecture") == "qwen3moe"
    expected = {"context_length": 256, "embedding_length": 64, "block_count": 2,
                "attention.head_count": 4, "attention.head_count_kv": 2, "attention.key_length": 16,
                "attention.value_length": 16, "expert_count": 8, "expert_used_count": 2,
                "expert_feed_forward_length": 32, "vocab_size": 256}
    for key, value in expected.items():
        assert kv(f"qwen3moe.{key}") == value, key
    assert kv("qwen3moe.rope.freq_base") == pytest.approx(cfg.rope_parameters["rope_theta"])
    assert kv("qwen3moe.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.rms_norm_eps)
    assert kv("tokenizer.ggml.model") == "none"

    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 3 + 12 * cfg.num_hidden_layers
    F16, F32 = gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32
    # GGML dimension order (innermost first): gate/up {K, N, E}, down {N, K, E}.
    assert list(tensors["blk.1.ffn_gate_exps.weight"].shape) == [64, 32, 8]
    assert list(tensors["blk.1.ffn_up_exps.weight"].shape) == [64, 32, 8]
    assert list(tensors["blk.1.ffn_down_exps.weight"].shape) == [32, 64, 8]
    assert list(tensors["blk.0.attn_k.weight"].shape) == [64, 32]
    assert list(tensors["output.weight"].shape) == [64, 256]
    for name, t in tensors.items():
        f32 = name.endswith("_norm.weight") or "ffn_gate_inp" in name
        assert t.tensor_type == (F32 if f32 else F16), name

    # Data: gate is the first half of gate_up_proj, up the second (a swap would pass
    # shape checks and still be wrong).
    gate_up = model.model.layers[1].mlp.experts.gate_up_proj.detach()     # [E, 2N, K]
    np.testing.assert_array_equal(tensors["blk.1.ffn_gate_exps.weight"].data, gate_up[:, :32].half().numpy())
    np.testing.assert_array_equal(tensors["blk.1.ffn_up_exps.weight"].data, gate_up[:, 32:].half().numpy())
    np.testing.assert_array_equal(tensors["blk.0.attn_q_norm.weight"].data,
                                  model.model.layers[0].self_attn.q_norm.weight.detach().numpy())


def test_tensor_bytes_count_f16_matrices_and_f32_norms(model, f16_path):
    pytest.importorskip("gguf")
    expected = 0
    for name, p in model.named_parameters():
        expected += p.numel() * (4 if p.ndim == 1 or name.endswith("mlp.gate.weight") else 2)
    assert peer.gguf_tensor_bytes(f16_path) == expected


def test_nan_weight_is_refused_and_leaves_no_file(tmp_path):
    pytest.importorskip("gguf")
    bad = tiny_model()
    with torch.no_grad():
        bad.model.layers[0].mlp.experts.down_proj[3, 5, 7] = float("nan")
    with pytest.raises(ValueError, match="ffn_down_exps.*non-finite"):
        peer.write_gguf(bad, tmp_path / "bad.gguf", progress=False)
    assert not (tmp_path / "bad.gguf").exists()


# --- llama.cpp itself (needs llama-cpp-python) ---------------------------------------


def transformers_greedy(model, prompt: list[int], steps: int) -> tuple[np.ndarray, list[int]]:
    """Last-position logits of the prompt [V] and `steps` greedy tokens, transformers eager
    (whole sequence recomputed each step: no cache, nothing shared with llama.cpp)."""
    ids = torch.tensor([prompt])
    tokens, first = [], None
    with torch.no_grad():
        for _ in range(steps):
            logits = model(ids).logits[0, -1]                       # [V]
            first = logits.numpy().copy() if first is None else first
            tokens.append(int(logits.argmax()))
            ids = torch.cat([ids, torch.tensor([[tokens[-1]]])], dim=1)
    return first, tokens


# llama.cpp's F16 matmuls round the activations to F16 too (unit roundoff u = 2^-11 ~ 4.9e-4)
# and its KV cache is F16; accumulation is F32. Measured on seeds 0-2 (2026-12-02): max
# |diff| / max |logit| = 3e-4 .. 9e-4, i.e. 1-2 u. The bound, 5e-3 (~10 u), leaves 5x room
# for other builds' summation orders and is far below what a layout error does: swapping
# gate and up gives 0.43, dropping the top-k renormalisation 0.39.
F16_LOGIT_TOL = 5e-3


def test_llama_cpp_f16_matches_transformers(model, f16_path):
    pytest.importorskip("llama_cpp")
    ref_logits, ref_tokens = transformers_greedy(model, PROMPT, NEW_TOKENS)
    res = peer.decode_ms_per_step(f16_path, PROMPT, NEW_TOKENS, threads=1)

    logits = res["prompt_logits"]
    assert logits.shape == ref_logits.shape and logits.dtype == np.float32
    assert np.isfinite(logits).all()
    scale = float(np.abs(ref_logits).max())
    err = float(np.abs(logits - ref_logits).max())
    assert err <= F16_LOGIT_TOL * scale, f"max |llama.cpp - transformers| = {err:.3g}, logit scale {scale:.3g}"
    assert res["tokens"] == ref_tokens
    assert len(res["step_ms"]) == NEW_TOKENS and all(t > 0 for t in res["step_ms"])



def test_llama_cpp_batch_decode_matches_transformers_per_sequence(model, f16_path):
    """Batch 3 through the low-level batch API: each sequence's prompt logits and greedy
    tokens are those of transformers on that prompt alone (sequences of different lengths,
    so a sequence reading another's KV cells or a wrong position would show)."""
    pytest.importorskip("llama_cpp")
    prompts = [PROMPT, PROMPT[3:], [7, 200, 13, 99, 1]]
    res = peer.decode_batch_ms_per_step(f16_path, prompts, NEW_TOKENS, threads=1)
    assert res["prompt_logits"].shape == (3, 256) and res["batch"] == 3
    assert np.isfinite(res["prompt_logits"]).all()
    for b, prompt in enumerate(prompts):
        ref_logits, ref_tokens = transformers_greedy(model, prompt, NEW_TOKENS)
        err = float(np.abs(res["prompt_logits"][b] - ref_logits).max())
        scale = float(np.abs(ref_logits).max())
        assert err <= F16_LOGIT_TOL * scale, f"sequence {b}: max |diff| {err:.3g}, logit scale {scale:.3g}"
        assert res["tokens"][b] == ref_tokens, f"sequence {b}"
    assert len(res["step_ms"]) == NEW_TOKENS and all(t > 0 for t in res["step_ms"])
    with pytest.raises(ValueError, match="non-empty"):
        peer.decode_batch_ms_per_step(f16_path, [PROMPT, []], 2, threads=1)


def amx_build() -> bool:
    import llama_cpp

    return b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info()


@pytest.fixture(scope="module")
def q8_path(f16_path):
    pytest.importorskip("llama_cpp")
    return peer.quantize_gguf(f16_path, f16_path.with_name("tiny-Q8_0.gguf"), "Q8_0", threads=1)


def test_amx_build_refuses_quantized_file_with_the_fix(f16_path, q8_path, monkeypatch):
    import llama_cpp

    # Pretend the build reports AMX: a Q8_0 file is refused before llama.cpp loads it
    # (its AMX kernels would kill the process), an F16 file still runs.
    monkeypatch.setattr(llama_cpp, "llama_print_system_info", lambda: b"CPU : AVX2 = 1 | AMX_INT8 = 1 |")
    assert peer.amx_tensor_types(q8_path) == {"Q8_0"}
    assert peer.amx_tensor_types(f16_path) == set()
    with pytest.raises(peer.LlamaCppUnavailable, match="-mno-amx-int8"):
        peer.decode_ms_per_step(q8_path, PROMPT, 2, threads=1)
    assert len(peer.decode_ms_per_step(f16_path, PROMPT, 2, threads=1)["tokens"]) == 2


def test_quantized_files_are_smaller_and_stay_close(model, f16_path, q8_path, tmp_path):
    if amx_build():
        pytest.skip("this llama-cpp-python build has AMX kernels, which crash on quantised "
                    "files (see bench/llamacpp_peer.py); reinstall it without AMX to run this")
    f16 = peer.decode_ms_per_step(f16_path, PROMPT, 2, threads=1)["prompt_logits"]
    f16_bytes = peer.gguf_tensor_bytes(f16_path)
    # Relative RMS error of the prompt logits against the F16 file's. Measured on seeds 0-2
    # (2026-12-02): Q8_0 0.019-0.034, Q4_K_M 0.09-0.21 (rows of 32/64 are not multiples of
    # 256, so llama.cpp falls back from K-quants to Q5_0/Q5_1/Q8_0 there). The bounds are
    # loose by design: they catch a broken file (zero logits give 1.0, unrelated logits of
    # the same scale ~1.4), not a precision regression.
    for qtype, max_rel_rms in (("Q8_0", 0.1), ("Q4_K_M", 0.5)):
        path = q8_path if qtype == "Q8_0" else peer.quantize_gguf(
            f16_path, tmp_path / f"tiny-{qtype}.gguf", qtype, threads=1)
        assert peer.gguf_tensor_bytes(path) < f16_bytes, qtype
        logits = peer.decode_ms_per_step(path, PROMPT, 2, threads=1)["prompt_logits"]
        assert np.isfinite(logits).all(), qtype
        rel_rms = float(np.sqrt(np.mean((logits - f16) ** 2) / np.mean(f16 ** 2)))
        assert rel_rms <= max_rel_rms, f"{qtype}: relative RMS error {rel_rms:.3g} against F16"


