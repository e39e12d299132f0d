"""Routing statistics of the shipped trained models on a small slice of the held-out text,
recorded once per test session (tests/test_routing_stats.py, tests/test_placement.py)."""

from __future__ import annotations

import functools

MAX_BYTES = 4096  # per domain: 16 windows of 256 bytes each of code and English; ~1-3 s per model


@functools.lru_cache(maxsize=None)
def trained_model(name: str):
    from moecc.models import build_model

    return build_model(name)


@functools.lru_cache(maxsize=None)
def trained_stats(name: str):
    from moecc.eval_data import domain_windows, load_texts
    from moecc.models import HELDOUT_DIR
    from moecc.routing_stats import record_routing

    windows = domain_windows(load_texts(HELDOUT_DIR), 256, MAX_BYTES)
    batches = [w[i: i + 8] for w in windows.values() for i in range(0, len(w), 8)]
    return record_routing(trained_model(name), batches, data="heldout sample")
