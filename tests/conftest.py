"""Test-suite wide markers and fixtures.

Markers (pyproject.toml): `gpu` tests skip without CUDA, `tvm` tests skip without
apache-tvm, `slow` tests run unless deselected with -m "not slow".
"""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    has_tvm = importlib.util.find_spec("tvm") is not None
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "tvm" in item.keywords and not has_tvm:
            item.add_marker(pytest.mark.skip(reason="needs apache-tvm"))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Every test compiles from scratch: no graphs or guards leak between tests."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
