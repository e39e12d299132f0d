"""Configurations predicted from a device profile, for GPUs nobody has tuned.

An analytic cost model ranks the device-pruned candidates (search.py) and returns the
cheapest. It is a model, not a measurement: entries it produces are marked "predicted"
and the lookup warns that they are not tuned.

Model of one MoE layer at M tokens (legend in moecc/spec.py), uniform routing:
    U   = E * (1 - (1 - k/E)^M) experts are hit, t = M*k/U tokens each.
    GEMM1 (gate+up): rows t per expert, columns 2N (one tile covers BN gate + BN up
    columns), reduction K.  GEMM2 (down): rows t, columns K, reduction N.
split_k splits the down GEMM's reduction (over N) only, as the Triton kernels do.
For each GEMM and configuration:
    tiles   = U * ceil(t/BM) * ceil(cols/BN) * split_k
    compute = ceil(tiles / SMs) * tile_flops / (peak_per_SM * eff(BM, BN))
              (padded rows count: a BM=64 tile over 2 tokens does 64 rows of work;
              eff falls for tiles too small to keep the tensor cores busy)
    memory  = bytes / min(BW, active_blocks * bytes_in_flight_per_block / latency)
              (Little's law: a block keeps (stages - 1) tiles of loads in flight; too
              few blocks or stages cannot cover DRAM latency)
              bytes = weights (once, plus L2 misses of re-reads by an expert's other
              M-tiles: 30%, 10% with group_m > 1) + activations + fp32 split-k partials
    time    = max(compute, memory) + a launch cost per extra split-k reduction
    compute also pays a fixed cost per main-loop step (favours larger BK) and loses a
    little with 2 stages (load and math barely overlap).
Rates are the profile's datasheet figures (moecc/devices.py); only the ranking matters.

Assumptions: uniform routing; the L2 miss fractions above; DRAM latency ~ 700 ns.
"""

from __future__ import annotations

import functools
import math

from moecc.devices import DeviceProfile, UnknownDeviceError, profile as get_profile
from moecc.roofline import floor_seconds, moe_layer_traffic
from moecc.tuning.keys import STRATEGY_AUTO
from moecc.tuning.search import (
    allowed_strategies,
    candidate_configs,
    check_fit,
    dtype_bytes,
    expected_active_experts,
    shared_memory_bytes,
    shared_memory_lower_bound,
)

DRAM_LATENCY_S = 700e-9
SPLIT_K_REDUCE_S = 2e-6  # an extra reduction pass over fp32 partials (launch + sync)
L2_MISS, L2_MISS_GROUPED = 0.3, 0.1  # fraction of weight re-reads that miss L2
MAX_VERIFY = 16  # ranked configs confirmed by compiling before giving up
K_STEP_S = 30e-9  # fixed cost of one main-loop iteration (address math, barriers)


