"""passes/linear_precision.py: with options quantize_linears + precision, the non-expert
linear layers become moecc::quantized_linear over packed weights, computing the
reference definition (moecc/quantized_linear.reference_linear); nothing changes without
the option; a weight no format fits is left as it was, with the reason."""

from __future__ import annotations

import pytest
import torch

import moecc
from moecc.backends.reference.quantized import quantize_rows
from moecc.options import OptionsError
from moecc.quantized_linear import reference_linear
from moecc.tolerances import check_close


class TwoLinears(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(64, 128)
        self.down = torch.nn.Linear(128, 24, bias=False)  # 24 outputs; input 128 wide

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _compile(model, x, **options):
    # kernel_backend "reference" so that int8 activations are lowered as asked on every CPU
    # (with TVM kernels a CPU without VNNI takes them weight-only: the test at the end);
    # the quantized_linear op still runs on TVM wherever its kernels fit.
    report = moecc.CompileReport()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="moecc", options={"rest_of_graph": "eager", "report": report,
                                                              "kernel_backend": "reference", **options})
    return compiled(x), report


@pytest.mark.parametrize("precision,activations", [("int8", "float"), ("w8a8", "int8"),
                                                   ({"format": "int4", "group_size": 32}, "float")])
def test_linears_become_packed_and_compute_the_reference(precision, activations):
    torch.manual_seed(0)
    model, x = TwoLinears().eval(), torch.randn(3, 64)
    with torch.no_grad():
        out, report = _compile(model, x, precision=precision, quantize_linears=True)
    cfg = moecc.CompileOptions(precision=precision).precision
    fmt, group = cfg.weight_format, cfg.group_size or 0
    assert report.pass_counter("linear_precision", fmt) == 2 and report.pass_counter("linear_precision", "kept") == 0
    q_up, q_down = quantize_rows(model.up.weight, fmt, group), quantize_rows(model.down.weight, fmt, group)
    with torch.no_grad():
        h = torch.relu(reference_linear(x, q_up.packed, q_up.scales, model.up.bias, fmt, group, activations))
        expected = reference_linear(h, q_down.packed, q_down.scales, None, fmt, group, activations)
        plain = model(x)
    check_close(out, expected, torch.float32)
    assert (out - plain).abs().max() > 0  # the packed weights are what ran


def test_without_the_option_or_a_precision_nothing_changes():
    torch.manual_seed(1)
    model, x = TwoLinears().eval(), torch.randn(2, 64)
    with torch.no_grad():
        out, report = _compile(model, x, precision="int8")
        check_close(out, model(x), torch.float32)
        assert report.pass_counter("linear_precision", "int8") == 0
        out, report = _compile(model, x, quantize_linears=True)
        assert report.pass_counter("linear_precision", "int8") == 0


def test_a_weight_no_format_fits_is_kept_with_the_reason():
    torch.manual_seed(2)
    model, x = TwoLinears().eval(), torch.randn(2, 64)
    with torch.no_grad():
        out, report = _compile(model, x, precision={"format": "int4", "group_size": 48, "fallback": None},
                               quantize_linears=True)
        check_close(out, model(x), torch.float32)
    assert report.pass_counter("linear_precision", "kept") == 2
    notes = [n for g in report.graphs for p in g.passes if p.name == "linear_precision" for n in p.notes]
    assert any("group size 48 does not divide the reduction axis 64" in n for n in notes)


def test_quantize_linears_must_be_a_bool():
    with pytest.raises(OptionsError,
                       match="quantize_linears"):
        moecc.CompileOptions(quantize_linears="yes")


class QKV(torch.nn.Module):
    """Three bias-free projections of one input (an attention block's q / k / v) and a
    fourth linear with a bias on the same input, which stays its own op."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(64, n, bias=False) for n in (96, 32, 32))
        self.g = torch.nn.Linear(64, 16)

    def forward(self, x):
        q, k, v = self.q(x).view(*x.shape[:-1], 3, 32), self.k(x), self.v(x)  # the slice is viewed like q
        return torch.cat([(q * k.unsqueeze(-2)).sum(-1), v, self.g(x)], dim=-1)


@pytest.mark.parametrize("precision,activations", [("w8a8", "int8"), ({"format": "int4", "group_size": 32}, "float")])
def test_siblings_reading_one_input_become_one_op(precision, activations):
    """q, k and v go into one op over their stacked rows; each output is its columns, so the
    result is each linear's reference exactly as if lowered alone (the bias linear too)."""
    torch.manual_seed(2)
    model, x = QKV().eval(), torch.randn(2, 5, 64)
    with torch.no_grad():
        out, report = _compile(model, x, precision=precision, quantize_linears=True)
    cfg = moecc.CompileOptions(precision=precision).precision
    fmt, group = cfg.weight_format, cfg.group_size or 0
    assert report.pass_counter("linear_precision", fmt) == 4 and report.pass_counter("linear_precision", "merged") == 2

    def ref(lin):
        q = quantize_rows(lin.weight, fmt, group)
        return reference_linear(x, q.packed, q.scales, lin.bias, fmt, group, activations)

    with torch.no_grad():
        q, k, v = ref(model.q).view(2, 5, 3, 32), ref(model.k), ref(model.v)
        expected = torch.cat([(q * k.unsqueeze(-2)).sum(-1), v, ref(model.g)], dim=-1)
    check_close(out, expected, torch.float32)


@pytest.mark.tvm
def test_int8_activations_go_weight_only_on_tvm_without_vnni(monkeypatch):
    import moecc.backends.tvm.build as tvm_build

    monkeypatch.setattr(tvm_build, "host_has_vnni", lambda: False)
    torch.manual_seed(0)
    model, x = TwoLinears().eval(), torch.randn(3, 64)
    with torch.no_grad():
        out, report = _compile(model, x, precision="w8a8", quantize_linears=True, kernel_backend="tvm")
        q_up, q_down = quantize_rows(model.up.weight, "int8", 0), quantize_rows(model.down.weight, "int8", 0)
        h = torch.relu(reference_linear(x, q_up.packed, q_up.scales, model.up.bias, "int8", 0, "float"))
        expected = reference_linear(h, q_down.packed, q_down.scales, None, "int8", 0, "float")
    assert report.pass_counter("linear_precision", "int8") == 2
    notes = [n for g in report.graphs for p in g.passes if p.name == "linear_precision" for n in p.notes]
    assert sum("AVX512-VNNI" in n and "-> weight-only" in n for n in notes) == 2, notes
    check_close(out, expected, torch.float32)
    with pytest.raises(Exception, match="strict=True refuses"):
        _compile(model, x, precision={"format": "int8", "activations": "int8", "strict": True},
                 quantize_linears=True, kernel_backend="tvm")
