"""Numerical tolerances by dtype: the one table kernels, capture and tests compare with.

(rtol, atol) for torch.testing.assert_close-style checks of an MoE layer's output
against the reference. Why these values:
  fp32: accumulation order differs between kernels (split-K, atomics): ~1e-6 relative
        per op, a few ops deep -> 1e-4 relative, 1e-5 absolute.
  fp16: 10-bit mantissa (~5e-4 per rounding); intermediates rounded twice -> 1e-2 / 1e-3.
  bf16: 7-bit mantissa (~4e-3 per rounding); the activation is rounded to bf16 between
        the two GEMMs -> 2e-2 relative, 2e-2 absolute on O(1) outputs.
NaN never passes: `check_close` fails on any NaN or inf in the actual output.
"""

from __future__ import annotations

import torch

TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-2, 1e-3),
    torch.bfloat16: (2e-2, 2e-2),
}

# Low-precision routing can flip a near-tie between two experts; such a token then
# differs by a whole expert's contribution. Capture verification and model-level tests
# allow this fraction of tokens to disagree in fp16/bf16 (never in fp32).
ROUTING_FLIP_FRACTION: dict[torch.dtype, float] = {
    torch.float32: 0.0,
    torch.float16: 0.05,
    torch.bfloat16: 0.05,
}


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    if dtype not in TOLERANCES:
        raise KeyError(f"no tolerance defined for {dtype}; known: {list(TOLERANCES)}")
    return TOLERANCES[dtype]


def check_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """assert_close with the dtype's tolerance; NaN/inf in `actual` always fail."""
    if not torch.isfinite(actual).all():
        raise AssertionError("output contains NaN or inf")
    rtol, atol = tolerance(dtype or expected.dtype)
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol)


def token_mismatch_fraction(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> float:
    """Fraction of tokens (rows of [T, K]) outside the dtype's tolerance; NaN counts."""
    rtol, atol = tolerance(dtype)
    a, e = actual.float().reshape(-1, actual.shape[-1]), expected.float().reshape(-1, expected.shape[-1])
    scale = e.abs().amax(dim=-1, keepdim=True).clamp_min(1e-6)  # per-token magnitude
    bad = ((a - e).abs() > atol * scale + rtol * e.abs() + atol).any(dim=-1) | ~torch.isfinite(a).all(dim=-1)
    return bad.float().mean().item() if bad.numel() else 0.0
