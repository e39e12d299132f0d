"""What the tuning folders hold: one row per table file, for `moecc autotune --list/--plot`.

Reads every table file in the lookup folders (lookup.py's order) without caching;
corrupt files come back as rows with `error` set instead of raising.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from moecc.tuning.keys import TableKey, parse_filename
from moecc.tuning.store import CorruptTableError, read_table


@dataclass(frozen=True)
class TableRow:
    source: str  # "user" | "packaged" | "out"
    path: Path
    key: TableKey
    entries: dict  # M -> entry ({} when unreadable)
    error: str | None = None

    @property
    def origin(self) -> str:
        origins = {e.get("origin") for e in self.entries.values()}
        return "/".join(sorted(o for o in origins if o)) or "-"


def scan(folders: list[tuple[str, Path]]) -> list[TableRow]:
    rows = []
    for source, folder in folders:
        try:
            names = sorted(os.listdir(folder))
        except OSError:
            continue
        for name in names:
            key = parse_filename(name)
            if key is None:
                continue
            path = Path(folder) / name
            try:
                rows.append(TableRow(source, path, key, read_table(path)["entries"]))
            except CorruptTableError as exc:
                rows.append(TableRow(source, path, key, {}, str(exc)))
    return rows
