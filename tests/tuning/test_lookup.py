"""Lookup: nearest token count, tier order, the single fallback warning, caching."""

from __future__ import annotations

import os
import warnings

import pytest

from _tuning_helpers import SHAPE, entry, key_for, write
from moecc.tuning import (
    CorruptTuningFileWarning,
    TuningDatabase,
    TuningFallbackWarning,
    lookup_config,
)
from moecc.tuning.lookup import nearest_bucket


def default_config() -> dict:
    return {"block_m": 1, "block_n": 1, "block_k": 1, "group_m": 1, "split_k": 1, "num_warps": 4,
            "num_stages": 1, "strategy": "prefill"}


def db_for(tmp_path, predictor=None) -> TuningDatabase:
    return TuningDatabase([("user", tmp_path / "user"), ("packaged", tmp_path / "packaged")], predictor=predictor)


def test_nearest_bucket_log_scale():
    buckets = [1, 4, 16, 64, 256, 1024, 4096]
    assert nearest_bucket(buckets, 1) == 1
    assert nearest_bucket(buckets, 3) == 4
    assert nearest_bucket(buckets, 40) == 64  # log2(40)=5.32: nearer 64 than 16
    assert nearest_bucket(buckets, 32) == 64  # exact tie -> larger bucket
    assert nearest_bucket(buckets, 2500) == 4096
    assert nearest_bucket(buckets, 10**6) == 4096
    assert nearest_bucket(buckets, 0) == 1


def test_lookup_uses_nearest_bucket(tmp_path):
    key = key_for()
    path = write(tmp_path / "user", key, {1: entry(16), 64: entry(32), 1024: entry(128)})
    db = db_for(tmp_path)
    for m, bm, bucket in [(1, 16, 1), (5, 16, 1), (50, 32, 64), (600, 128, 1024), (9000, 128, 1024)]:
        res = db.lookup("triton.moe", SHAPE, "bf16", m, "h100_sxm", default=default_config)
        assert (res.source, res.config["block_m"], res.num_tokens, res.path) == ("user", bm, bucket, path)
        assert not res.predicted


def test_lookup_order(tmp_path):
    def predictor(device, op, shape, dtype, m, strategy):
        return dict(default_config(), block_m=8) if device == "h100_sxm" else None

    db = db_for(tmp_path, predictor)
    look = lambda dev="h100_sxm": db.lookup("triton.moe", SHAPE, "bf16", 16, dev, default=default_config)  # noqa
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert look().source == "predicted" and look().config["block_m"] == 8 and look().predicted
        assert look("mystery_gpu").source == "default" and look("mystery_gpu").config == default_config()
        write(tmp_path / "packaged", key_for(), {16: entry(64)})
        assert (look().source, look().config["block_m"]) == ("packaged", 64)
        write(tmp_path / "user", key_for(), {16: entry(32)})
        assert (look().source, look().config["block_m"]) == ("user", 32)


def test_env_folders_order(isolated_env, tmp_path):
    """$MOECC_TUNING_DIR beats the default cache folder; both are "user"."""
    cache = tmp_path / "cache" / "moecc" / "tuning"
    write(cache, key_for(), {16: entry(16)})
    res = lookup_config("triton.moe", SHAPE, "bf16", 16, "h100_sxm", default=default_config)
    assert (res.source, res.config["block_m"], res.path) == ("user", 16, str(cache / key_for().filename))
    write(isolated_env, key_for(), {16: entry(64)})
    res = lookup_config("triton.moe", SHAPE, "bf16", 16, "h100_sxm", default=default_config)
    assert (res.source, res.config["block_m"]) == ("user", 64)


