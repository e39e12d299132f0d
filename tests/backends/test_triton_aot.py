"""Ahead-of-time compilation of the Triton MoE kernels for sm_90 / sm_89 / sm_86, no GPU.

`check_config_fits` compiles the two grouped GEMMs for a profile's arch and compares the
kernels' real shared memory (metadata.shared) with moecc.devices' limit. Every shipped
configuration is compiled in the default run (about 3 minutes from a cold Triton cache):
the heuristic's configurations for the reference shapes on each arch, and every entry of
the tables packaged in moecc/tuning_tables for the GPU they are for. Also checks the
heuristic's rules and that an oversized configuration is refused for the RTX 4090.
Quantised stacks (aot.SHIPPED_WEIGHT_FORMATS: int8 per-row / g128, int4 g32 / 64 / 128,
fp8 128x128): every distinct shipped configuration of every format is compiled for each
arch in bf16 in the default run; every shape and fp16 as well under `slow`.
"""

from __future__ import annotations

import pytest

from moecc import devices
from moecc.backends.triton.config import KernelConfig
from moecc.backends.triton.heuristics import choose_strategy, heuristic_config
from moecc.shapes import REFERENCE_SHAPES, REFERENCE_TOKEN_COUNTS

ARCH_PROFILES = {90: "h100_sxm", 89: "rtx4090", 86: "rtx3090"}


def _aot():
    from moecc.backends.triton import aot

    return aot


@pytest.mark.parametrize("arch", sorted(ARCH_PROFILES))
def test_representative_heuristic_config_fits(arch):
    profile = devices.profile(ARCH_PROFILES[arch])
    shape = (128, 768, 2048, 8)  # qwen3-30b-a3b
    config = heuristic_config(*shape, 256, "bf16", profile)
    fit = _aot().check_config_fits(config, shape, "bf16", profile)
    assert fit.fits, fit.reason
    assert 0 < fit.shared_bytes <= profile.max_shared_memory_per_block


def test_oversized_config_is_rejected_for_rtx4090_but_fits_h100():
    shape = (8, 14336, 4096, 2)  # mixtral-8x7b
    big = KernelConfig(block_m=64, block_n=128, block_k=64, group_m=8, split_k=1, num_warps=4, num_stages=4,
                       strategy="prefill")
    rtx4090 = devices.profile("rtx4090")
    assert rtx4090.max_shared_memory_per_block == 101376
    fit = _aot().check_config_fits(big, shape, "bf16", rtx4090)
    assert not fit.fits
    assert fit.shared_bytes > 101376
    assert "101376" in fit.reason and "sm_89" in fit.reason
    h100 = _aot().check_config_fits(big, shape, "bf16", devices.profile("h100_sxm"))
    assert h100.fits, h100.reason  # sm_90 allows 232448 B per block
    assert fit.shared_bytes < h100.shared_bytes <= 232448  # compiled per arch: sizes differ


def test_shipped_configs_cover_reference_shapes():
    configs = _aot().shipped_configs(devices.profile("h100_sxm"))
    assert len(configs) == len(REFERENCE_SHAPES) * 2 * len(REFERENCE_TOKEN_COUNTS)
    assert {c.strategy for *_, c in configs} == {"decode", "prefill"}


@pytest.mark.parametrize("arch", sorted(ARCH_PROFILES))
def test_every_shipped_config_fits(arch):
    profile = devices.profile(ARCH_PROFILES[arch])
    seen = {}
    for shape, dtype, _, config in _aot().shipped_configs(profile, dtypes=("bf16", "fp16", "fp32")):
        key = (config, shape, dtype)
        if key not in seen:
            seen[key] = _aot().check_config_fits(config, shape, dtype, profile)
            assert seen[key].fits, f"{config} {shape} {dtype}: {seen[key].reason}"


def test_every_shipped_config_fits_with_bias_and_shared_experts():
    profile = devices.profile("rtx4090")
    for shape, dtype, _, config in _aot().shipped_configs(profile, dtypes=("bf16",))[::3]:
        fit = _aot().check_config_fits(config, shape, dtype, profile, activation="swiglu_oai", has_bias=True,
                                       num_shared=1)
        assert fit.fits, fit.reason


# ---- quantised expert stacks (int8 / int4 / fp8 weight-only) ------------------------------

QUANT_FORMATS = [pytest.param(f, g, id=f"{f}_g{g}") for f, g in (
    ("int8", 0), ("int8", 128), ("int4", 32), ("int4", 64), ("int4", 128), ("fp8", 128))]


def test_quant_formats_are_the_shipped_ones():
    assert [tuple(p.values) for p in QUANT_FORMATS] == list(_aot().SHIPPED_WEIGHT_FORMATS)


