"""Table-building helpers shared by the tuning tests (plain functions, no state)."""

from __future__ import annotations

from moecc.tuning.keys import TableKey, compiler_version
from moecc.tuning.store import merge_entries

SHAPE = (128, 768, 2048, 8)


def entry(block_m: int, origin: str = "tuned", time_us: float | None = 10.0) -> dict:
    e = {"config": {"block_m": block_m, "block_n": 64, "block_k": 64, "group_m": 1, "split_k": 1,
                    "num_warps": 4, "num_stages": 3, "strategy": "prefill"}, "origin": origin}
    if time_us is not None:
        e["time_us"] = time_us
    return e


def write(folder, key: TableKey, entries: dict) -> str:
    path = folder / key.filename
    merge_entries(path, key, entries)
    return str(path)


def key_for(device="h100_sxm", version=None, shape=SHAPE, op="triton.moe", dtype="bf16") -> TableKey:
    return TableKey(device, op, "auto", shape, dtype, version or compiler_version("triton"))
