"""int8 / int4 experts end to end on the shipped trained model `qwen3-moe-stdlib`:
compiled with options={"precision": ...}, its logits stay close to eager and its
held-out bits per byte stay within the issue's bounds (int8 within 1%, int4 within 5%
of the original's).

The model's expert width is N = 64, so the default Int4WeightOnly(group_size=128)
falls back to int8 (tested: the group does not divide N); int4 is tested with
group_size 32. Bounds (docs/precision.md has the measured numbers and why), measured
2026-12-02 on these 2 x 128 held-out bytes with the TVM kernels:
    logits  RMS |compiled - eager| / RMS |eager| <= 3% (int8) and 10% (int4 g32);
            measured 0.9% and 3.0%. Per position, max |diff| / max |eager|: the 95th
            percentile <= 1% and 10%; measured 0.2% and 3.8%. Not the maximum: a token
            at a routing near-tie may pick another expert once its weights are rounded,
            which moves its logits by a whole expert's contribution (moecc/tolerances.py);
            measured 13% (int8) and 19% (int4) at the worst position.
    KL      mean KL(eager || compiled) per position <= 5e-3 (int8), 2e-2 (int4);
            measured 5.4e-4 and 3.6e-3.
    top-1   agreement with eager >= 99% (int8) and 95% (int4); measured 99.6% and 98.4%.
    bpb     relative change <= 1% (int8) and 5% (int4) (the issue's bounds), on 8 KiB
            per domain; docs/precision.md has the full held-out set.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from moecc.capture.report import CompileReport
from moecc.models import build_model
from moecc.precision import Int4WeightOnly

KERNELS = "tvm" if importlib.util.find_spec("tvm") else "reference"
INT4 = Int4WeightOnly(group_size=32)
# (name, precision, (rms, p95, mean KL) logit bounds, top-1 bound, bpb bound)
CASES = [("int8", "int8", (0.03, 0.01, 5e-3), 0.99, 0.01), ("int4", INT4, (0.10, 0.10, 2e-2), 0.95, 0.05)]


@pytest.fixture(scope="module")
def model():
    return build_model("qwen3-moe-stdlib").eval()


@pytest.fixture(scope="module")
def heldout_ids():
    from moecc.eval_data import domain_windows, load_texts
    from moecc.models import HELDOUT_DIR

    windows = domain_windows(load_texts(HELDOUT_DIR), seq_len=128)
    return torch.cat([windows["code"][:1], windows["english"][:1]])  # [2, 128] bytes


def _formats(report: CompileReport) -> dict:
    return next(dict(p.counters) for g in report.graphs for p in g.passes if p.name == "precision_lowering")


@pytest.mark.parametrize("name,precision,logit_bound,top1_bound,_bpb", CASES, ids=[c[0] for c in CASES])
def test_compiled_logits_close_to_eager(model, heldout_ids, name, precision, logit_bound, top1_bound, _bpb):
    torch._dynamo.reset()
    report = CompileReport()
    compiled = torch.compile(model, backend="moecc", options={
        "precision": precision, "kernel_backend": KERNELS, "rest_of_graph": "eager", "report": report})
    with torch.no_grad():
        eager = model(input_ids=heldout_ids).logits  # [2, 128, 256]
        out = compiled(input_ids=heldout_ids).logits
    counters = _formats(report)
    assert counters[name] == 3 and counters["dense"] == 0 and counters["fallbacks"] == 0
    assert torch.isfinite(out).all()
    rms_bound, p95_bound, kl_bound = logit_bound
    rms = ((out - eager).pow(2).mean() / eager.pow(2).mean()).sqrt().item()
    per_position = (out - eager).abs().amax(-1) / eager.abs().max()  # [2, 128]
    log_e, log_c = eager.double().log_softmax(-1), out.double().log_softmax(-1)
    kl = (log_e.exp() * (log_e - log_c)).sum(-1).mean().item()
    top1 = (out.argmax(-1) == eager.argmax(-1)).double().mean().item()
    assert 0 < rms <= rms_bound, rms  # > 0: the weights really changed
    assert per_position.flatten().quantile(0.95).item() <= p95_bound
    assert 0 < kl <= kl_bound, kl
    assert top1 >= top1_bound, top1


def test_default_int4_falls_back_to_int8_on_narrow_experts(model, heldout_ids):
    torch._dynamo.reset()
    report = CompileReport()
    compiled = torch.compile(model, backend="moecc", options={
        "precision": "int4", "kernel_backend": "reference", "rest_of_graph": "eager", "report": report})
    with torch.no_grad():
        compiled(input_ids=heldout_ids[:1, :16])
    counters = _formats(report)
    assert counters["int8"] == 3 and counters["fallbacks"] == 3
    notes = next(p.notes for g in report.graphs for p in g.passes if p.name == "precision_lowering")
    assert sum("group size 128 does not divide the reduction axis 64" in n for n in notes) == 3


@pytest.mark.parametrize("name,precision,_l,_t,bpb_bound", CASES, ids=[c[0] for c in CASES])
def test_heldout_bits_per_byte_within_bounds(name, precision, _l, _t, bpb_bound):
    from moecc.evaluate import evaluate

    torch._dynamo.reset()
    result = evaluate("qwen3-moe-stdlib", options={"precision": precision, "kernel_backend": KERNELS,
                                                   "rest_of_graph": "eager"},
                      max_bytes=8192, seq_len=128, progress=False)
    assert result.finite
    rel = result.overall.compiled_bpb / result.overall.eager_bpb - 1
    assert abs(rel) <= bpb_bound, rel
    assert result.overall.kl > 0  # quantised: not bit-identical to eager