def test_exactly_one_warning_per_key(tmp_path):
    db = db_for(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for m in (1, 4, 16, 4096, 1, 1):
            db.lookup("triton.moe", SHAPE, "bf16", m, "mystery_gpu", default=default_config)
        db.lookup("triton.moe", SHAPE, "fp16", 1, "mystery_gpu", default=default_config)  # another key
    fallback = [w for w in caught if issubclass(w.category, TuningFallbackWarning)]
    assert len(fallback) == 2
    text = str(fallback[0].message)
    assert "moecc autotune --shape E=128,N=768,K=2048,topk=8 --dtype bf16" in text
    assert "mystery_gpu" in text


def test_predicted_tier_warns_once_tuned_does_not(tmp_path):
    db = db_for(tmp_path)  # real predictor: h100_sxm has a profile
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for m in (1, 16, 256):
            res = db.lookup("triton.moe", SHAPE, "bf16", m, "h100_sxm", default=default_config)
            assert res.source == "predicted" and res.predicted
    assert len([w for w in caught if issubclass(w.category, TuningFallbackWarning)]) == 1
    write(tmp_path / "user", key_for(), {16: entry(16)})
    other = db_for(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert other.lookup("triton.moe", SHAPE, "bf16", 16, "h100_sxm", default=default_config).source == "user"
    assert not caught


def test_corrupt_and_truncated_files_are_skipped_with_report(tmp_path):
    good = write(tmp_path / "packaged", key_for(), {16: entry(64)})
    (tmp_path / "user").mkdir()
    bad = tmp_path / "user" / key_for().filename
    bad.write_text(open(good).read()[:40])  # truncated
    db = db_for(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            res = db.lookup("triton.moe", SHAPE, "bf16", 16, "h100_sxm", default=default_config)
            assert (res.source, res.path) == ("packaged", good)
    reports = [w for w in caught if issubclass(w.category, CorruptTuningFileWarning)]
    assert len(reports) == 1  # reported once per file version, not per lookup
    assert str(bad) in str(reports[0].message) and "re-tune" in str(reports[0].message)


def test_other_compiler_version_is_used_when_exact_is_missing(tmp_path):
    path = write(tmp_path / "user", key_for(version="0.0.1"), {16: entry(32)})
    res = db_for(tmp_path).lookup("triton.moe", SHAPE, "bf16", 16, "h100_sxm", default=default_config)
    assert (res.source, res.path) == ("user", path)
    exact = write(tmp_path / "user", key_for(), {16: entry(64)})
    res = db_for(tmp_path).lookup("triton.moe", SHAPE, "bf16", 16, "h100_sxm", default=default_config)
    assert (res.path, res.config["block_m"]) == (exact, 64)


def test_repeated_lookups_are_cached_and_see_new_files(tmp_path, monkeypatch):
    key = key_for()
    write(tmp_path / "user", key, {16: entry(16)})
    db = db_for(tmp_path)
    first = db.lookup("triton.moe", SHAPE, "bf16", 16, "h100_sxm", default=default_config)
    reads = []
    import moecc.tuning.lookup as lookup_mod

    monkeypatch.setattr(lookup_mod, "read_table", lambda p: reads.append(p) or pytest.fail("re-read"))
    for _ in range(100):
        res = db.lookup("triton.moe", SHAPE, "bf16", 16, "h100_sxm", default=default_config)
        assert res == first
    res.config["block_m"] = 999  # callers get copies
    assert db.lookup("triton.moe", SHAPE, "bf16", 16, "h100_sxm", default=default_config).config["block_m"] == 16
    monkeypatch.undo()
    write(tmp_path / "user", key, {16: entry(128, time_us=1.0)})  # faster: replaces
    path = tmp_path / "user" / key.filename
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # coarse-mtime file systems
    assert db.lookup("triton.moe", SHAPE, "bf16", 16, "h100_sxm", default=default_config).config["block_m"] == 128


def test_default_device_is_cpu_without_cuda(tmp_path, caplog):
    import torch

    if torch.cuda.is_available():
        pytest.skip("has a CUDA device")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = db_for(tmp_path).lookup("triton.moe", SHAPE, "bf16", 16, None, default=default_config)
    assert (res.device_key, res.source) == ("cpu", "default")
    assert not [w for w in caught if issubclass(w.category, TuningFallbackWarning)]
