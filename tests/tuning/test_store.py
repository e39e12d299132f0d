"""Table files: round trip, atomic locked merges, concurrent writers, corrupt files."""

from __future__ import annotations

import json
import multiprocessing

import pytest

from _tuning_helpers import entry, key_for
from moecc.tuning.keys import parse_filename
from moecc.tuning.store import CorruptTableError, merge_entries, read_table, write_table


def test_round_trip(tmp_path):
    key = key_for()
    path = tmp_path / key.filename
    merge_entries(path, key, {1: entry(16), 256: entry(64, time_us=123.5)})
    table = read_table(path)
    assert table["key"] == key
    assert table["entries"][256]["config"]["block_m"] == 64
    assert table["entries"][256]["time_us"] == 123.5
    assert sorted(table["entries"]) == [1, 256]
    assert json.loads(path.read_text())["schema"] == 1
    assert parse_filename(path.name) == key
    assert not list(tmp_path.glob("*.tmp"))  # the temp file was renamed, not left behind


def test_merge_keeps_the_faster_and_prefers_tuned(tmp_path):
    key = key_for()
    path = tmp_path / key.filename
    merge_entries(path, key, {16: entry(16, time_us=50.0), 64: entry(32, origin="predicted", time_us=None)})
    merge_entries(path, key, {16: entry(32, time_us=80.0), 64: entry(64, time_us=90.0)})
    entries = read_table(path)["entries"]
    assert entries[16]["config"]["block_m"] == 16  # slower measurement did not replace
    assert entries[64]["origin"] == "tuned"  # a measurement replaces a prediction
    merge_entries(path, key, {64: entry(128, origin="predicted", time_us=None)})
    assert read_table(path)["entries"][64]["origin"] == "tuned"  # and never the reverse


@pytest.mark.parametrize("text, why", [
    ('{"schema": 1, "key": {"device": "h100_sxm", "op": "triton.moe", "strat', "truncated"),
    ("", "empty"),
    ('{"schema": 99, "key": {}, "entries": {}}', "schema"),
    ('{"schema": 1, "key": {"device": "h100_sxm"}, "entries": {}}', "bad key"),
    ('[1, 2]', "top level"),
])
def test_corrupt_file_raises_error_naming_it(tmp_path, text, why):
    path = tmp_path / key_for().filename
    path.write_text(text)
    with pytest.raises(CorruptTableError) as info:
        read_table(path)
    assert str(path) in str(info.value) and "Delete it" in str(info.value)


def test_merge_over_corrupt_file_reports_and_replaces(tmp_path):
    key = key_for()
    path = tmp_path / key.filename
    path.write_text("{not json")
    reported = []
    merge_entries(path, key, {4: entry(16)}, on_corrupt=reported.append)
    assert len(reported) == 1 and str(path) in str(reported[0])
    assert list(read_table(path)["entries"]) == [4]


def _writer(path: str, offset: int, n: int) -> None:
    from pathlib import Path

    from _tuning_helpers import entry as make_entry, key_for as make_key

    for i in range(n):
        merge_entries(Path(path), make_key(), {offset + i: make_entry(16, time_us=float(i + 1))})


def test_two_concurrent_writers_lose_nothing(tmp_path):
    path = tmp_path / key_for().filename
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    n = 40
    procs = [ctx.Process(target=_writer, args=(str(path), offset, n)) for offset in (1, 1001)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    entries = read_table(path)["entries"]
    assert sorted(entries) == list(range(1, 1 + n)) + list(range(1001, 1001 + n))


def test_write_table_is_atomic_replace(tmp_path, monkeypatch):
    """A failing write leaves the old file intact and no temp file."""
    key = key_for()
    path = tmp_path / key.filename
    merge_entries(path, key, {1: entry(16)})
    before = path.read_text()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("moecc.tuning.store.os.replace", boom)
    with pytest.raises(OSError):
        write_table(path, {"key": key, "entries": {}})
    assert path.read_text() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_written_tables_are_readable_by_others(tmp_path):
    key = key_for()
    path = tmp_path / key.filename
    merge_entries(path, key, {1: entry(16)})
    assert path.stat().st_mode & 0o044 == 0o044
    assert (tmp_path / f".{key.filename}.lock").exists()  # hidden lock beside the table
