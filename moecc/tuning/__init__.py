"""The per-GPU tuning database: launch configurations by device, op, shape, dtype, tokens.

Public API (kernel code calls only this):

    from moecc.tuning import lookup_config
    res = lookup_config("triton.moe", (E, N, K, top_k), "bf16", num_tokens,
                        default=lambda: KernelConfig().to_dict())
    cfg = KernelConfig.from_dict(res.config)   # res.source: user|packaged|predicted|default

Modules: keys.py (what a table is keyed by, file names), store.py (file format, atomic
and locked writes), lookup.py (lookup order, caches, the one warning), predict.py
(configurations predicted from a device profile), search.py (candidate configurations
and their pruning per device), tune.py (timing on a GPU), plot.py (roofline plot).
Importing this package imports neither torch nor triton.
"""

from __future__ import annotations

import functools
from typing import Callable

from moecc.tuning.keys import STRATEGY_AUTO, TableKey
from moecc.tuning.lookup import (
    CorruptTuningFileWarning,
    LookupResult,
    TuningDatabase,
    TuningFallbackWarning,
)

__all__ = [
    "lookup_config", "LookupResult", "TableKey", "TuningDatabase", "TuningFallbackWarning",
    "CorruptTuningFileWarning", "process_database",
]


@functools.lru_cache(maxsize=1)
def process_database() -> TuningDatabase:
    """The database `lookup_config` uses: created on first use, one per process.

    It reads its folders from the environment on every call; it holds only caches and the
    set of keys already warned about. Tests call `process_database.cache_clear()`.
    """
    return TuningDatabase()


def lookup_config(
    op: str,
    shape: tuple[int, int, int, int],
    dtype: str,
    num_tokens: int,
    device_key: str | None = None,
    *,
    default: Callable[[], dict],
    strategy: str = STRATEGY_AUTO,
) -> "LookupResult":
    """The launch configuration for `op` ("triton.moe", "tvm.moe") at this shape and size.

    shape: (E, N, K, top_k). dtype: "bf16", "fp16", "fp8", ... num_tokens: M, the tokens in
    the batch (the nearest tuned bucket is used). device_key: a normalised key (see
    moecc.devices); None means the current CUDA device, or "cpu" without one.
    default: called only when no table and no prediction exists.
    strategy: "auto" (the table of the fastest over all strategies) or "decode"/"prefill"
    for a table tuned for one strategy only.
    """
    return process_database().lookup(op, shape, dtype, num_tokens, device_key, default=default,
                                      strategy=strategy)
