"""The benchmark harness on a CPU: floor arithmetic, baselines against the reference,
summaries, and `moecc bench --device cpu --quick` end to end. Asserts no timings."""

from __future__ import annotations

import json
import math

import pytest
import torch

from moecc.backends.reference import moe_layer
from moecc.bench import implementations as impls
from moecc.bench import report
from moecc.bench.kernel_sweep import compare
from moecc.bench.roofline import Ceilings, floor
from moecc.bench.workload import distinct_experts_hit, layer_spec, random_hidden, random_weights, tiny_shape
from moecc.cli import main as cli_main
from moecc.shapes import REFERENCE_SHAPES, shape_by_name
from moecc.spec import ExpertSpec, MoELayerSpec, RouterSpec
from moecc.weights import make_weights

QWEN3 = shape_by_name("qwen3-30b-a3b")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny CPU ops only lose to thread oversubscription on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- roofline floor -----------------------------------------------------------------------


def test_floor_memory_bound_by_hand():
    # M=16 tokens hit U=10 experts of Qwen3-30B-A3B (N=768, K=2048, top-8), bf16.
    fl = floor(QWEN3, 16, torch.bfloat16, 10, Ceilings(copy_bandwidth=1e12, matmul_peak=1e15))
    assert fl.bytes == 10 * 3 * 768 * 2048 * 2 + 2 * 16 * 2048 * 2 == 94_502_912
    assert fl.flops == 2 * 16 * 8 * 3 * 768 * 2048 == 1_207_959_552
    assert fl.memory_s == pytest.approx(94.502912e-6)
    assert fl.compute_s == pytest.approx(1.207959552e-6)
    assert fl.seconds == fl.memory_s and fl.bound == "memory"


def test_floor_compute_bound_by_hand():
    # M=4096 hits all 128 experts: 1.24 GB and 309 GFLOP; at 3 TB/s and 500 TFLOP/s the
    # matmuls (0.618 ms) take longer than streaming the weights (0.414 ms).
    fl = floor(QWEN3, 4096, torch.bfloat16, 128, Ceilings(copy_bandwidth=3e12, matmul_peak=5e14))
    assert fl.bytes == 128 * 3 * 768 * 2048 * 2 + 2 * 4096 * 2048 * 2 == 1_241_513_984
    assert fl.flops == 309_237_645_312
    assert fl.seconds == pytest.approx(309_237_645_312 / 5e14)
    assert fl.bound == "compute"


def test_floor_bytes_scale_with_dtype_and_reject_impossible_u():
    c = Ceilings(1e12, 1e15)
    assert floor(QWEN3, 1, torch.float32, 8, c).bytes == 2 * floor(QWEN3, 1, torch.bfloat16, 8, c).bytes
    with pytest.raises(ValueError):
        floor(QWEN3, 1, torch.bfloat16, 129, c)


# --- baselines against the reference --------------------------------------------------------


@pytest.mark.parametrize("shape", REFERENCE_SHAPES, ids=lambda s: s.name)
@pytest.mark.parametrize("name", ["loop", "grouped_mm"])
def test_baselines_match_reference_fp32(shape, name):
    tiny = tiny_shape(shape)
    spec = layer_spec(tiny)
    w = random_weights(spec, torch.float32, "cpu", seed=3)
    x = random_hidden(24, tiny.hidden_size, torch.float32, "cpu", seed=4)
    check = compare(impls.build(name, w, spec)(x), moe_layer(x, w, spec), rtol=1e-4)
    assert check["agree_fraction"] == 1.0, check


@pytest.mark.parametrize("name", ["loop", "grouped_mm"])
def test_baselines_match_reference_bf16(name):
    tiny = tiny_shape(shape_by_name("deepseek-v3"))
    spec = layer_spec(tiny)
    w = random_weights(spec, torch.bfloat16, "cpu", seed=5)
    x = random_hidden(32, tiny.hidden_size, torch.bfloat16, "cpu", seed=6)
    out = impls.build(name, w, spec)(x)
    assert out.dtype == torch.bfloat16
    assert compare(out, moe_layer(x, w, spec), rtol=3e-2)["ok"]


