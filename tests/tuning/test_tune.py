"""The tuning loop on CPU stand-ins: best per M recorded, journal resume, budget, failures.

The real run needs a CUDA GPU (kernel: moecc.backends.triton.moe_layer, timer: CUDA-graph
replay); here the kernel is the reference op and the timer a function of the config, so
the bookkeeping is tested anywhere.
"""

from __future__ import annotations

import time

from moecc.backends import reference
from moecc.devices import profile
from moecc.tuning.keys import TableKey
from moecc.tuning.store import read_table
from moecc.tuning.tune import Ceilings, journal_path, make_problem, parse_budget, plan, read_journal, tune_table

SHAPE = (8, 64, 32, 2)
KEY = TableKey("h100_sxm", "triton.moe", "auto", SHAPE, "fp32", "test")
CEILINGS = Ceilings(bandwidth_gbps=1000.0, peak_tflops=100.0)


def fake_timer(cfg_of):
    def timer(fn):
        out = fn()
        assert out.shape[1] == SHAPE[2]
        return 0.01 * cfg_of() , "cudagraph"
    return timer


def run(tmp_path, *, deadline=None, fail_block_n=None):
    current = {}

    def kernel(x, weights, spec, config):
        current["cfg"] = config
        if config.block_n == fail_block_n:
            raise RuntimeError("out of resources")
        return reference.moe_layer(x, weights, spec)

    # time grows with block_n: the smallest block_n tried must win
    timer = fake_timer(lambda: current["cfg"].block_n / 32 + current["cfg"].num_stages / 100)
    return tune_table(KEY, tmp_path / KEY.filename, [1, 64], profile("h100_sxm"),
                      deadline=deadline if deadline is not None else time.monotonic() + 60,
                      ceilings=CEILINGS, max_configs=4, problem=make_problem(SHAPE, "fp32", device="cpu"),
                      kernel=kernel, timer=timer)


def test_best_per_m_written_with_roofline_fields(tmp_path):
    report = run(tmp_path)
    todo = plan(KEY, [1, 64], profile("h100_sxm"), max_configs=4)
    assert report.measured == len(todo) and not report.failed and not report.out_of_budget
    table = read_table(tmp_path / KEY.filename)
    assert sorted(table["entries"]) == [1, 64]
    for m, entry in table["entries"].items():
        tried = [c for mm, c in todo if mm == m]
        best = min(tried, key=lambda c: c.block_n / 32 + c.num_stages / 100)
        assert entry["config"] == best.to_dict() and entry["origin"] == "tuned"
        assert 0 < entry["roofline_fraction"] and entry["floor_us"] > 0 and entry["timing"] == "cudagraph"
        assert entry["bandwidth_gbps"] == 1000.0 and entry["peak_tflops"] == 100.0


def test_resume_skips_measured_and_failures_are_journaled(tmp_path):
    first = run(tmp_path, fail_block_n=32)
    assert first.failed >= 1
    journal = read_journal(journal_path(tmp_path / KEY.filename))
    assert len(journal) == first.measured + first.failed
    assert any(not r["ok"] and "out of resources" in r["error"] for r in journal.values())
    again = run(tmp_path)
    assert (again.measured, again.failed, again.skipped) == (0, 0, first.measured + first.failed)


def test_budget_stops_between_measurements(tmp_path):
    report = run(tmp_path, deadline=time.monotonic() - 1)
    assert report.out_of_budget and report.measured == 0
    assert not (tmp_path / KEY.filename).exists()
    assert parse_budget("5m") == 300 and parse_budget("90s") == 90 and parse_budget("1h") == 3600
    assert parse_budget(None) == float("inf")


def test_wrong_results_are_never_timed(tmp_path):
    timed = []
    report = tune_table(KEY, tmp_path / KEY.filename, [16], profile("h100_sxm"), deadline=time.monotonic() + 60,
                        ceilings=CEILINGS, max_configs=2, problem=make_problem(SHAPE, "fp32", device="cpu"),
                        kernel=lambda x, w, s, config: reference.moe_layer(x, w, s) * 1.01,
                        timer=lambda fn: timed.append(fn) or (1.0, "eager"))
    assert report.measured == 0 and report.failed > 0 and not timed
    records = read_journal(journal_path(tmp_path / KEY.filename)).values()
    assert all("wrong result" in r["error"] for r in records)


def test_decisive_inputs_have_no_near_ties():
    from moecc.backends.reference import router_logits
    from moecc.tuning.tune import decisive_hidden

    problem = make_problem((64, 32, 32, 6), "fp32", device="cpu")
    x = decisive_hidden(problem, 256, seed=3)
    top = router_logits(x, problem.weights.router_weight, None, problem.spec.router).float().topk(7).values
    assert bool(((top[:, 5] - top[:, 6]) >= 0.05).all())
