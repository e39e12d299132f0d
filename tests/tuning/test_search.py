"""Candidate pruning by device: shared memory (analytic estimate), strategy by M."""

from __future__ import annotations

import pytest

from moecc.backends.triton.config import KernelConfig
from moecc.devices import profile
from moecc.tuning.search import (
    allowed_strategies,
    candidate_configs,
    check_fit,
    pruned_candidates,
    shared_memory_bytes,
)

SHAPE = (128, 768, 2048, 8)
SM89_LIMIT = 101376


def test_analytic_estimate_formula():
    cfg = KernelConfig(block_m=64, block_n=128, block_k=64, num_stages=4)
    assert shared_memory_bytes(cfg, "bf16") == 4 * (64 * 64 + 2 * 128 * 64) * 2
    assert shared_memory_bytes(cfg, "fp8") == 4 * (64 * 64 + 2 * 128 * 64)


def test_rtx4090_rejects_configs_over_the_sm89_limit():
    rtx4090 = profile("rtx4090")
    assert rtx4090.max_shared_memory_per_block == SM89_LIMIT
    big = KernelConfig(block_m=128, block_n=128, block_k=64, num_stages=4, num_warps=8)  # 196608 B
    assert shared_memory_bytes(big, "bf16") > SM89_LIMIT
    fit = check_fit(big, SHAPE, "bf16", rtx4090, mode="analytic")
    assert not fit.fits and fit.shared_bytes == 196608 and "101376" in fit.reason
    assert check_fit(big, SHAPE, "bf16", profile("h100_sxm"), mode="analytic").fits  # 232448 on sm_90
    edge = KernelConfig(block_m=64, block_n=128, block_k=64, num_stages=3)  # 122880 B
    assert not check_fit(edge, SHAPE, "bf16", rtx4090, mode="analytic").fits
    ok = KernelConfig(block_m=64, block_n=64, block_k=64, num_stages=3)  # 73728 B
    assert check_fit(ok, SHAPE, "bf16", rtx4090, mode="analytic").fits


@pytest.mark.parametrize("m", [1, 256, 4096])
def test_pruned_candidates_fit_and_rejections_are_exactly_the_oversized(m):
    rtx4090, h100 = profile("rtx4090"), profile("h100_sxm")
    for strategy in allowed_strategies(m, SHAPE):
        keep, rejected = pruned_candidates(strategy, m, SHAPE, "bf16", rtx4090, "analytic")
        assert keep and rejected
        assert all(shared_memory_bytes(c, "bf16") <= SM89_LIMIT for c in keep)
        assert all(shared_memory_bytes(c, "bf16") > SM89_LIMIT and not f.fits for c, f in rejected)
        assert len(keep) + len(rejected) == len(candidate_configs(strategy, m, SHAPE))
        assert len(pruned_candidates(strategy, m, SHAPE, "bf16", h100, "analytic")[0]) > len(keep)


def test_strategies_by_token_count():
    assert allowed_strategies(1, SHAPE) == ("decode",)
    assert allowed_strategies(64, SHAPE) == ("decode", "prefill")
    assert allowed_strategies(4096, SHAPE) == ("prefill",)
    assert all(c.strategy == "decode" for c in candidate_configs("decode", 1, SHAPE))
    assert max(c.block_m for c in candidate_configs("prefill", 16, SHAPE)) <= 32  # few rows per expert


def test_aot_checker_decides_only_between_the_bounds(monkeypatch):
    """auto: the estimate admits, the lower bound rejects, the AOT check decides in between."""
    import moecc.tuning.search as search

    calls = []

    class Fit:
        fits, shared_bytes, reason = False, 99999, "metadata.shared too large"

    monkeypatch.setattr(search, "_aot_checker", lambda: (lambda *a: calls.append(a) or Fit()))
    monkeypatch.setattr(search, "_AOT_CACHE", {})
    rtx4090 = profile("rtx4090")
    small = KernelConfig(block_m=16, block_n=64, block_k=64, num_stages=2)  # estimate 36864 B: fits
    assert check_fit(small, SHAPE, "bf16", rtx4090, mode="auto").method == "analytic"
    between = KernelConfig(block_m=64, block_n=128, block_k=64, num_stages=3)  # 122880 B est., 81920 B bound
    res = check_fit(between, SHAPE, "bf16", rtx4090, mode="auto")
    assert (res.fits, res.method, len(calls)) == (False, "aot", 1)
    assert not check_fit(between, SHAPE, "bf16", rtx4090, mode="analytic").fits
    huge = KernelConfig(block_m=128, block_n=256, block_k=128, num_stages=5, num_warps=8)
    assert not check_fit(huge, SHAPE, "bf16", rtx4090, mode="auto").fits
    assert not check_fit(huge, SHAPE, "bf16", rtx4090, mode="aot").fits
    assert len(calls) == 1  # nothing over the lower bound was compiled
    check_fit(small, SHAPE, "bf16", rtx4090, mode="aot")
    assert len(calls) == 2
