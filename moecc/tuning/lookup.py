"""Finding the launch configuration for one (op, shape, dtype, token count) on one GPU.

Order (first that has a table for the key wins; within a table the nearest token-count
bucket is used):
    1. "user":      $MOECC_TUNING_DIR (if set), then the default cache folder
                    ($XDG_CACHE_HOME or ~/.cache)/moecc/tuning, where `moecc autotune`
                    writes by default;
    2. "packaged":  moecc/tuning_tables/*.json shipped in the package;
    3. "predicted": a configuration predicted from the device profile (predict.py);
    4. "default":   the caller's `default()`.
Within one folder a table for the installed compiler version is preferred; failing that
the table for the newest other version of the same key is used (configurations carry
over between compiler versions far better than a default does).

Falling back to 3 or 4, or using a table whose entries were predicted, emits exactly one
`TuningFallbackWarning` per database per key (not per token count) naming the command
that tunes it. On "cpu" (nothing to tune) the note goes to logging at INFO instead.

Cost of a repeated call: a stat of each folder and of the chosen file. Folder listings
are cached by the folder's mtime (os.replace of a new table changes it), parsed tables by
(mtime_ns, size) of the file. Corrupt files are reported once per (file, mtime) and
skipped.

Nearest bucket: smallest |log2(M) - log2(bucket)|; a tie goes to the larger bucket.
Buckets are geometric (1, 4, 16, ...), so distance is measured on that scale.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from moecc.tuning.keys import STRATEGY_AUTO, TableKey, compiler_of, compiler_version, parse_filename
from moecc.tuning.store import CorruptTableError, read_table

log = logging.getLogger("moecc.tuning")

SOURCES = ("user", "packaged", "predicted", "default")
ENV_DIR = "MOECC_TUNING_DIR"


class TuningFallbackWarning(UserWarning):
    """No tuned table for this key on this GPU: a predicted or default config is used."""


class CorruptTuningFileWarning(UserWarning):
    """A tuning file could not be read and was skipped."""


@dataclass(frozen=True)
class LookupResult:
    """A launch configuration and where it came from.

    config:     KernelConfig.to_dict()-style dict (a fresh copy; the caller may mutate it).
    source:     "user" | "packaged" | "predicted" | "default" (the tier that answered).
    path:       the table file, or None for "predicted" / "default".
    num_tokens: the token-count bucket used (None for "default").
    predicted:  True when the config was predicted rather than measured (source
                "predicted", or a table entry whose origin is "predicted").
    device_key: the normalised device key the lookup was for.
    """

    config: dict
    source: str
    path: str | None = None
    num_tokens: int | None = None
    predicted: bool = False
    device_key: str = ""


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "moecc" / "tuning"


def user_dirs() -> list[Path]:
    """The user's folders in lookup order, read from the environment at each call."""
    dirs = []
    env = os.environ.get(ENV_DIR)
    if env:
        dirs.append(Path(env).expanduser())
    dirs.append(default_cache_dir())
    return dirs


def packaged_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "tuning_tables"


def nearest_bucket(buckets: Iterable[int], num_tokens: int) -> int:
    """The bucket nearest to num_tokens on a log2 scale; ties to the larger bucket."""
    target = math.log2(max(1, num_tokens))
    return min(buckets, key=lambda b: (abs(math.log2(b) - target), -b))


