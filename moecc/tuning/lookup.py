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

Cost of a repeated call: a stat of each folder and of the chosen file (a few
microseconds). Results are memoised per lookup arguments and revalidated by those stats;
folder listings are cached by the folder's mtime (os.replace of a new table changes it),
parsed tables by (mtime_ns, size, inode) of the file. Corrupt files are reported once per
(file, signature) and skipped. Results from the caller's `default()` are not memoised.

Nearest bucket: smallest |log2(M) - log2(bucket)|; a tie goes to the larger bucket.
Buckets are geometric (1, 4, 16, ...), so distance is measured on that scale.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import threading
import warnings
from dataclasses import dataclass
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
    return Path(_user_dir_strings(None, os.environ.get("XDG_CACHE_HOME"))[-1])


def user_dirs() -> list[Path]:
    """The user's folders in lookup order, read from the environment at each call."""
    return [Path(d) for d in _user_dir_strings(os.environ.get(ENV_DIR), os.environ.get("XDG_CACHE_HOME"))]


@functools.lru_cache(maxsize=16)
def _user_dir_strings(env_dir: str | None, xdg_cache: str | None) -> tuple[str, ...]:
    base = xdg_cache or os.path.join(os.path.expanduser("~"), ".cache")
    dirs = [os.path.expanduser(env_dir)] if env_dir else []
    return tuple(dirs) + (os.path.join(base, "moecc", "tuning"),)


@functools.lru_cache(maxsize=1)
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
        self._listings: dict[str, tuple[int, dict]] = {}  # folder -> (mtime_ns, {stem: [(ver, path)]})
        self._tables: dict[str, tuple[tuple, dict | None]] = {}  # file -> (stat signature, table|None)
        self._warned: set = set()
        self._results: dict[tuple, tuple] = {}  # lookup args -> (folder state, result, file sig)

    # -- tiers -----------------------------------------------------------------
    def folders(self) -> list[tuple[str, str]]:
        if self._folders is not None:
            return [(src, str(folder)) for src, folder in self._folders]
        env = _user_dir_strings(os.environ.get(ENV_DIR), os.environ.get("XDG_CACHE_HOME"))
        return [("user", d) for d in env] + [("packaged", str(packaged_dir()))]

    def _listing(self, folder: str, mtime: int | None) -> dict:
        if mtime is None:
            return {}
        cached = self._listings.get(folder)
        if cached and cached[0] == mtime:
            return cached[1]
        index: dict[str, list[tuple[str, str]]] = {}
        try:
            names = os.listdir(folder)
        except OSError:
            names = []
        for name in names:
            key = parse_filename(name)
            if key is not None:
                index.setdefault(key.stem, []).append((key.version, os.path.join(folder, name)))
        for versions in index.values():
            versions.sort(key=lambda vp: _version_tuple(vp[0]), reverse=True)
        self._listings[folder] = (mtime, index)
        return index

    def _table(self, path: str) -> tuple[tuple | None, dict | None]:
        """(file signature, parsed table or None when missing/corrupt)."""
        sig = _file_sig(path)
        if sig is None:
            return None, None
        cached = self._tables.get(path)
        if cached and cached[0] == sig:
            return sig, cached[1]
        try:
            table = read_table(path)
        except CorruptTableError as exc:
            warnings.warn(str(exc), CorruptTuningFileWarning, stacklevel=5)
            table = None
        self._tables[path] = (sig, table)
        return sig, table

    def find_table(self, key: TableKey, folders=None, mtimes=None) -> Iterable[tuple[str, str, tuple, dict]]:
        """(source, path, file signature, table) for every readable table of `key`, best first."""
        folders = folders if folders is not None else self.folders()
        mtimes = mtimes if mtimes is not None else [_dir_mtime(f) for _, f in folders]
        for (source, folder), mtime in zip(folders, mtimes):
            versions = self._listing(folder, mtime).get(key.stem, [])
            ordered = sorted(versions, key=lambda vp: vp[0] != key.version)  # exact version first
            for _, path in ordered:
                sig, table = self._table(path)
                if table is not None and table["entries"]:
                    yield source, path, sig, table

    # -- the lookup --------------------------------------------------------------
    def lookup(self, op: str, shape: tuple, dtype: str, num_tokens: int, device_key: str | None,
               *, default: Callable[[], dict], strategy: str = STRATEGY_AUTO) -> LookupResult:
        device = device_key or current_device_key()
        shape = tuple(int(v) for v in shape)
        with self._lock:
            folders = self.folders()
            mtimes = [_dir_mtime(f) for _, f in folders]
            memo_key = (op, shape, dtype, num_tokens, device, strategy)
            memo = self._results.get(memo_key)
            if memo and memo[0] == (folders, mtimes) and (memo[2] is None or _file_sig(memo[1].path) == memo[2]):
                return dataclasses.replace(memo[1], config=dict(memo[1].config))
            res, file_sig = self._lookup(op, shape, dtype, num_tokens, device, default, strategy, folders, mtimes)
            if res.source != "default":  # default() may differ between callers: never memoised
                self._results[memo_key] = ((folders, mtimes), res, file_sig)
            return dataclasses.replace(res, config=dict(res.config))

    def _lookup(self, op, shape, dtype, num_tokens, device, default, strategy, folders, mtimes):
        key = TableKey(device, op, strategy, shape, dtype, compiler_version(compiler_of(op)))
        for source, path, sig, table in self.find_table(key, folders, mtimes):
            bucket = nearest_bucket(table["entries"], num_tokens)
            entry = table["entries"][bucket]
            predicted = entry["origin"] == "predicted"
            if predicted:
                self._warn_once(key, f"its {source} table {os.path.basename(path)} holds predicted, not"
                                     " measured, configurations")
            return LookupResult(dict(entry["config"]), source, path, bucket, predicted, device), sig
        predicted_cfg = self._predict(key, num_tokens)
        if predicted_cfg is not None:
            self._warn_once(key, "no tuned table exists; using a configuration predicted from the"
                                 " device profile")
            return LookupResult(predicted_cfg, "predicted", None, num_tokens, True, device), None
        self._warn_once(key, "no tuned table exists and no prediction covers this op on this device;"
                             " using the default configuration")
        return LookupResult(dict(default()), "default", None, None, False, device), None

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
        if key.device == "cpu" or key.device.startswith("cpu_"):
            log.info("moecc tuning on %s: %s for %s %s %s (tuning needs a CUDA GPU)",
                     key.device, why, key.op, key.shape_tag, key.dtype)
            return
        if not key.op.startswith("triton."):
            how = "only the Triton kernels can be tuned so far; this op uses its documented defaults"
        else:
            how = f"to tune it, run on that GPU: {key.tune_command()}"
        warnings.warn(
            f"moecc: {key.op} {key.shape_tag} {key.dtype} on {key.device}: {why}. {how}",
            TuningFallbackWarning, stacklevel=4,
        )


def _dir_mtime(folder: str) -> int | None:
    try:
        return os.stat(folder).st_mtime_ns
    except OSError:
        return None


def _file_sig(path: str) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


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
