"""Candidate launch configurations for the Triton MoE kernels, pruned per device.

Search space (KernelConfig fields), by strategy:
    decode:  block_m 16; block_n 32..256; block_k 64..256; split_k 1..8; warps 4, 8;
             stages 2..5. Few tokens per expert: stream weights, fill SMs by splitting.
    prefill: block_m 16..128 (at most twice the expected tokens per active expert,
             rounded up to a power of two); block_n 32..256; block_k 32..128;
             group_m 1, 8; warps 4, 8; stages 2..5; split_k 1.
Which strategies a token count M may use (`allowed_strategies`): decode while the
expected tokens per active expert is at most 16, prefill from M >= 16 on; both in
between, so the tuner decides there.

Pruning by the device (`check_fit`): a configuration must fit the profile's
`max_shared_memory_per_block`. Per pipeline stage the first (gate+up) GEMM keeps one
activation tile [BM, BK] and two weight tiles [BN, BK] (gate and up) in shared memory;
per_stage = (BM*BK + 2*BN*BK) * bytes_per_element.
  * analytic estimate (`shared_memory_bytes`): stages * per_stage. Conservative: Triton
    keeps stages - 1 tile sets (measured with the AOT check: BM64 BN128 BK64, 3 stages,
    bf16 uses 81920 B, the estimate says 122880), so what the estimate admits fits.
  * lower bound (`shared_memory_lower_bound`): (stages - 1) * per_stage. Over the limit
    -> certainly does not fit, rejected without compiling.
  * ahead-of-time check: `moecc.backends.triton.aot.check_config_fits(config, shape,
    dtype, profile)` (the Triton engineer's module) compiles both GEMMs for the profile's
    arch and compares the real `metadata.shared` with the limit (Triton does not check it
    when compiling ahead of time). A few seconds per config on a CPU.
Modes: "analytic" admits exactly what the estimate admits (no compiles: tests, lookup-time
prediction). "auto" (default) admits what the estimate admits, rejects what the lower
bound rejects, and compiles only the configurations in between, when the AOT module is
importable (otherwise behaves as "analytic"). "aot" compiles everything the lower bound
admits.
Results of the AOT check are cached per (config, shape, dtype, device).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from moecc.devices import DeviceProfile

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "tf32": 4, "fp8": 1, "int8": 1, "int4": 1}


@dataclass(frozen=True)
class FitResult:
    """Same fields as backends/triton/aot.FitResult, plus which check decided."""

    fits: bool
    shared_bytes: int
    reason: str
    method: str = "analytic"


def dtype_bytes(dtype: str) -> int:
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; known: {sorted(DTYPE_BYTES)}") from None


def expected_active_experts(num_tokens: int, num_experts: int, top_k: int) -> float:
    """U: distinct experts hit by M tokens under uniform routing, E*(1-(1-k/E)^M)."""
    u = num_experts * (1.0 - (1.0 - top_k / num_experts) ** num_tokens)
    return max(1.0, min(u, float(num_experts), float(num_tokens * top_k)))


def tokens_per_active_expert(num_tokens: int, shape: tuple) -> float:
    e, _, _, top_k = shape
    return num_tokens * top_k / expected_active_experts(num_tokens, e, top_k)


def allowed_strategies(num_tokens: int, shape: tuple) -> tuple[str, ...]:
    out = []
    if tokens_per_active_expert(num_tokens, shape) <= 16:
        out.append("decode")
    if num_tokens >= 16:
        out.append("prefill")
    return tuple(out)


def shared_memory_bytes(config, dtype: str) -> int:
    """Analytic shared-memory estimate of the first (gate+up) GEMM, which is the larger."""
    b = dtype_bytes(dtype)
    return config.num_stages * (config.block_m * config.block_k + 2 * config.block_n * config.block_k) * b


def _next_pow2(x: float) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1.0, x))))


def candidate_configs(strategy: str, num_tokens: int, shape: tuple) -> list:
    """Every configuration of `strategy` worth trying at this token count (unpruned by device)."""
    from moecc.backends.triton.config import KernelConfig

    _, n, k, _ = shape
    out = []
    if strategy == "decode":
        space = itertools.product([16], [32, 64, 128, 256], [64, 128, 256], [1, 2, 4, 8], [4, 8], [2, 3, 4, 5])
        for bm, bn, bk, split, warps, stages in space:
            if bn > _next_pow2(n) or bk > _next_pow2(k) or (split > 1 and 2 * bk * split > n):
                continue  # split-K of the down GEMM (reduction over N) keeps >= 2 BK steps per split
            out.append(KernelConfig(bm, bn, bk, 1, split, warps, stages, "decode"))
    elif strategy == "prefill":
        max_bm = min(128, max(16, 2 * _next_pow2(tokens_per_active_expert(num_tokens, shape))))
        bms = [b for b in (16, 32, 64, 128) if b <= max_bm]
        space = itertools.product(bms, [32, 64, 128, 256], [32, 64, 128], [1, 8], [4, 8], [2, 3, 4, 5])
        for bm, bn, bk, group, warps, stages in space:
            if bn > _next_pow2(n) or bk > _next_pow2(k):
                continue
            if bm * bn >= 128 * 128 and warps < 8:
                continue  # a 128x128+ accumulator per 4 warps spills registers
            out.append(KernelConfig(bm, bn, bk, group, 1, warps, stages, "prefill"))
    else:
        raise ValueError(f"unknown strategy {strategy!r}")
    return out


def _aot_checker():
    try:
        from moecc.backends.triton.aot import check_config_fits
    except ImportError:
        return None
    return check_config_fits


_AOT_CACHE: dict[tuple, FitResult] = {}  # (config, shape, dtype, profile key, arch) -> result


def _aot_fit(config, shape: tuple, dtype: str, profile: DeviceProfile) -> FitResult:
    ident = (config, shape, dtype, profile.key, profile.arch, profile.max_shared_memory_per_block)
    if ident not in _AOT_CACHE:
        res = _aot_checker()(config, shape, dtype, profile)
        _AOT_CACHE[ident] = FitResult(bool(res.fits), int(res.shared_bytes), str(res.reason), "aot")
    return _AOT_CACHE[ident]


def shared_memory_lower_bound(config, dtype: str) -> int:
    """(stages - 1) tile sets: what Triton's pipeliner keeps at least."""
    b = dtype_bytes(dtype)
    return max(1, config.num_stages - 1) * (config.block_m * config.block_k + 2 * config.block_n * config.block_k) * b


