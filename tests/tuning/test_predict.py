"""Predictions: fit the device, are deterministic, and follow the token count."""

from __future__ import annotations

from moecc.devices import profile
from moecc.shapes import REFERENCE_SHAPES
from moecc.tuning.predict import predict_config, predicted_entries
from moecc.tuning.search import shared_memory_bytes


def test_predictions_fit_and_scale_with_tokens():
    for s in REFERENCE_SHAPES:
        shape = (s.num_experts, s.intermediate_size, s.hidden_size, s.top_k)
        for dev in ("rtx4090", "rtx3090", "h100_sxm"):
            prof = profile(dev)
            entries = predicted_entries(prof, shape, "bf16", [1, 4096])
            assert set(entries) == {1, 4096}
            for e in entries.values():
                assert e["origin"] == "predicted" and 0 < e["roofline_fraction"] <= 1.0001
            from moecc.backends.triton.config import KernelConfig

            small, large = (KernelConfig.from_dict(entries[m]["config"]) for m in (1, 4096))
            assert shared_memory_bytes(small, "bf16") <= prof.max_shared_memory_per_block
            assert shared_memory_bytes(large, "bf16") <= prof.max_shared_memory_per_block
            assert small.strategy == "decode" and large.strategy == "prefill"
            assert large.block_m >= small.block_m


def test_predict_config_unknown_device_or_op_is_none():
    assert predict_config("mystery_gpu", "triton.moe", (8, 64, 64, 2), "bf16", 4) is None
    assert predict_config("rtx4090", "tvm.moe", (8, 64, 64, 2), "bf16", 4) is None
    assert predict_config("rtx3090", "triton.moe", (8, 64, 64, 2), "fp8", 4) is None  # no fp8 on sm_86
    a = predict_config("rtx4090", "triton.moe", (8, 14336, 4096, 2), "bf16", 100)
    assert a == predict_config("rtx4090", "triton.moe", (8, 14336, 4096, 2), "bf16", 128)  # same bucket
