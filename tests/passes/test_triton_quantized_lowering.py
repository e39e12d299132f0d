"""lower_kernels with kernel_backend="triton" on quantised layers: weight-only int8 / int4 /
fp8 stacks whose scale groups fit a BLOCK_K step bind to moecc::moe_layer_triton; int8
activations and groups of fewer than 16 values stay on the reference op with a note.

Only the binding is checked here (Triton's availability is stubbed, so no GPU and no
interpreter are needed); the kernels' numerics are tests/backends/test_triton_quantized.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from graph_builders import context, lowered_layer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "backends"))  # layer_factory

from moecc.passes import lower_kernels  # noqa: E402


@pytest.fixture
def triton_usable(monkeypatch):
    monkeypatch.setattr(lower_kernels, "backend_available", lambda name, device: True)


def _bind(precision):
    ctx, *_ = lowered_layer(precision, k=64, n=32, kernel_backend="triton")  # both passes see the same options
    result = lower_kernels.run(context(ctx.gm, [], kernel_backend="triton"))
    return result, ctx.moe_nodes()[0].target


@pytest.mark.parametrize("precision", ["int8", {"format": "int4", "group_size": 32}, "fp8"])
def test_weight_only_layers_bind_to_triton(triton_usable, precision):
    result, target = _bind(precision)
    assert target is torch.ops.moecc.moe_layer_triton.default
    assert result.counters["triton"] == 1, result.notes


@pytest.mark.parametrize("precision,why", [
    ({"format": "int4", "group_size": 8}, "group must be a multiple of 16"),
    ("w8a8", "the Triton kernels are weight-only"),
])
def test_unfit_layers_stay_on_the_reference_with_a_note(triton_usable, precision, why):
    result, target = _bind(precision)
    assert target is torch.ops.moecc.moe_layer.default
    assert result.counters["reference"] == 1
    assert any(why in n and "kept on the reference kernels" in n for n in result.notes), result.notes
