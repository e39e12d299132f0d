"""Fixtures for the pytest-benchmark comparisons (bench/test_moe_layer_bench.py).

Run on a GPU machine from the repository root:

    PYTHONPATH=. pytest bench/test_moe_layer_bench.py --benchmark-columns=median,rounds \
        --benchmark-json=$OUT/pytest-bench.json

Every benchmark here needs CUDA and is skipped without it. Weights are generated once per
shape (only one shape's weights are alive at a time: DeepSeek-V3's are 22.5 GB), each
implementation is checked against the reference on a small M before any timing, and each
token count gets a fresh random input. `moecc bench` runs the same comparison with its own
timer and writes the tables; this file exists so the comparison also lives in
pytest-benchmark's history and tooling.
"""

from __future__ import annotations

import pytest
import torch

from moecc.shapes import MoEShape

from . import implementations as impls
from .kernel_sweep import compare, tolerance
from .roofline import measure_ceilings
from .workload import layer_spec, random_hidden, random_weights

CHECK_TOKENS = 64
DTYPE = torch.bfloat16


@pytest.fixture(scope="session")
def cuda_device() -> torch.device:
    if not torch.cuda.is_available():
        pytest.skip("GPU benchmark: needs a CUDA device")
    return torch.device("cuda")


@pytest.fixture(scope="session")
def ceilings(cuda_device):
    """Copy bandwidth and bf16 matmul rate, measured once at the start of the session."""
    return measure_ceilings(cuda_device, DTYPE)


class ShapeCache:
    """Weights, spec and checked implementations of the most recent shape only."""

    def __init__(self, device: torch.device):
        self.device = device
        self.shape: MoEShape | None = None
        self.weights = self.spec = None
        self.layers: dict[str, impls.Layer] = {}
        self.failures: dict[str, str] = {}

    def get(self, shape: MoEShape, seed: int = 0):
        if shape != self.shape:
            self.layers, self.failures, self.weights = {}, {}, None
            torch._dynamo.reset()
            torch.cuda.empty_cache()
            self.shape, self.spec = shape, layer_spec(shape)
            self.weights = random_weights(self.spec, DTYPE, self.device, seed=seed)
        return self.weights, self.spec

    def layer(self, shape: MoEShape, name: str) -> impls.Layer:
        """The implementation, built and checked against the reference once per shape."""
        weights, spec = self.get(shape)
        if name in self.failures:
            pytest.skip(self.failures[name])
        if name not in self.layers:
            try:
                layer = impls.build(name, weights, spec)
            except impls.Unavailable as exc:
                self.failures[name] = f"{name} unavailable: {exc}"
                pytest.skip(self.failures[name])
            hidden = random_hidden(CHECK_TOKENS, shape.hidden_size, DTYPE, self.device, seed=1)
            if layer.prepare:
                layer.prepare(hidden)
            ref = impls.build("reference", weights, spec)(hidden)
            check = compare(layer(hidden), ref, tolerance(DTYPE))
            if not check["ok"]:
                self.failures[name] = f"{name} disagrees with the reference: {check}"
                pytest.fail(self.failures[name])
            self.layers[name] = layer
        return self.layers[name]


@pytest.fixture(scope="session")
def shape_cache(cuda_device) -> ShapeCache:
    return ShapeCache(cuda_device)
