"""Launch configurations for the Triton MoE kernels: the one shape the tuning database fills.

A `KernelConfig` is everything a launch needs besides the tensors. Strategies:
    "decode":  few tokens, memory-bound; stream each active expert's weights once and
               fill the GPU by splitting N (first GEMM) and K (second GEMM).
    "prefill": many tokens, compute-bound; tensor-core tiles over expert-aligned blocks.

`moecc.tuning` stores configs as `KernelConfig.to_dict()` and rebuilds them with
`KernelConfig.from_dict`; keys it does not know are an error, not silently dropped.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from moecc.config_dicts import strict_from_dict

STRATEGIES = ("decode", "prefill")


@dataclass(frozen=True)
class KernelConfig:
    block_m: int = 16
    block_n: int = 64
    block_k: int = 64
    group_m: int = 1
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    strategy: str = "prefill"

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"{name}={v} must be a power of two")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy {self.strategy!r} is not one of {STRATEGIES}")
        if self.num_warps not in (1, 2, 4, 8, 16) or self.num_stages < 1 or self.split_k < 1 or self.group_m < 1:
            raise ValueError(f"invalid launch parameters in {self}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "KernelConfig":
        return strict_from_dict(KernelConfig, d, "kernel config")
