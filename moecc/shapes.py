"""Reference MoE shapes and token counts used by benchmarks and tuning (ARCHITECTURE.md).

E = routed experts, top_k = experts per token, K = hidden size, N = expert intermediate.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MoEShape:
    name: str
    num_experts: int  # E
    top_k: int
    hidden_size: int  # K
    intermediate_size: int  # N

    @property
    def key(self) -> str:
        return f"E{self.num_experts}_N{self.intermediate_size}_K{self.hidden_size}_top{self.top_k}"


REFERENCE_SHAPES: tuple[MoEShape, ...] = (
    MoEShape("mixtral-8x7b", 8, 2, 4096, 14336),
    MoEShape("qwen3-30b-a3b", 128, 8, 2048, 768),
    MoEShape("deepseek-v2-lite", 64, 6, 2048, 1408),
    MoEShape("deepseek-v3", 256, 8, 7168, 2048),
)
REFERENCE_TOKEN_COUNTS: tuple[int, ...] = (1, 4, 16, 64, 256, 1024, 4096)


def shape_by_name(name: str) -> MoEShape:
    for s in REFERENCE_SHAPES:
        if s.name == name:
            return s
    raise KeyError(f"unknown reference shape {name!r}; known: {[s.name for s in REFERENCE_SHAPES]}")
