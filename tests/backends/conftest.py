"""Fixtures shared by the kernel-backend tests."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="module")
def fresh_tvm_cache(tmp_path_factory):
    """A fresh on-disk TVM module cache for one test module (the in-process cache is cleared too)."""
    from moecc.backends.tvm.cache import load_kernels

    old = os.environ.get("MOECC_CACHE_DIR")
    os.environ["MOECC_CACHE_DIR"] = str(tmp_path_factory.mktemp("moecc_cache"))
    load_kernels.cache_clear()
    yield
    load_kernels.cache_clear()
    if old is None:
        os.environ.pop("MOECC_CACHE_DIR", None)
    else:
        os.environ["MOECC_CACHE_DIR"] = old