def _check_shipped_quantized(arch, fmt, group, dtypes, one_shape_per_config):
    profile = devices.profile(ARCH_PROFILES[arch])
    seen = {}
    for shape, dtype, _, config in _aot().shipped_configs(profile, dtypes, fmt, group):
        assert group == 0 or group % config.block_k == 0, config  # a step never crosses a scale group
        key = (config, dtype) if one_shape_per_config else (config, shape, dtype)
        if key not in seen:
            seen[key] = _aot().check_config_fits(config, shape, dtype, profile, weight_format=fmt, group_size=group)
            assert seen[key].fits, f"{fmt} g{group} {config} {shape} {dtype}: {seen[key].reason}"
    return seen


# Compiling one format's shipped configs for one arch takes ~25 s on a fresh 2-core machine
# (no Triton cache): the default run (CI) compiles every format for one arch and every arch
# for some format; the other (arch, format) pairs run with the slow tests (`make test-all`).
DEFAULT_ARCH = {("int8", 0): 89, ("int8", 128): 86, ("int4", 32): 86, ("int4", 64): 89, ("int4", 128): 90,
                ("fp8", 128): 90}
QUANT_ARCH_FORMATS = [
    pytest.param(arch, *p.values, id=f"{arch}-{p.id}",
                 marks=() if DEFAULT_ARCH[tuple(p.values)] == arch else pytest.mark.slow)
    for arch in sorted(ARCH_PROFILES) for p in QUANT_FORMATS]


def test_default_run_covers_every_format_and_arch():
    assert set(DEFAULT_ARCH) == {tuple(p.values) for p in QUANT_FORMATS}
    assert set(DEFAULT_ARCH.values()) == set(ARCH_PROFILES)


@pytest.mark.parametrize("arch,fmt,group", QUANT_ARCH_FORMATS)
def test_every_shipped_quantized_config_fits(arch, fmt, group):
    """Every distinct shipped configuration of every format, bf16 (the kernels' shared memory
    depends on the tiles and dtype, not the shape's integers)."""
    _check_shipped_quantized(arch, fmt, group, ("bf16",), one_shape_per_config=True)


@pytest.mark.slow
@pytest.mark.parametrize("fmt,group", QUANT_FORMATS)
@pytest.mark.parametrize("arch", sorted(ARCH_PROFILES))
def test_every_shipped_quantized_config_fits_every_shape_and_dtype(arch, fmt, group):
    _check_shipped_quantized(arch, fmt, group, ("bf16", "fp16"), one_shape_per_config=False)


def test_quantized_with_bias_and_shared_experts_fits():
    profile = devices.profile("rtx3090")
    for fmt, group in _aot().SHIPPED_WEIGHT_FORMATS[1::2]:
        for shape, dtype, _, config in _aot().shipped_configs(profile, ("fp16",), fmt, group)[0:7:6]:  # T = 1, 4096
            fit = _aot().check_config_fits(config, shape, dtype, profile, activation="swiglu_oai", has_bias=True,
                                           num_shared=1, weight_format=fmt, group_size=group)
            assert fit.fits, fit.reason


def test_packed_int4_tiles_take_less_shared_memory_than_dense():
    """The pipeline stages the packed bytes, not dequantised tiles (the point of the format)."""
    h100 = devices.profile("h100_sxm")
    shape = (128, 768, 2048, 8)
    config = KernelConfig(64, 128, 64, 8, 1, 8, 3, "prefill")
    dense = _aot().check_config_fits(config, shape, "bf16", h100)
    int4 = _aot().check_config_fits(config, shape, "bf16", h100, weight_format="int4", group_size=64)
    assert dense.fits and int4.fits
    assert int4.shared_bytes < dense.shared_bytes


def test_block_k_crossing_a_scale_group_does_not_fit():
    fit = _aot().check_config_fits(KernelConfig(16, 64, 128, 1, 1, 4, 2, "decode"), (8, 256, 256, 2), "bf16",
                                   devices.profile("rtx3090"), weight_format="int4", group_size=32)
    assert not fit.fits and "crosses a int4 scale group of 32" in fit.reason


@pytest.mark.parametrize("fmt,group,expected", [("int4", 32, 32), ("int4", 128, 128), ("int8", 0, 128),
                                                ("fp8", 128, 128)])
def test_heuristic_block_k_stays_inside_the_scale_group(fmt, group, expected):
    from moecc.backends.triton.weight_formats import NO_LIMIT, max_block_k
    from moecc.spec import ExpertSpec

    limit = max_block_k(ExpertSpec(2048, 768, weight_format=fmt, group_size=group))
    config = heuristic_config(128, 768, 2048, 8, 1, "bf16", None, max_block_k=None if limit == NO_LIMIT else limit)
    assert config.block_k == expected
    with pytest.raises(ValueError, match="multiple of 16|power of two"):
        heuristic_config(128, 768, 2048, 8, 1, "bf16", None, max_block_k=8)