@pytest.mark.parametrize("name", ["loop", "grouped_mm"])
def test_baselines_with_shared_experts_and_biases(name):
    e, k, n, s = 6, 32, 16, 2
    spec = MoELayerSpec(RouterSpec(num_experts=e, top_k=2, renormalize=True),
                        ExpertSpec(hidden_size=k, intermediate_size=n, has_bias=True, num_shared=s))
    g = torch.Generator().manual_seed(0)
    r = lambda *size: torch.randn(*size, generator=g) * 0.3  # noqa: E731
    w = make_weights(router_weight=r(e, k), gate_up=r(e, 2 * n, k), down=r(e, k, n), gate_up_bias=r(e, 2 * n),
                     down_bias=r(e, k), shared_gate=r(s * n, k), shared_up=r(s * n, k), shared_down=r(k, s * n))
    x = torch.randn(10, k, generator=g)
    assert compare(impls.build(name, w, spec)(x), moe_layer(x, w, spec), rtol=1e-4)["agree_fraction"] == 1.0


def test_grouped_mm_selection_and_fallback_agree():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 16, generator=g)  # [S, K] sorted by group
    w = torch.randn(3, 16, 8, generator=g)  # [G, K, N]
    offs = torch.tensor([2, 2, 7], dtype=torch.int32)  # group 1 empty
    want = torch.cat([x[:2] @ w[0], x[2:] @ w[2]])
    torch.testing.assert_close(impls.grouped_mm_fallback(x, w, offs), want)
    mm, note = impls.select_grouped_mm(torch.device("cpu"), torch.float32)
    torch.testing.assert_close(mm(x, w, offs), want, rtol=1e-5, atol=1e-5)
    # Either torch's kernel runs for fp32 on this CPU, or the fallback is used and says so.
    assert (mm is impls.grouped_mm_fallback) == ("fallback" in note)


def test_grouped_mm_layer_not_graph_safe_with_fallback(monkeypatch):
    monkeypatch.setattr(impls, "_torch_grouped_mm", lambda: None)
    tiny = tiny_shape(QWEN3)
    spec = layer_spec(tiny)
    w = random_weights(spec, torch.float32, "cpu")
    layer = impls.build("grouped_mm", w, spec)
    assert not layer.graph_safe and "fallback" in layer.note
    x = random_hidden(5, tiny.hidden_size, torch.float32, "cpu", seed=1)
    assert compare(layer(x), moe_layer(x, w, spec), rtol=1e-4)["agree_fraction"] == 1.0


def test_unavailable_implementations_say_why():
    spec = layer_spec(tiny_shape(QWEN3))
    w = random_weights(spec, torch.float32, "cpu")
    with pytest.raises(impls.Unavailable, match="CUDA"):
        impls.build("moecc_triton", w, spec)
    with pytest.raises(ValueError, match="known"):
        impls.build("nope", w, spec)


def test_distinct_experts_hit_counts_routing():
    spec = layer_spec(tiny_shape(QWEN3))
    w = random_weights(spec, torch.float32, "cpu")
    assert distinct_experts_hit(random_hidden(1, 64, torch.float32, "cpu", 0), w, spec) == 8
    u = distinct_experts_hit(random_hidden(64, 64, torch.float32, "cpu", 0), w, spec)
    assert 8 < u <= 128


def test_compare_flags_wrong_tokens():
    ref = torch.randn(20, 8)
    bad = ref.clone()
    bad[:3] = 0  # 15% of tokens wrong: fails; one token wrong (a routing tie) passes
    assert not compare(bad, ref, 1e-3)["ok"]
    one = ref.clone()
    one[0] += 1
    assert compare(one, ref, 1e-3)["ok"] and compare(one, ref, 1e-3)["agree_fraction"] == pytest.approx(0.95)
    assert not compare(ref * float("nan"), ref, 1e-3)["ok"]


# --- summaries ------------------------------------------------------------------------------


def _pt(impl, shape, m, t, frac, mode="graph"):
    return {"impl": impl, "shape": shape, "tokens": m, "mode": mode, "status": "ok", "time_ms": t, "fraction": frac}


