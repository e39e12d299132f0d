"""A hand-written MoE feed-forward in the gpt-fast (mixtral-moe/model.py) style, for tests.

T = tokens, E = experts, D = hidden, I = expert intermediate, A = activated experts.
Stacked expert weights indexed by the selected expert ids, einsum per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConditionalFeedForward(nn.Module):
    def __init__(self, num_experts: int, dim: int, intermediate: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(num_experts, intermediate, dim) * 0.1)  # gate
        self.w2 = nn.Parameter(torch.randn(num_experts, dim, intermediate) * 0.1)  # down
        self.w3 = nn.Parameter(torch.randn(num_experts, intermediate, dim) * 0.1)  # up

    def forward(self, x: torch.Tensor, expert_indices: torch.Tensor) -> torch.Tensor:
        w1_weights = self.w1[expert_indices]  # [T, A, I, D]
        w3_weights = self.w3[expert_indices]  # [T, A, I, D]
        w2_weights = self.w2[expert_indices]  # [T, A, D, I]
        x1 = F.silu(torch.einsum("ti,taoi -> tao", x, w1_weights))  # [T, A, I]
        x3 = torch.einsum("ti, taoi -> tao", x, w3_weights)  # [T, A, I]
        return torch.einsum("tao, taio -> tai", (x1 * x3), w2_weights)  # [T, A, D]


class MOEFeedForward(nn.Module):
    def __init__(self, num_experts: int = 8, top_k: int = 2, dim: int = 64, intermediate: int = 48,
                 scoring: str = "softmax"):
        super().__init__()
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.cond_ffn = ConditionalFeedForward(num_experts, dim, intermediate)
        self.dim, self.top_k, self.scoring = dim, top_k, scoring

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(-1, self.dim)  # [T, D]
        scores = self.gate(x)  # [T, E]
        if self.scoring == "softmax":
            expert_weights = F.softmax(scores, dim=-1)
        else:  # a router variant moecc does not know: squared ReLU scores
            expert_weights = F.relu(scores) ** 2
        expert_weights, expert_indices = torch.topk(expert_weights, self.top_k, dim=-1)  # [T, A]
        expert_weights = expert_weights / expert_weights.sum(dim=-1, keepdim=True)  # [T, A]
        expert_outs = self.cond_ffn(x, expert_indices)  # [T, A, D]
        return torch.einsum("tai,ta -> ti", expert_outs, expert_weights)  # [T, D]


class TinyMoEBlockModel(nn.Module):
    """Norm -> MoE -> residual, twice: enough structure to find two layers in one graph."""

    def __init__(self, scoring: str = "softmax"):
        super().__init__()
        self.norms = nn.ModuleList([nn.LayerNorm(64) for _ in range(2)])
        self.moes = nn.ModuleList([MOEFeedForward(scoring=scoring) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, S, D]
        for norm, moe in zip(self.norms, self.moes):
            x = x + moe(norm(x)).view_as(x)
        return x
