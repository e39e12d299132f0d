"""The tables shipped in moecc/tuning_tables: readable, keyed right, within the GPU's limits."""

from __future__ import annotations

import os

from moecc.backends.triton.config import KernelConfig
from moecc.devices import profile
from moecc.shapes import REFERENCE_SHAPES, REFERENCE_TOKEN_COUNTS
from moecc.tuning.keys import parse_filename
from moecc.tuning.lookup import packaged_dir
from moecc.tuning.search import shared_memory_bytes, shared_memory_lower_bound
from moecc.tuning.store import read_table


def test_packaged_tables_cover_consumer_gpus_and_fit():
    folder = packaged_dir()
    names = [n for n in os.listdir(folder) if n.endswith(".json")]
    assert all(parse_filename(n) is not None for n in names), names
    assert not [n for n in os.listdir(folder) if n.endswith((".lock", ".jsonl", ".tmp"))]
    shapes = {(s.num_experts, s.intermediate_size, s.hidden_size, s.top_k) for s in REFERENCE_SHAPES}
    for device in ("rtx4090", "rtx3090"):
        keys = [parse_filename(n) for n in names if n.startswith(device + "__")]
        assert {k.shape for k in keys} == shapes
        prof = profile(device)
        for k in keys:
            table = read_table(folder / k.filename)
            assert table["key"] == k and sorted(table["entries"]) == list(REFERENCE_TOKEN_COUNTS)
            for m, e in table["entries"].items():
                cfg = KernelConfig.from_dict(e["config"])
                assert e["origin"] == "predicted"  # nobody tuned these on the GPU
                limit = prof.max_shared_memory_per_block
                assert shared_memory_lower_bound(cfg, k.dtype) <= limit
                if e["fit"] == "aot":  # compiled for the arch: the real bytes fit
                    assert 0 < e["shared_bytes"] <= limit
                else:
                    assert shared_memory_bytes(cfg, k.dtype) <= limit
    assert not [n for n in names if n.startswith(("h100", "h200"))]  # not fabricated
