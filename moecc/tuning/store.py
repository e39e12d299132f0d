"""Reading and writing tuning-table files: validation, atomic writes, locked merges.

File format (JSON, one table per file; the name spells the key, see keys.py):

    {
      "schema": 1,
      "key": {"device": "h100_sxm", "op": "triton.moe", "strategy": "auto",
              "shape": {"E": 128, "N": 768, "K": 2048, "top_k": 8},
              "dtype": "bf16", "compiler": "triton", "compiler_version": "3.6.0"},
      "entries": {
        "16": {"config": {...KernelConfig.to_dict()...},
               "origin": "tuned" | "predicted",
               "time_us": 41.2, "floor_us": 20.3, "roofline_fraction": 0.49,
               "bandwidth_gbps": 3010.0, "peak_tflops": 720.0, "updated": "2026-11-23T19:02:11Z"}
      }
    }

Only "config" and "origin" are required in an entry; the measurements exist for tuned
entries (what `moecc autotune --plot` draws) and may hold predicted estimates otherwise.

Writes: `write_table` writes a temp file in the same folder and `os.replace`s it, so a
reader sees the old file or the new one, never half of one. `merge_entries` takes an
exclusive `fcntl.flock` on ".<file>.lock" (hidden, beside it), re-reads the file,
merges, writes: two tuners adding entries to the same table at once both keep theirs.
Where fcntl is missing (Windows) the merge is unlocked, which the docs say.

A file that does not parse or does not validate raises `CorruptTableError`, which names
the file; callers report it and skip the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from moecc.tuning.keys import SCHEMA_VERSION, TableKey

ORIGINS = ("tuned", "predicted")


class CorruptTableError(ValueError):
    """A tuning file that cannot be used; the message names it and says what to do."""

    def __init__(self, path: os.PathLike | str, why: str):
        self.path = str(path)
        super().__init__(
            f"tuning table {self.path} is unreadable ({why}); it is skipped. "
            "Delete it, or re-tune to replace it."
        )


def now_utc() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_table(key: TableKey) -> dict:
    return {"schema": SCHEMA_VERSION, "key": key.to_dict(), "entries": {}}


def read_table(path: os.PathLike | str) -> dict:
    """Parse and validate one table file; entries come back keyed by int token count."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        raw = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptTableError(path, f"{type(exc).__name__}: {exc}") from None
    return validate_table(raw, path)


def validate_table(raw: object, path: os.PathLike | str = "<memory>") -> dict:
    """Check structure and types; return a copy with int token-count keys."""
    if not isinstance(raw, dict):
        raise CorruptTableError(path, "top level is not an object")
    if raw.get("schema") != SCHEMA_VERSION:
        raise CorruptTableError(path, f"schema {raw.get('schema')!r}, this moecc reads {SCHEMA_VERSION}")
    try:
        key = TableKey.from_dict(raw["key"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptTableError(path, f"bad key: {exc!r}") from None
    entries = raw.get("entries")
    if not isinstance(entries, dict):
        raise CorruptTableError(path, "'entries' is not an object")
    out: dict[int, dict] = {}
    for m, entry in entries.items():
        try:
            tokens = int(m)
        except (TypeError, ValueError):
            raise CorruptTableError(path, f"token count {m!r} is not an integer") from None
        if tokens < 1 or not isinstance(entry, dict) or not isinstance(entry.get("config"), dict):
            raise CorruptTableError(path, f"entry for {m!r} tokens has no config object")
        if entry.get("origin") not in ORIGINS:
            raise CorruptTableError(path, f"entry for {m!r} tokens has origin {entry.get('origin')!r}")
        out[tokens] = entry
    return {"schema": SCHEMA_VERSION, "key": key, "entries": out}


def table_to_json(table: dict) -> str:
    key = table["key"]
    entries = {str(m): table["entries"][m] for m in sorted(table["entries"])}
    doc = {"schema": SCHEMA_VERSION, "key": key.to_dict() if isinstance(key, TableKey) else key,
           "entries": entries}
    return json.dumps(doc, indent=1, sort_keys=False) + "\n"


def write_table(path: os.PathLike | str, table: dict) -> None:
    """Atomically replace `path` with `table` (temp file in the same folder + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; tables are meant to be shared and read by others
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(table_to_json(table))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def file_lock(path: os.PathLike | str):
    """Exclusive advisory lock on ".<name>.lock" beside `path` for the duration of the block.

    The lock file stays (removing it would let a third writer lock a different inode).
    """
    path = Path(path)
    lock_path = path.with_name(f".{path.name}.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock (documented in docs/tuning.md)
        yield
        return
    with open(lock_path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def better(new: dict, old: dict | None) -> bool:
    """Whether entry `new` should replace `old` for the same token count.

    Tuned beats predicted; between two tuned entries the faster wins; a predicted entry
    replaces only a predicted one.
    """
    if old is None:
        return True
    if new["origin"] != old["origin"]:
        return new["origin"] == "tuned"
    if new["origin"] == "predicted":
        return True
    t_new, t_old = new.get("time_us"), old.get("time_us")
    if t_old is None:
        return True
    return t_new is not None and t_new < t_old


def merge_entries(path: os.PathLike | str, key: TableKey, entries: dict[int, dict],
                  *, on_corrupt=None) -> dict:
    """Merge `entries` into the table at `path` under the file lock; returns the result.

    A corrupt existing file is reported through `on_corrupt(error)` (if given) and
    replaced by a table holding the merged entries, so a tuner never stops on it.
    """
    with file_lock(path):
        table = new_table(key)
        table["key"] = key
        if os.path.exists(path):
            try:
                existing = read_table(path)
                if existing["key"] != key:
                    raise CorruptTableError(path, f"holds key {existing['key']}, expected {key}")
                table["entries"] = dict(existing["entries"])
            except CorruptTableError as exc:
                if on_corrupt is not None:
                    on_corrupt(exc)
        for m, entry in entries.items():
            if better(entry, table["entries"].get(int(m))):
                table["entries"][int(m)] = entry
        write_table(path, table)
        return table
