"""Device keys: many spellings of one GPU give one key; variants stay apart."""

from __future__ import annotations

import pytest

from moecc.devices import PROFILES, UnknownDeviceError, normalise_device_key, profile


@pytest.mark.parametrize("spelling, arch, sms, key", [
    ("NVIDIA H100 80GB HBM3", 90, 132, "h100_sxm"),
    ("H100-SXM5-80GB", None, None, "h100_sxm"),
    ("NVIDIA H100 SXM5 80GB", None, None, "h100_sxm"),
    ("h100_sxm", None, None, "h100_sxm"),
    ("NVIDIA H100 PCIe", 90, 114, "h100_pcie"),
    ("NVIDIA H100", 90, 114, "h100_pcie"),  # the SM count tells the PCIe card apart
    ("NVIDIA H200", 90, 132, "h200"),
    ("NVIDIA A100-SXM4-80GB", 80, 108, "a100"),
    ("NVIDIA L40S", 89, 142, "l40s"),
    ("NVIDIA GeForce RTX 4090", 89, 128, "rtx4090"),
    ("RTX 4090", None, None, "rtx4090"),
    ("rtx4090", None, None, "rtx4090"),
    ("geforce-rtx-4090", None, None, "rtx4090"),
    ("NVIDIA GeForce RTX 3090", 86, 82, "rtx3090"),
    ("NVIDIA GeForce RTX 5090", 120, 170, "rtx5090"),
])
def test_spellings_normalise_to_one_key(spelling, arch, sms, key):
    assert normalise_device_key(spelling, arch, sms) == key
    assert profile(normalise_device_key(spelling, arch, sms)).key == key


@pytest.mark.parametrize("spelling, arch, sms", [
    ("NVIDIA GeForce RTX 3090 Ti", 86, 84),
    ("NVIDIA GeForce RTX 4090 D", 89, 114),
    ("NVIDIA GeForce RTX 4090 Laptop GPU", 89, 76),
    ("NVIDIA H100 NVL", 90, 132),
])
def test_other_cards_of_a_family_get_their_own_key(spelling, arch, sms):
    key = normalise_device_key(spelling, arch, sms)
    assert key not in {p.key for p in PROFILES}
    assert key == normalise_device_key(spelling.upper(), arch, sms)  # still stable
    with pytest.raises(UnknownDeviceError):
        profile(key)


def test_profiles_are_consistent():
    limits = {90: 232448, 80: 166912, 89: 101376, 86: 101376, 120: 101376}  # DEVICE.md, CUDA guide
    for p in PROFILES:
        assert p.max_shared_memory_per_block == limits[p.arch], p.key
        assert p.peak("bf16") > 0 and p.memory_bandwidth_gbps > 0
        assert p.has_fp8 == ("fp8" in p.peak_tflops)
        assert "__" not in p.key
