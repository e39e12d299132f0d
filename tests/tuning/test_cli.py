"""`moecc autotune`: --predict writes a table, --list shows it, real tuning needs a GPU."""

from __future__ import annotations

import json

import pytest

from moecc.cli import main
from moecc.tuning import lookup_config
from moecc.tuning.keys import parse_filename
from moecc.tuning.store import read_table


def test_predict_writes_a_table_that_lookup_then_uses(isolated_env, capsys):
    rc = main(["autotune", "--predict", "--device", "NVIDIA GeForce RTX 4090",
               "--shape", "E=128,N=768,K=2048,topk=8", "--dtype", "bf16", "--batches", "1,16,256",
               "--fit-check", "analytic"])
    assert rc == 0
    files = list(isolated_env.glob("*.json"))
    assert len(files) == 1
    key = parse_filename(files[0].name)
    assert (key.device, key.op, key.strategy, key.shape, key.dtype) == (
        "rtx4090", "triton.moe", "auto", (128, 768, 2048, 8), "bf16")
    table = read_table(files[0])
    assert sorted(table["entries"]) == [1, 16, 256]
    assert all(e["origin"] == "predicted" for e in table["entries"].values())
    assert str(files[0]) in capsys.readouterr().out
    with pytest.warns(UserWarning, match="predicted"):
        res = lookup_config("triton.moe", (128, 768, 2048, 8), "bf16", 200, "rtx4090", default=dict)
    assert (res.source, res.path, res.num_tokens, res.predicted) == ("user", str(files[0]), 256, True)


def test_predict_writes_to_out_and_defaults_to_reference_shapes(isolated_env, tmp_path):
    out = tmp_path / "tables"
    assert main(["autotune", "--predict", "--device", "rtx3090", "--out", str(out), "--batches", "1,4096",
                 "--fit-check", "analytic"]) == 0
    assert len(list(out.glob("rtx3090__triton.moe__auto__*__bf16__triton-*.json"))) == 4
    assert not isolated_env.exists()


def test_model_config_json(isolated_env, tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "qwen3_moe", "num_experts": 128, "num_experts_per_tok": 8,
                               "hidden_size": 2048, "moe_intermediate_size": 768, "intermediate_size": 6144}))
    assert main(["autotune", "--predict", "--device", "rtx4090", "--model", str(cfg), "--batches", "4",
                 "--fit-check", "analytic"]) == 0
    assert [parse_filename(p.name).shape for p in isolated_env.glob("*.json")] == [(128, 768, 2048, 8)]


def test_list_shows_tables_and_device(isolated_env, capsys):
    main(["autotune", "--predict", "--device", "rtx4090", "--shape", "E=8,N=14336,K=4096,topk=2",
          "--batches", "1", "--fit-check", "analytic"])
    capsys.readouterr()
    assert main(["autotune", "--list"]) == 0
    out = capsys.readouterr().out
    assert "current device:" in out
    assert "rtx4090" in out and "E8_N14336_K4096_top2" in out and "predicted" in out


def test_list_reports_corrupt_file(isolated_env, capsys):
    isolated_env.mkdir(parents=True)
    bad = isolated_env / "h100_sxm__triton.moe__auto__E8_N64_K64_top2__bf16__triton-3.6.0.json"
    bad.write_text('{"schema": 1, "key"')
    assert main(["autotune", "--list"]) == 0
    out = capsys.readouterr().out
    assert "unreadable" in out and bad.name in out.replace("\n", "")


def test_real_tuning_without_gpu_fails_clearly(isolated_env, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc = main(["autotune", "--shape", "E=128,N=768,K=2048,topk=8", "--dtype", "bf16", "--budget", "5m"])
    err = capsys.readouterr().err
    assert rc != 0
    assert "needs a CUDA GPU" in err and "--predict" in err
    assert not isolated_env.exists()


@pytest.mark.parametrize("argv, message", [
    (["--predict", "--shape", "E=8,N=64"], "lacks"),
    (["--predict", "--device", "rtx4090", "--shape", "E=8,N=64,K=64,topk=2", "--batches", "0,4"], "positive"),
    (["--predict", "--shape", "E=8,N=64,K=64,topk=2"], "--device"),
    (["--predict", "--device", "voodoo5", "--shape", "E=8,N=64,K=64,topk=2"], "no device profile"),
    (["--model", "no-such-model"], "neither"),
])
def test_bad_arguments_are_errors_not_tracebacks(isolated_env, capsys, argv, message):
    assert main(["autotune", *argv]) == 2
    assert message in capsys.readouterr().err


def test_shape_from_plain_json_without_the_model_loader(tmp_path, monkeypatch):
    import sys

    from moecc.tuning.model_shapes import shapes_from_model

    monkeypatch.setitem(sys.modules, "moecc.models", None)  # as if models.py were absent
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"n_routed_experts": 256, "num_experts_per_tok": 8, "hidden_size": 7168,
                               "moe_intermediate_size": 2048, "intermediate_size": 18432}))
    assert shapes_from_model(str(tmp_path)) == [(tmp_path.name, (256, 2048, 7168, 8))]
    assert shapes_from_model("qwen3-30b-a3b") == [("qwen3-30b-a3b", (128, 768, 2048, 8))]
    (tmp_path / "bad.json").write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(ValueError, match="num_experts"):
        shapes_from_model(str(tmp_path / "bad.json"))