def _gemm_time(cfg, profile: DeviceProfile, dtype: str, experts: float, rows: float, cols: int,
               width: int, red: int, split_k: int) -> float:
    b = dtype_bytes(dtype)
    m_tiles = experts * math.ceil(rows / cfg.block_m)
    n_tiles = math.ceil(cols / cfg.block_n)
    tiles = m_tiles * n_tiles * split_k
    # compute: per-SM tile queue, padded rows included
    tile_flops = 2.0 * cfg.block_m * cfg.block_n * width * (red / split_k)
    peak = profile.peak(dtype if dtype in profile.peak_tflops else "bf16") * 1e12
    eff = min(1.0, (cfg.block_m / 64) ** 0.5) * min(1.0, (cfg.block_n * width / 128) ** 0.5) * 0.8
    if cfg.block_m < 16:
        eff *= cfg.block_m / 16  # below the tensor-core minimum tile
    eff *= min(1.0, (cfg.num_stages - 1) / 2) ** 0.25  # 2 stages barely overlap load and math
    tiles_per_sm = math.ceil(tiles / profile.num_sms)
    k_steps = math.ceil(red / split_k / cfg.block_k)
    compute = tiles_per_sm * (tile_flops / (peak / profile.num_sms * eff) + k_steps * K_STEP_S)
    # memory: weights once per M-tile, activations once per N-tile, outputs (+ partials)
    # an expert's weights come from DRAM once; its other M-tiles re-read them, mostly
    # from L2 (more so when group_m orders programs so that they run together)
    miss = L2_MISS_GROUPED if cfg.group_m > 1 else L2_MISS
    weight_bytes = experts * cols * width * red * b * (1 + (m_tiles / experts - 1) * miss)
    act_bytes = experts * rows * red * b + experts * rows * cols * 2
    partial_bytes = (2 * experts * rows * cols * 4 * split_k) if split_k > 1 else 0
    smem = shared_memory_bytes(cfg, dtype)
    blocks_per_sm = max(1, min(profile.max_shared_memory_per_block // max(1, smem),
                               profile.registers_per_sm // (cfg.num_warps * 32 * 128), 16 // cfg.num_warps))
    active = min(tiles, profile.num_sms * blocks_per_sm)
    in_flight = (cfg.num_stages - 1) * (cfg.block_m + cfg.block_n * width) * cfg.block_k * b
    bw = min(profile.memory_bandwidth_gbps * 1e9, active * max(in_flight, 1) / DRAM_LATENCY_S)
    memory = (weight_bytes + act_bytes + partial_bytes) / bw
    return max(compute, memory) + (SPLIT_K_REDUCE_S if split_k > 1 else 0.0)


def estimate_time(cfg, profile: DeviceProfile, shape: tuple, dtype: str, num_tokens: int) -> float:
    """Modelled seconds for one MoE layer (GEMM1 + GEMM2) with `cfg` on `profile`."""
    e, n, k, top_k = shape
    experts = expected_active_experts(num_tokens, e, top_k)
    rows = num_tokens * top_k / experts
    return (_gemm_time(cfg, profile, dtype, experts, rows, n, 2, k, 1)  # split-K: down GEMM only
            + _gemm_time(cfg, profile, dtype, experts, rows, k, 1, n, cfg.split_k))


def predict_best(profile: DeviceProfile, shape: tuple, dtype: str, num_tokens: int,
                 strategy: str = STRATEGY_AUTO, fit_mode: str = "analytic"):
    """(KernelConfig, modelled seconds) with the lowest modelled time, or None if none fits.

    fit_mode "analytic": rank only what the conservative estimate admits (no compiling).
    "auto"/"aot": rank what the lower bound admits, then confirm the best few with
    search.check_fit in that mode (ahead-of-time compiles) until one fits.
    """
    strategies = allowed_strategies(num_tokens, shape) if strategy == STRATEGY_AUTO else (strategy,)
    ranked = []
    for strat in strategies:
        for cfg in candidate_configs(strat, num_tokens, shape):
            admitted = (shared_memory_bytes(cfg, dtype) if fit_mode == "analytic"
                        else shared_memory_lower_bound(cfg, dtype))
            if admitted > profile.max_shared_memory_per_block:
                continue
            t = estimate_time(cfg, profile, shape, dtype, num_tokens)
            ranked.append((_rank(t, cfg), cfg, t))
    ranked.sort(key=lambda r: r[0])
    for _, cfg, t in ranked[:MAX_VERIFY] if fit_mode != "analytic" else ranked[:1]:
        if fit_mode == "analytic" or check_fit(cfg, tuple(shape), dtype, profile, fit_mode).fits:
            return cfg, t
    return None


def rank_key(cfg, profile: DeviceProfile, shape: tuple, dtype: str, num_tokens: int) -> tuple:
    """Sort key: modelled time (1% resolution), then the tie-break preference."""
    return _rank(estimate_time(cfg, profile, shape, dtype, num_tokens), cfg)


def _rank(t: float, cfg) -> tuple:
    return (round(math.log(t) * 100),) + _preference(cfg)


def _preference(cfg) -> tuple:
    """Tie-break between configs the model cannot separate: 3 stages, fewer warps, no
    split-k or grouping, larger tiles (fewer programs), larger BK (fewer loop steps)."""
    return (abs(cfg.num_stages - 3), cfg.num_warps, cfg.split_k, cfg.group_m, -cfg.block_n,
            -cfg.block_m, -cfg.block_k, cfg.strategy)


def bucket_of(num_tokens: int) -> int:
    """Predictions are made (and cached) per power-of-two token count."""
    return 1 << max(0, round(math.log2(max(1, num_tokens))))


def predict_config(device: str, op: str, shape: tuple, dtype: str, num_tokens: int,
                   strategy: str = STRATEGY_AUTO) -> dict | None:
    """The predicted config dict for a device key, or None (unknown device, unsupported op)."""
    if not op.startswith("triton."):
        return None  # the model describes the Triton kernels' tiling only
    try:
        prof = get_profile(device)
    except UnknownDeviceError:
        return None
    if dtype not in ("bf16", "fp16", "fp8", "int8") or (dtype == "fp8" and not prof.has_fp8):
        return None
    cfg = _cached_prediction(prof.key, tuple(shape), dtype, bucket_of(num_tokens), strategy)
    return None if cfg is None else dict(cfg)


@functools.lru_cache(maxsize=1024)
def _cached_prediction(device: str, shape: tuple, dtype: str, bucket: int, strategy: str):
    best = predict_best(get_profile(device), shape, dtype, bucket, strategy)
    return None if best is None else tuple(best[0].to_dict().items())


def predicted_entries(prof: DeviceProfile, shape: tuple, dtype: str, batches, strategy: str = STRATEGY_AUTO,
                      fit_mode: str = "analytic") -> dict[int, dict]:
    """Table entries ("origin": "predicted") for `batches` on `prof`, with the model's
    time and its fraction of the datasheet roofline floor (for --plot, marked as model),
    and how the shared-memory fit was established ("fit": "aot" with the compiled kernels'
    `shared_bytes`, or "analytic" with the estimate)."""
    from moecc.tuning.store import now_utc

    e, n, k, top_k = shape
    entries = {}
    for m in batches:
        best = predict_best(prof, tuple(shape), dtype, m, strategy, fit_mode)
        if best is None:
            continue
        cfg, t = best
        u = expected_active_experts(m, e, top_k)
        bw = prof.memory_bandwidth_gbps * 1e9
        peak = prof.peak(dtype if dtype in prof.peak_tflops else "bf16") * 1e12
        floor = floor_seconds(*moe_layer_traffic(m, top_k, n, k, u, dtype_bytes(dtype), activation_bytes=2),
                              bw, peak)
        fit = check_fit(cfg, tuple(shape), dtype, prof, fit_mode)  # cached; says how the fit was known
        entries[m] = {"config": cfg.to_dict(), "origin": "predicted", "model_time_us": round(t * 1e6, 3),
                      "fit": fit.method, "shared_bytes": fit.shared_bytes,
                      "floor_us": round(floor * 1e6, 3), "roofline_fraction": round(floor / t, 4),
                      "bandwidth_gbps": prof.memory_bandwidth_gbps, "peak_tflops": peak / 1e12,
                      "rates": "datasheet", "updated": now_utc()}
    return entries
