"""`moecc prune-eval` on a small slice: the unpruned row is the reference (KL 0, top-1 1),
pruned rows remove what they say and count bytes from the experts' own tensors, every
number is finite, and bad arguments exit 2 with a message."""

from __future__ import annotations

import json
import math

import pytest

from moecc.cli import main


def test_prune_eval_rows_on_a_slice(tmp_path, capsys):
    out, md = tmp_path / "sweep.json", tmp_path / "sweep.md"
    code = main(["prune-eval", "qwen3-moe-stdlib", "--max-bytes", "1024", "--fractions", "0.25",
                 "--criteria", "frequency", "random", "--json", str(out), "--markdown", str(md)])
    assert code == 0
    assert "| 25% | frequency | code |" in md.read_text() and "| 0% | none | - |" in md.read_text()
    result = json.loads(out.read_text())["qwen3-moe-stdlib"]
    rows, info = result["rows"], result["info"]
    assert len(rows) == 1 + 2 * 2  # unpruned + 2 criteria x 2 calibration domains
    base = rows[0]
    assert base["criterion"] == "none" and base["removed"] == 0 and base["bytes_saved"] == 0
    assert all(v == 0 for v in base["kl"].values()) and all(v == 1 for v in base["top1"].values())
    per_expert = info["expert_bytes"]["model.layers.0.mlp"]
    assert per_expert == (2 * 64 * 128 + 128 * 64) * 4  # gate_up [2N, K] + down [K, N], fp32
    for row in rows[1:]:
        assert row["removed"] == 4 * 3 and row["experts"] == 48  # 25% of 16 experts in 3 layers
        assert row["bytes_saved"] == row["removed"] * per_expert
        assert all(math.isfinite(v) and v >= 0 for d in ("bpb", "kl", "top1") for v in row[d].values())
        assert any(v > 0 for v in row["kl"].values())
    assert "bpb code" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--fractions", "1.0"], "--fractions must lie in [0, 1)"),
    (["--batch", "0"], "--batch positive"),
])
def test_prune_eval_bad_arguments(argv, message, capsys):
    assert main(["prune-eval", "qwen3-moe-stdlib", *argv]) == 2
    assert message in capsys.readouterr().out
