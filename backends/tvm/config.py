"""Schedule parameters of the TVM MoE kernels, and where they come from.

A `TVMKernelConfig` is everything a kernel build needs besides the layer's shape: tile
sizes for the two grouped GEMMs and the combine. It is part of the compiled module's cache
key, so a different configuration is a different module (never a silent reuse).

Source of truth: the tuning database, op key "tvm.moe" (`moecc.tuning.lookup_config`).
Until that module exists in a checkout, `resolve_config` falls back to
`default_config` and says so in the returned `source` ("default (no moecc.tuning)").

Fields (legend in moecc/spec.py; "rows" are (token, expert) assignments sorted by expert):
    block_m   rows per expert block: the token tile height. Every expert's rows are
              padded to a multiple of block_m; pad rows are computed and never combined.
    tile_n    gate/up GEMM: intermediate columns per work item (llvm: per parallel task,
              cuda: threads per CTA, one column each).
    tile_k    down GEMM: hidden columns per work item (same meaning as tile_n).
    vec       llvm: SIMD lanes of the reduction (the reduction axis is contiguous in both
              operands, so it is the one vectorised); must divide K and N.
    red_tile  cuda: reduction chunk staged in shared memory per step (divides K and N).
    prefetch  llvm: software-prefetch each weight row this many elements ahead of the
              reduction (0: none; the hardware prefetchers alone).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, NamedTuple

from moecc.config_dicts import strict_from_dict

TARGET_KINDS = ("llvm", "cuda")
LLVM_ACC_LIMIT = 256  # fp32 values per accumulator array: TVM 0.27 stack-allocates < 1024 bytes


@dataclass(frozen=True)
class TVMKernelConfig:
    block_m: int = 4
    tile_n: int = 2
    tile_k: int = 2
    vec: int = 16
    red_tile: int = 32
    prefetch: int = 0

    def __post_init__(self) -> None:
        for name in ("block_m", "tile_n", "tile_k", "vec", "red_tile"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"TVM kernel config {name}={v!r} must be a positive int")
        if not isinstance(self.prefetch, int) or self.prefetch < 0:
            raise ValueError(f"TVM kernel config prefetch={self.prefetch!r} must be an int >= 0")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "TVMKernelConfig":
        return strict_from_dict(TVMKernelConfig, d, "TVM kernel config")

    def fitted(self, target_kind: str, n: int, k: int) -> "TVMKernelConfig":
        """This config with each tile shrunk to the largest divisor of its dimension.

        Tiles must divide the dimension they tile (the kernels have no remainder code);
        shrinking rather than failing keeps odd test shapes working with any config.
        """
        if target_kind == "llvm":
            vec = _largest_divisor(_gcd(n, k), self.vec)
            tile_n, tile_k = self.tile_n, self.tile_k
            # Register accumulators: block_m * tile_n * vec (gate, and again up) and
            # block_m * tile_k * vec fp32 values per array must stay under LLVM_ACC_LIMIT
            # (kernels_llvm.py says why).
            while self.block_m * tile_n * vec >= LLVM_ACC_LIMIT and (tile_n > 1 or vec > 1):
                tile_n, vec = (tile_n // 2, vec) if tile_n > 1 else (tile_n, vec // 2)
            while self.block_m * tile_k * vec >= LLVM_ACC_LIMIT and tile_k > 1:
                tile_k //= 2
            return dataclasses.replace(
                self,
                tile_n=_largest_divisor(n, tile_n),
                tile_k=_largest_divisor(k, tile_k),
                vec=_largest_divisor(_gcd(n, k), vec),
            )
        return dataclasses.replace(
            self,
            tile_n=_largest_divisor(n, self.tile_n),
            tile_k=_largest_divisor(k, self.tile_k),
            red_tile=_largest_divisor(_gcd(n, k), self.red_tile),
        )


def default_config(target_kind: str, num_tokens: int, num_experts: int, top_k: int) -> TVMKernelConfig:
    """A safe, reasonable configuration without tuning data.

    llvm: 16 fp32 lanes (one AVX-512 register; two AVX2 ones), up to 16 vector
    accumulators per task (block_m * 2 * tile_n for gate/up, block_m * tile_k for down),
    block_m from the expected rows per expert (T * top_k / E), see below.
    cuda: 64-thread CTAs, one output column per thread, 32-wide shared-memory chunks.
    """
    rows_per_expert = num_tokens * top_k / max(1, num_experts)
    if target_kind == "llvm":
        # Measured on a 2-core Zen 4 at E=128, N=768, K=2048, top-8 (docs/backends.md):
        # block_m 1 is best while most experts get one row; from about one row per
        # expert on, block_m 2 (an expert's weight tile is re-read from L2, not DRAM,
        # for its later blocks) beat block_m 1, 4 and 8. tile_k 1 beat 2 and 4, and
        # tile_n 8 beat 4 at block_m 1, by 10-25%. Re-measured on a 2-core Xeon (2026-12-02,
        # bf16, M = 1, weights from DRAM, configs alternated call by call): block_m 1 /
        # tile_n 8 3.56 ms, block_m 2 / tile_n 4 3.95 ms; other tiles within noise.
        # Software prefetch 256 weights ahead, same protocol: 3.67 -> 3.35 ms (bf16) and
        # 6.36 -> 6.05 ms (fp32); 128 and 512 were between. Re-measured 2026-12-03 (same
        # Xeon, bf16, fresh routing every call, three layers cycled, configs alternated):
        # tile_n 1 / tile_k 2 / prefetch 1024 weights ahead 2.76-2.86 ms against 3.15-3.30
        # for tile_n 8 / tile_k 1 / 256 at M = 1, 18.6-19.1 against 20.9-21.5 at M = 8;
        # fewer rows per task keep more independent weight streams in flight.
        if rows_per_expert <= 0.5:
            return TVMKernelConfig(block_m=1, tile_n=1, tile_k=2, vec=16, prefetch=1024)
        if rows_per_expert <= 16:
            return TVMKernelConfig(block_m=2, tile_n=4, tile_k=1, vec=16)
        return TVMKernelConfig(block_m=8, tile_n=1, tile_k=1, vec=16)  # prefill: not measured
    if target_kind == "cuda":
        block_m = 4 if rows_per_expert <= 4 else (8 if rows_per_expert <= 8 else 16)
        return TVMKernelConfig(block_m=block_m, tile_n=64, tile_k=64, red_tile=32)
    raise ValueError(f"TVM target kind {target_kind!r} is not one of {TARGET_KINDS}")


class ResolvedConfig(NamedTuple):
    config: TVMKernelConfig
    source: str  # "tuning:<where>", "default (no moecc.tuning)", "user"


def resolve_config(
    config: dict | None,
    *,
    target_kind: str,
    shape: tuple[int, int, int, int],  # (E, N, K, top_k) of the routed experts
    dtype: str,
    num_tokens: int,
    device_key: str,
) -> ResolvedConfig:
    """The user's config if given, else the tuning database's, else the default."""
    e, _, _, top_k = shape

    def default() -> dict:
        return default_config(target_kind, num_tokens, e, top_k).to_dict()

    if config is not None:
        return ResolvedConfig(TVMKernelConfig.from_dict(config), "user")
    lookup: Callable | None
    try:
        from moecc.tuning import lookup_config as lookup
    except ImportError:
        lookup = None
    if lookup is None:
        return ResolvedConfig(TVMKernelConfig.from_dict(default()), "default (no moecc.tuning)")
    found = lookup(op="tvm.moe", shape=shape, dtype=dtype, num_tokens=num_tokens,
                   device_key=device_key, default=default)
    return ResolvedConfig(TVMKernelConfig.from_dict(dict(found.config)), f"tuning:{found.source}")


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def _largest_divisor(n: int, at_most: int) -> int:
    for d in range(min(n, at_most), 0, -1):
        if n % d == 0:
            return d
    return 1