class TuningDatabase:
    """Caches and warning memory for lookups; `lookup_config` uses one per process.

    `folders` overrides the tiers for tests and tools: a list of (source, folder).
    When None, the folders are re-read from the environment on every call.
    """

    def __init__(self, folders: list[tuple[str, Path]] | None = None,
                 predictor: Callable | None = None) -> None:
        self._folders = folders
        self._predictor = predictor
        self._lock = threading.Lock()
        self._listings: dict[Path, tuple[int, dict]] = {}  # folder -> (mtime_ns, {stem: [(ver, path)]})
        self._tables: dict[Path, tuple[tuple[int, int], dict | None]] = {}  # file -> (stat, table|None)
        self._warned: set = set()

    # -- tiers -----------------------------------------------------------------
    def folders(self) -> list[tuple[str, Path]]:
        if self._folders is not None:
            return list(self._folders)
        return [("user", d) for d in user_dirs()] + [("packaged", packaged_dir())]

    def _listing(self, folder: Path) -> dict:
        try:
            mtime = folder.stat().st_mtime_ns
        except OSError:
            return {}
        cached = self._listings.get(folder)
        if cached and cached[0] == mtime:
            return cached[1]
        index: dict[str, list[tuple[str, Path]]] = {}
        try:
            names = os.listdir(folder)
        except OSError:
            names = []
        for name in names:
            key = parse_filename(name)
            if key is not None:
                index.setdefault(key.stem, []).append((key.version, folder / name))
        for versions in index.values():
            versions.sort(key=lambda vp: _version_tuple(vp[0]), reverse=True)
        self._listings[folder] = (mtime, index)
        return index

    def _table(self, path: Path) -> dict | None:
        try:
            st = path.stat()
        except OSError:
            return None
        sig = (st.st_mtime_ns, st.st_size)
        cached = self._tables.get(path)
        if cached and cached[0] == sig:
            return cached[1]
        try:
            table = read_table(path)
        except CorruptTableError as exc:
            warnings.warn(str(exc), CorruptTuningFileWarning, stacklevel=4)
            table = None
        self._tables[path] = (sig, table)
        return table

    def find_table(self, key: TableKey) -> Iterable[tuple[str, Path, dict]]:
        """(source, path, table) for every readable table of `key`, best first."""
        for source, folder in self.folders():
            versions = self._listing(Path(folder)).get(key.stem, [])
            ordered = sorted(versions, key=lambda vp: vp[0] != key.version)  # exact version first
            for _, path in ordered:
                table = self._table(path)
                if table is not None and table["entries"]:
                    yield source, path, table

    # -- the lookup --------------------------------------------------------------
    def lookup(self, op: str, shape: tuple, dtype: str, num_tokens: int, device_key: str | None,
               *, default: Callable[[], dict], strategy: str = STRATEGY_AUTO) -> LookupResult:
        device = device_key or current_device_key()
        shape = tuple(int(v) for v in shape)
        key = TableKey(device, op, strategy, shape, dtype, compiler_version(compiler_of(op)))
        with self._lock:
            for source, path, table in self.find_table(key):
                bucket = nearest_bucket(table["entries"], num_tokens)
                entry = table["entries"][bucket]
                predicted = entry["origin"] == "predicted"
                if predicted:
                    self._warn_once(key, f"its {source} table {path.name} holds predicted, not measured,"
                                         " configurations")
                return LookupResult(dict(entry["config"]), source, str(path), bucket, predicted, device)
            predicted_cfg = self._predict(key, num_tokens)
            if predicted_cfg is not None:
                self._warn_once(key, "no tuned table exists; using a configuration predicted from the"
                                     " device profile")
                return LookupResult(predicted_cfg, "predicted", None, num_tokens, True, device)
            self._warn_once(key, "no tuned table exists and the device has no profile; using the default"
                                 " configuration")
            return LookupResult(dict(default()), "default", None, None, False, device)

    def _predict(self, key: TableKey, num_tokens: int) -> dict | None:
        predictor = self._predictor
        if predictor is None:
            from moecc.tuning.predict import predict_config as predictor
        try:
            return predictor(key.device, key.op, key.shape, key.dtype, num_tokens, strategy=key.strategy)
        except Exception as exc:  # a prediction must never break compilation
            log.debug("prediction failed for %s: %r", key, exc)
            return None

    def _warn_once(self, key: TableKey, why: str) -> None:
        ident = (key.device, key.op, key.strategy, key.shape, key.dtype)
        if ident in self._warned:
            return
        self._warned.add(ident)
        if key.device == "cpu":
            log.info("moecc tuning on cpu: %s for %s %s %s (tuning needs a CUDA GPU)",
                     why, key.op, key.shape_tag, key.dtype)
            return
        warnings.warn(
            f"moecc: {key.op} {key.shape_tag} {key.dtype} on {key.device}: {why}. "
            f"To tune it on this GPU run: {key.tune_command()}",
            TuningFallbackWarning, stacklevel=4,
        )


def _version_tuple(version: str) -> tuple:
    parts = []
    for p in version.replace("+", ".").replace("-", ".").split("."):
        parts.append((0, int(p), "") if p.isdigit() else (-1, 0, p))
    return tuple(parts)


_DEVICE_KEYS: dict[int, str] = {}


def current_device_key() -> str:
    """Normalised key of the current CUDA device, or "cpu" when there is none.

    Cached per device index (the properties of a device do not change in a process).
    """
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    index = torch.cuda.current_device()
    if index not in _DEVICE_KEYS:
        from moecc.devices import current_device_key as key_of

        _DEVICE_KEYS[index] = key_of(index)
    return _DEVICE_KEYS[index]