def test_summary_geomean_worst_and_speedup():
    points = [_pt("grouped_mm", "a", 1, 2.0, 0.25), _pt("grouped_mm", "a", 4, 8.0, 0.5),
              _pt("x", "a", 1, 1.0, 0.5), _pt("x", "a", 4, 2.0, 2.0),
              {"impl": "x", "shape": "a", "tokens": 16, "mode": "graph", "status": "error"}]
    rows = {r["impl"]: r for r in report.summarise(points)}
    assert rows["x"]["points"] == 2
    assert rows["x"]["geomean_fraction"] == pytest.approx(1.0)  # sqrt(0.5 * 2)
    assert rows["x"]["worst_fraction"] == 0.5 and rows["x"]["worst_at"] == "a M=1"
    assert rows["x"]["speedup_vs_grouped_mm"] == pytest.approx(math.sqrt(2.0 * 4.0))
    assert rows["grouped_mm"]["speedup_vs_grouped_mm"] == pytest.approx(1.0)
    verdicts = report.target_verdicts(report.summarise(points), impl="x")
    assert "NOT met" in verdicts[0] and "geomean 100%" in verdicts[0]


# --- the command ----------------------------------------------------------------------------


def test_bench_refuses_without_cuda(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert cli_main(["bench", "--out", str(tmp_path)]) != 0
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert cli_main(["bench", "--device", "cpu", "--out", str(tmp_path)]) != 0  # cpu needs --quick
    assert not (tmp_path / "results.json").exists()


def test_bench_cpu_quick_writes_results_and_plot(tmp_path, capsys):
    out = tmp_path / "bench"
    assert cli_main(["bench", "--device", "cpu", "--quick", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    png = (out / "fraction_of_floor.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert {s.name + "@tiny" for s in REFERENCE_SHAPES} == set(results["config"]["shapes"])
    assert all(c["ok"] for c in results["checks"])
    ok = [p for p in results["points"] if p["status"] == "ok"]
    assert {p["impl"] for p in ok} == {"reference", "loop", "grouped_mm"}
    assert all(p["time_ms"] > 0 and p["fraction"] > 0 and 1 <= p["distinct_experts"] for p in ok)
    assert results["ceilings"]["copy_bandwidth"] > 0 and results["ceilings"]["matmul_peak"] > 0
    assert results["summary"]
    printed = capsys.readouterr().out
    assert printed.rstrip().splitlines()[-1].startswith("results.json and fraction_of_floor.png")
    assert "geomean" in printed


def test_bench_without_matplotlib_still_writes_results_then_replots(tmp_path, monkeypatch, capsys):
    def no_matplotlib(*args, **kwargs):
        raise ImportError("No module named 'matplotlib'")

    monkeypatch.setattr(report, "plot_fractions", no_matplotlib)
    run_dir = tmp_path / "gpu"
    args = ["bench", "--device", "cpu", "--quick", "--shapes", "qwen3-30b-a3b", "--tokens", "1", "--out"]
    assert cli_main(args + [str(run_dir)]) == 0
    assert (run_dir / "results.json").exists() and not (run_dir / "fraction_of_floor.png").exists()
    assert "--from-results" in capsys.readouterr().err
    monkeypatch.undo()
    assert cli_main(["bench", "--from-results", str(run_dir / "results.json"), "--out", str(tmp_path / "png")]) == 0
    assert (tmp_path / "png" / "fraction_of_floor.png").exists() and (tmp_path / "png" / "results.json").exists()


# --- end-to-end decode pieces (tiny models) ------------------------------------------------


@pytest.fixture(scope="module")
def tiny_qwen3():
    pytest.importorskip("transformers")
    from moecc.bench.e2e_decode import build_model

    return build_model("qwen3-30b-a3b-4l", "cpu", torch.float32, num_layers=2, tiny=True)


def test_weight_bytes_per_step_by_hand(tiny_qwen3):
    from moecc.bench.e2e_decode import weight_bytes_per_step

    m = tiny_qwen3  # tiny widths: hidden 64, 128 experts of 32, vocab 512, untied, fp32
    total = sum(p.numel() for p in m.parameters()) * 4
    experts = 128 * (2 * 32 * 64 + 64 * 32) * 4  # per layer: gate_up + down
    embedding = 512 * 64 * 4
    # batch 2, layer 0 hits 10 experts, layer 1 hits 16: experts and embedding rows read.
    want = total - 2 * experts + (10 + 16) / 128 * experts - embedding + 2 * 64 * 4
    assert weight_bytes_per_step(m, 2, [10, 16]) == pytest.approx(want)


def test_e2e_eager_decode_and_routing_stats(tiny_qwen3):
    from moecc.bench.e2e_decode import E2EConfig, routing_stats, time_decode

    ids = torch.randint(1, 512, (2, 5))
    hits = routing_stats(tiny_qwen3, ids, torch.ones_like(ids), steps=3)
    assert len(hits) == 2 and all(8 <= h <= 16 for h in hits)  # batch 2, top-8
    rec = time_decode(tiny_qwen3, 1, "eager", E2EConfig(device="cpu", dtype=torch.float32, tiny=True,
                                                         prompt_len=4, new_tokens=4, skip_steps=0))
    assert rec["status"] == "ok" and rec["step_ms"] > 0 and rec["steps"] == 3


def test_e2e_moecc_variant_runs_through_generate(tiny_qwen3):
    # generate() with a static cache and CompileConfig(backend=moecc), forced to compile on
    # a CPU; reference kernels and an eager rest-of-graph keep it fast. The CompileReport
    # proves the moecc backend captured both MoE layers.
    pytest.importorskip("moecc.backend")
    from moecc.bench.e2e_decode import E2EConfig, time_decode

    cfg = E2EConfig(device="cpu", dtype=torch.float32, tiny=True, prompt_len=4, new_tokens=4, skip_steps=0,
                    compile_all_devices=True,
                    moecc_options=(("kernel_backend", "reference"), ("rest_of_graph", "eager")))
    rec = time_decode(tiny_qwen3, 2, "moecc", cfg)
    assert rec["status"] == "ok", rec
    assert rec["moecc_layers_captured"] == 2 and rec["mode"] == "reduce-overhead"


def test_deepseek_v2_builds_and_decodes_tiny():
    pytest.importorskip("transformers")
    from moecc.bench.e2e_decode import build_model, routing_stats

    m = build_model("deepseek-v2-lite-4l", "cpu", torch.float32, num_layers=2, tiny=True)
    ids = torch.randint(1, 512, (1, 4))
    hits = routing_stats(m, ids, torch.ones_like(ids), steps=2)
    assert hits == [6.0]  # layer 0 dense (first_k_dense_replace=1); layer 1: top-6 of 64


# --- the sweep keeps going ------------------------------------------------------------------


def _sweep_cfg(**kw):
    from moecc.bench.kernel_sweep import SweepConfig

    return SweepConfig(shapes=(tiny_shape(QWEN3),), tokens=(1, 4), implementations=("loop", "grouped_mm"),
                       device="cpu", dtype=torch.float32, modes=("eager",), check_tokens=8, target_ms=1.0,
                       min_reps=1, **kw)


def test_sweep_records_a_failing_point_and_goes_on(monkeypatch):
    from moecc.bench.kernel_sweep import run_sweep

    real_build = impls.build

    def build(name, weights, spec):
        layer = real_build(name, weights, spec)
        if name == "loop":
            inner = layer.fn

            def fn(h):
                if h.shape[0] == 4:
                    raise RuntimeError("boom at M=4")
                return inner(h)
            layer.fn = fn
        return layer

    monkeypatch.setattr(impls, "build", build)
    c = Ceilings(1e10, 1e11)
    points = {(p["impl"], p["tokens"]): p for p in run_sweep(_sweep_cfg(), c, log=lambda s: None).points}
    assert points[("loop", 4)]["status"] == "error" and "boom" in points[("loop", 4)]["note"]
    assert points[("loop", 1)]["status"] == points[("grouped_mm", 4)]["status"] == "ok"


def test_sweep_past_its_deadline_records_skips():
    from moecc.bench.kernel_sweep import run_sweep

    result = run_sweep(_sweep_cfg(deadline=0.0), Ceilings(1e10, 1e11), log=lambda s: None)
    assert len(result.points) == 4 and {p["status"] for p in result.points} == {"skipped"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bench_quick_on_gpu_runs_every_mode(tmp_path):
    from moecc.bench.run_all import BenchOptions, run

    results = run(BenchOptions(out=str(tmp_path), shapes=("qwen3-30b-a3b",), tokens=(1, 64),
                               implementations=("loop", "grouped_mm", "inductor_grouped_mm"), quick=True))
    status = {(p["impl"], p["tokens"], p["mode"]): p["status"] for p in results["points"]}
    assert status[("grouped_mm", 64, "graph")] == status[("inductor_grouped_mm", 1, "graph")] == "ok"
    assert status[("loop", 1, "graph")] == "n/a" and status[("loop", 1, "eager")] == "ok"
