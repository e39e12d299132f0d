"""Launch configurations without tuning: a documented rule per strategy.

`heuristic_config` is the default the tuning database falls back to (moecc.tuning
calls it through `default=`); it is also what `moe_layer` uses when no table exists.
Inputs are the shape (E, N, K, top_k), the token count T, the dtype name and optionally
a device profile (moecc.devices); without a profile it assumes 108 SMs and the smallest
shared-memory limit of the known GPUs (99 KiB), so its choice runs anywhere.

Strategy: "decode" while the expected tokens per active expert is at most 8 (a 16-row
block is then at least half padding and the layer is bound by weight bandwidth),
"prefill" above. Expected active experts under uniform routing: U = E * (1 - (1 - k/E)^T).

decode:  BLOCK_M 16 (the smallest tl.dot tile); BLOCK_K 128 (64 for fp32) so each weight
         row segment is 256 contiguous bytes; BLOCK_N 64, or 32 when U * N/64 programs
         would not fill the SMs; split-K of the second GEMM (its reduction runs over N)
         doubled until U * K/BLOCK_N * split_k reaches two waves, keeping at least two
         BLOCK_K steps per split, at most 8.
prefill: BLOCK_M by tokens per active expert (<=16 -> 16, <=48 -> 32, <=128 -> 64,
         else 128); BLOCK_N 128 from BLOCK_M 64 on, else 64; BLOCK_K 64 (32 for fp32);
         GROUP_M 8 for L2 reuse; 8 warps for 128x128 accumulators, else 4; split_k 1.
Both:    the deepest pipeline (num_stages 2..4) whose first-GEMM tiles,
         stages * (BM*BK + 2*BN*BK) * bytes, fit the shared-memory limit. Triton keeps
         num_stages - 1 tile sets in shared memory, so this leaves one set of headroom
         for its epilogue layout conversions (and agrees with moecc.tuning's analytic
         pruning). If even two stages do not fit, BLOCK_N and then BLOCK_M are halved.
Quantised weights (weight_formats.py): BLOCK_K is capped at `max_block_k`, the largest
tile that stays inside one scale group (a 32-value int4 group: 32); the shared-memory
estimate keeps the compute dtype's size for the weight tiles (an upper bound: packed
tiles are smaller), and aot.py checks the compiled kernels' real use.
These are starting points, not measured optima; `moecc autotune` replaces them.
"""

from __future__ import annotations

from typing import Optional

from moecc.backends.triton.config import KernelConfig
from moecc.devices import DeviceProfile

DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
DEFAULT_NUM_SMS = 108
DEFAULT_SHARED_LIMIT = 99 * 1024  # smallest max_shared_memory_per_block among moecc.devices


def expected_active_experts(num_experts: int, top_k: int, num_tokens: int) -> float:
    """U = E * (1 - (1 - k/E)^T), clamped to [1, min(E, T*k)]."""
    u = num_experts * (1.0 - (1.0 - top_k / num_experts) ** max(num_tokens, 0))
    return max(1.0, min(u, float(num_experts), float(max(num_tokens, 1) * top_k)))


def choose_strategy(num_experts: int, top_k: int, num_tokens: int) -> str:
    per_expert = max(num_tokens, 1) * top_k / expected_active_experts(num_experts, top_k, num_tokens)
    return "decode" if per_expert <= 8 else "prefill"


def _pow2_at_least(x: float) -> int:
    p = 1
    while p < x:
        p *= 2
    return p


def _stages(bm: int, bn: int, bk: int, elem_bytes: int, limit: int) -> int:
    """Deepest pipeline in 4..2 within the limit; 0 when not even 2 stages fit."""
    per_stage = (bm * bk + 2 * bn * bk) * elem_bytes
    for stages in (4, 3, 2):
        if stages * per_stage <= limit:
            return stages
    return 0


def heuristic_config(
    num_experts: int,  # E (routed; shared experts add one block per token block)
    intermediate: int,  # N
    hidden: int,  # K
    top_k: int,
    num_tokens: int,  # T
    dtype: str,  # "fp32" | "fp16" | "bf16"
    profile: Optional[DeviceProfile] = None,
    *,
    max_block_k: Optional[int] = None,  # quantised weights: the largest BLOCK_K inside one scale group
) -> KernelConfig:
    """A reasonable KernelConfig for this shape and token count (rules in the module docstring)."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"no heuristic for dtype {dtype!r}; known: {sorted(DTYPE_BYTES)}")
    if max_block_k is not None and (max_block_k < 16 or max_block_k & (max_block_k - 1)):
        raise ValueError(f"max_block_k={max_block_k} must be a power of two >= 16 (the scale group's limit; "
                         "groups of fewer than 16 values cannot run on the Triton kernels)")
    cap = max_block_k or 1 << 30
    elem = DTYPE_BYTES[dtype]
    sms = profile.num_sms if profile else DEFAULT_NUM_SMS
    limit = profile.max_shared_memory_per_block if profile else DEFAULT_SHARED_LIMIT
    u = expected_active_experts(num_experts, top_k, num_tokens)
    strategy = choose_strategy(num_experts, top_k, num_tokens)

    if strategy == "decode":
        bm, bk = 16, (64 if elem == 4 else 128)
        bk = min(bk, max(16, _pow2_at_least(min(intermediate, hidden))), cap)
        bn = 64 if u * -(-intermediate // 64) >= sms else 32
        programs = u * -(-hidden // bn)
        max_split = max(1, -(-intermediate // bk) // 2)
        split = 1
        while programs * split < 2 * sms and split * 2 <= min(8, max_split):
            split *= 2
        while _stages(bm, bn, bk, elem, limit) == 0 and bk > 16:
            bk //= 2
        return KernelConfig(bm, bn, bk, 1, split, 4, _stages(bm, bn, bk, elem, limit), "decode")

    per_expert = max(num_tokens, 1) * top_k / u
    bm = 16 if per_expert <= 16 else 32 if per_expert <= 48 else 64 if per_expert <= 128 else 128
    bn = 128 if bm >= 64 else 64
    bk = min(32 if elem == 4 else 64, cap)
    while _stages(bm, bn, bk, elem, limit) == 0 and max(bm, bn) > 16:
        if bn >= bm:
            bn //= 2
        else:
            bm //= 2
    warps = 8 if bm * bn >= 128 * 128 else 4
    return KernelConfig(bm, bn, bk, 8, 1, warps, _stages(bm, bn, bk, elem, limit), "prefill")
