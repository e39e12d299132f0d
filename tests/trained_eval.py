"""Shared by the trained-model tests: the accuracy bounds of issue 9, written down once.

fp32, eager vs compiled on held-out text: top-1 agreement >= 99.9%, mean KL(eager ||
compiled) <= 1e-5 nats per byte, every number finite (NaN never passes), every MoE layer
captured, and at most 1% of tokens change their top-k expert set (exact ties aside, fp32
kernels reorder sums only, which moves router inputs by ~1e-6).
"""

from __future__ import annotations

import math

MIN_TOP1 = 0.999
MAX_KL = 1e-5
MAX_FLIP_RATE = 0.01


def assert_matches_eager(result, kernel_backend: str) -> None:
    assert result.finite, result.to_json()
    assert result.captured_layers == result.moe_layers > 0, (result.captured_layers, result.moe_layers)
    assert result.kernels.get(kernel_backend) == result.moe_layers, result.kernels  # really ran those kernels
    for d in list(result.domains.values()) + [result.overall]:
        assert math.isfinite(d.kl) and d.kl <= MAX_KL, (d.domain, d.kl)
        assert d.top1_agreement >= MIN_TOP1, (d.domain, d.top1_agreement)
    for layer in result.layers:
        assert layer.flip_rate <= MAX_FLIP_RATE, (layer.layer, layer.flip_rate)