def check_fit(config, shape: tuple, dtype: str, profile: DeviceProfile, mode: str = "auto") -> FitResult:
    """Whether `config` may run on `profile` (see module docstring for the checks)."""
    if mode not in ("auto", "aot", "analytic"):
        raise ValueError(f"fit mode {mode!r} is not auto, aot or analytic")
    est = shared_memory_bytes(config, dtype)
    limit = profile.max_shared_memory_per_block
    where = f"{profile.name}'s {limit} B per block (sm_{profile.arch})"
    if mode == "analytic" or (mode == "auto" and est <= limit) or _aot_checker() is None:
        if mode == "aot" and _aot_checker() is None:
            raise RuntimeError("fit mode 'aot' needs moecc.backends.triton.aot.check_config_fits")
        if est > limit:
            return FitResult(False, est, f"estimated shared memory {est} B exceeds {where}")
        return FitResult(True, est, f"estimated shared memory {est} B within {where}")
    low = shared_memory_lower_bound(config, dtype)
    if low > limit:
        return FitResult(False, low, f"at least {low} B of shared memory, over {where}")
    try:
        return _aot_fit(config, tuple(shape), dtype, profile)
    except Exception as exc:  # an AOT failure means this config cannot be built
        return FitResult(False, est, f"ahead-of-time compile failed: {exc!r}", "aot")


def pruned_candidates(strategy: str, num_tokens: int, shape: tuple, dtype: str, profile: DeviceProfile,
                      mode: str = "auto") -> tuple[list, list]:
    """(fitting configs, [(rejected config, FitResult)]) for one strategy and token count."""
    keep, rejected = [], []
    for cfg in candidate_configs(strategy, num_tokens, shape):
        fit = check_fit(cfg, shape, dtype, profile, mode)
        (keep if fit.fits else rejected).append(cfg if fit.fits else (cfg, fit))
    return keep, rejected
