"""Fixtures for the tuning tests: isolated folders, no state shared between tests."""

from __future__ import annotations

import pytest

from moecc.tuning import process_database


@pytest.fixture
def isolated_env(tmp_path, monkeypatch):
    """$MOECC_TUNING_DIR and the default cache under tmp_path; a fresh process database."""
    user = tmp_path / "user"
    monkeypatch.setenv("MOECC_TUNING_DIR", str(user))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    process_database.cache_clear()
    yield user
    process_database.cache_clear()
