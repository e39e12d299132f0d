"""The CPU decode benchmark harness (bench/cpu_decode.py) end to end at tiny widths.

Checks the harness, not the numbers: every variant runs in its own process, the floor
comes from the eager run's routing and a bandwidth measured in the same run, the moecc
process reports its MoE op timed inside the model and alone, and the table renders.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tvm")

from moecc.bench.cpu_decode import CPUDecodeConfig, format_table, run  # noqa: E402

TINY = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
            norm_topk_prob=True, num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
            max_position_embeddings=256, tie_word_embeddings=False)


@pytest.mark.tvm
def test_cpu_decode_harness_tiny(tmp_path):
    cfg = CPUDecodeConfig(layers=1, vocab=256, batches=(1, 2), dtypes=("fp32",), variants=("eager", "moecc"),
                          new_tokens=8, skip_steps=2, widths=TINY)
    res = run(cfg, tmp_path, log=lambda s: None)
    json.dumps(res)  # results are plain JSON
    assert not res["notes"], res["notes"]
    assert len(res["read_bandwidth_gbps"]["samples"]) == 2 and res["read_bandwidth_gbps"]["min"] > 0
    assert [(r["dtype"], r["batch"]) for r in res["rows"]] == [("fp32", 1), ("fp32", 2)]
    for row in res["rows"]:
        # 1 layer, 8 experts of 3 * 32 * 64 fp32 weights: the step reads at most all of them
        all_experts = 8 * 3 * 32 * 64 * 4
        assert 0 < row["weight_bytes_per_step"]
        assert row["variants"]["eager"]["experts_hit_per_layer"][0] <= 2 * row["batch"]
        assert row["floor_ms"] == pytest.approx(row["weight_bytes_per_step"] / (res["read_bandwidth_gbps"]["median"] * 1e6))
        for rec in row["variants"].values():  # each against the bandwidth sampled before its process
            assert rec["read_bandwidth"] / 1e9 in res["read_bandwidth_gbps"]["samples"]
            assert rec["fraction"] == pytest.approx(row["weight_bytes_per_step"] / rec["read_bandwidth"] * 1e3
                                                    / rec["step_ms"])
        assert row["weight_bytes_per_step"] < all_experts + 2 * 256 * 64 * 4 + 4 * 64 * 64 * 4 + 1024
        moecc = row["variants"]["moecc"]
        assert moecc["moecc_layers_captured"] == 1 and moecc["moecc_kernels"] == ["tvmx1"]
        assert moecc["step_ms"] > 0 and 0 < moecc["fraction"]
        assert moecc["op_in_model_ms"] > 0 and moecc["op_isolated_ms"] > 0
    table = format_table(res)
    assert "| fp32 | 2 |" in table and "MoE op in the model" in table


def test_cpu_decode_llama_peer_every_batch(tmp_path, monkeypatch):
    """llama.cpp runs every batch of the run (batch 2: two sequences in one context) and
    lands in that batch's row with its own fraction of the floor. Needs the optional peer."""
    pytest.importorskip("llama_cpp")
    pytest.importorskip("gguf")
    if b"AMX_INT8 = 1" in __import__("llama_cpp").llama_print_system_info():
        pytest.skip("llama-cpp-python built with AMX kernels (they crash on quantised files here)")
    monkeypatch.setenv("MOECC_CACHE_DIR", str(tmp_path / "cache"))
    cfg = CPUDecodeConfig(layers=1, vocab=256, batches=(1, 2), dtypes=("fp32",), variants=("eager", "llama.cpp"),
                          new_tokens=6, skip_steps=1, widths=TINY)
    res = run(cfg, tmp_path, log=lambda s: None)
    assert not res["notes"], res["notes"]
    for row in res["rows"]:
        for q in ("F16", "Q8_0", "Q4_K_M"):
            rec = row["variants"][f"llama.cpp {q}"]
            assert rec["step_ms"] > 0 and rec["steps"] == 5
            assert 0 < rec["weight_bytes_per_step"] <= row["weight_bytes_per_step"]  # fp32 row: F16 or fewer bytes
            assert rec["fraction"] == pytest.approx(rec["weight_bytes_per_step"] / rec["read_bandwidth"] * 1e3
                                                    / rec["step_ms"])
    assert "llama.cpp Q4_K_M" in format_table(res)