@pytest.mark.parametrize("arch", [90, 86])
def test_routing_alignment_and_combine_compile(arch):
    from moecc.spec import RouterSpec

    router = RouterSpec(16, 4, "sigmoid", n_group=4, topk_group=2, has_correction_bias=True, renormalize=True,
                        routed_scaling_factor=2.5)
    shared = _aot().compile_support_kernels(router, 256, "bf16", arch, num_shared=1, split_k=2)
    assert set(shared) == {"route_topk_kernel", "count_slots_kernel", "scatter_slots_kernel",
                           "combine_slots_kernel"}


@pytest.mark.parametrize("arch", sorted(ARCH_PROFILES))
def test_support_kernels_compile_for_reference_routers(arch):
    from moecc.spec import RouterSpec

    routers = [
        (RouterSpec(256, 8, "sigmoid", n_group=8, topk_group=4, has_correction_bias=True, renormalize=True,
                    renormalize_eps=1e-20, routed_scaling_factor=2.5), 1, 7168),  # deepseek-v3
        (RouterSpec(128, 8, renormalize=True), 0, 2048),  # qwen3
        (RouterSpec(32, 4, "topk_softmax", has_router_bias=True), 0, 2880),  # gpt-oss-20b
        (RouterSpec(1, 1), 0, 64),
    ]
    for router, num_shared, hidden in routers:
        for dtype, split_k in (("bf16", 1), ("fp16", 4)):
            _aot().compile_support_kernels(router, hidden, dtype, arch, num_shared=num_shared, split_k=split_k)


def test_import_has_no_side_effects():
    """Importing the backend imports no triton and compiles nothing (fresh process)."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = ("import sys, moecc.backends.triton as t; assert 'triton' not in sys.modules; "
            "assert not t.is_available('cpu') or __import__('os').environ.get('TRITON_INTERPRET')")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# ---- heuristic rules (no compilation) ----------------------------------------------------

@pytest.mark.parametrize("profile_key", [None, "h100_sxm", "rtx4090", "rtx3090"])
def test_heuristic_configs_are_valid_and_fit_the_estimate(profile_key):
    profile = devices.profile(profile_key) if profile_key else None
    limit = profile.max_shared_memory_per_block if profile else 99 * 1024
    for s in REFERENCE_SHAPES:
        for t in REFERENCE_TOKEN_COUNTS:
            for dtype, size in (("bf16", 2), ("fp32", 4)):
                c = heuristic_config(s.num_experts, s.intermediate_size, s.hidden_size, s.top_k, t, dtype, profile)
                assert KernelConfig.from_dict(c.to_dict()) == c
                assert c.num_stages >= 2
                assert c.num_stages * (c.block_m * c.block_k + 2 * c.block_n * c.block_k) * size <= limit
                assert c.strategy == "decode" or c.split_k == 1


def test_heuristic_strategy_by_token_count():
    assert choose_strategy(256, 8, 1) == "decode"
    assert choose_strategy(8, 2, 1) == "decode"
    assert choose_strategy(8, 2, 4096) == "prefill"
    assert choose_strategy(256, 8, 4096) == "prefill"
    # mixtral at T=1: 2 active experts x 4096/64 column blocks cannot fill 132 SMs -> split-K
    decode = heuristic_config(8, 14336, 4096, 2, 1, "bf16", devices.profile("h100_sxm"))
    assert decode.strategy == "decode" and decode.block_m == 16 and decode.split_k > 1


def test_unknown_dtype_is_an_error():
    with pytest.raises(ValueError, match="dtype"):
        heuristic_config(8, 64, 64, 2, 1, "int3", None)


def test_every_packaged_table_config_compiles_and_fits_its_gpu():
    """The predicted RTX 4090 / 3090 tables are shipped configurations too."""
    import os

    from moecc.tuning.keys import parse_filename
    from moecc.tuning.lookup import packaged_dir
    from moecc.tuning.store import read_table

    from moecc.backends.triton.config import KernelConfig

    folder = packaged_dir()
    checked = {}
    for name in sorted(os.listdir(folder)):
        key = parse_filename(name) if name.endswith(".json") else None
        if key is None or key.op != "triton.moe":
            continue
        prof = devices.profile(key.device)
        for entry in read_table(folder / name)["entries"].values():
            config = KernelConfig.from_dict(entry["config"])
            ident = (key.device, config, key.shape, key.dtype)
            if ident not in checked:
                checked[ident] = _aot().check_config_fits(config, key.shape, key.dtype, prof)
                assert checked[ident].fits, f"{name}: {config}: {checked[ident].reason}"
    assert {d for d, *_ in checked} >= {"rtx4090", "rtx3090"}
