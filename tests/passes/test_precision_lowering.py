"""The precision-lowering pass and options["precision"]: formats chosen under SQNR
bounds, the fallback chain, strict mode, validation messages, and the numerics of the
lowered graph (it must compute the reference op on the dequantised weights)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from graph_builders import context, lowered_layer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "backends"))

from moecc.backends import reference  # noqa: E402
from moecc.backends.reference.quantized import dequantize  # noqa: E402
from moecc.options import CompileOptions, OptionsError  # noqa: E402
from moecc.passes import lower_kernels  # noqa: E402
from moecc.precision import Int4WeightOnly, Int8WeightOnly, PrecisionError, parse_precision  # noqa: E402
from moecc.spec import MoELayerSpec  # noqa: E402
from moecc.tolerances import check_close  # noqa: E402
from moecc.weights import MOE_WEIGHT_FIELDS  # noqa: E402


def _lowered(precision, k=64, n=32, **options):
    # The reference kernels by default: the pass then lowers exactly what was asked on every
    # CPU (with TVM kernels, int8 activations depend on the CPU: see the VNNI tests below).
    return lowered_layer(precision, k, n, **{"kernel_backend": "reference", **options})


def test_options_parse_shorthands_dicts_and_configs():
    assert CompileOptions(precision="int8").precision == Int8WeightOnly()
    assert CompileOptions(precision="int4").precision == Int4WeightOnly(group_size=128)
    assert CompileOptions(precision={"format": "int4", "group_size": 32}).precision.group_size == 32
    assert CompileOptions(precision=None).precision is None and CompileOptions(precision="dense").precision is None
    assert CompileOptions(precision="w8a8").precision == Int8WeightOnly(activations="int8")
    w4a8 = CompileOptions(precision="w4a8").precision
    assert w4a8.activations == "int8" and w4a8.fallback == Int8WeightOnly(activations="int8")
    assert CompileOptions(precision={"format": "int4", "activations": "int8"}).precision.activations == "int8"
    cfg = Int4WeightOnly(group_size=64, fallback=None, strict=True)
    assert CompileOptions.from_torch_compile({"precision": cfg}).precision is cfg


@pytest.mark.parametrize("value,message", [
    ("fp4", "valid: None, 'dense', 'int8', 'int4'"),
    ({"format": "int4", "groupsize": 32}, "valid: group_size, min_weight_sqnr"),
    ({"format": "int2"}, "'format' one of"),
    ({"format": "int8", "activations": "fp8"}, "activations must be one of"),
    (3, "must be None, a string"),
])
def test_bad_precision_options_list_what_is_valid(value, message):
    with pytest.raises(OptionsError, match=message.replace("(", r"\(")):
        CompileOptions(precision=value)


def test_int4_group_size_must_be_even():
    with pytest.raises(PrecisionError, match="even"):
        Int4WeightOnly(group_size=3)
    assert parse_precision({"format": "int4", "fallback": "int8"}).fallback == Int8WeightOnly()


def test_int4_layer_is_packed_and_computes_the_dequantised_layer():
    ctx, result, node, spec, weights, values = _lowered(Int4WeightOnly(group_size=16))
    assert result.counters["int4"] == 1 and result.counters["layers"] == 1 and result.counters["fallbacks"] == 0
    lowered = MoELayerSpec.from_json(node.args[-1])
    assert (lowered.experts.weight_format, lowered.experts.group_size) == ("int4", 16)
    args = dict(zip(MOE_WEIGHT_FIELDS, node.args[1:-1]))
    packed, scales = ctx.value(args["gate_up"]), ctx.value(args["gate_up_scale"])
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == (8, 64, 32) and tuple(scales.shape) == (8, 64, 4)
    assert ctx.value(args["router_weight"]) is weights.router_weight  # router untouched
    assert result.counters["packed_kib"] == (packed.numel() + scales.numel() * 4 + ctx.value(args["down"]).numel()
                                             + ctx.value(args["down_scale"]).numel() * 4) // 1024
    assert any("int4 g16: weight SQNR >=" in note and "output SQNR" in note for note in result.notes)
    x = values[0]
    dense = weights._replace(gate_up=dequantize(packed, scales, "int4"),
                             down=dequantize(ctx.value(args["down"]), ctx.value(args["down_scale"]), "int4"))
    check_close(ctx.gm(*values), reference.moe_layer(x, dense, spec), torch.float32)


def test_group_that_does_not_divide_k_falls_back_to_int8_and_says_why():
    _, result, node, *_ = _lowered(Int4WeightOnly(group_size=128))  # K = 64
    assert result.counters["int8"] == 1 and result.counters["fallbacks"] == 1
    assert MoELayerSpec.from_json(node.args[-1]).experts.weight_format == "int8"
    assert any("group size 128 does not divide the reduction axis 64 -> fallback" in n for n in result.notes)


def test_impossible_bound_keeps_the_original_weights():
    _, result, node, spec, weights, _ = _lowered(Int4WeightOnly(group_size=16, min_output_sqnr=200.0,
                                                                fallback=Int8WeightOnly(min_weight_sqnr=200.0)))
    assert result.counters["dense"] == 1 and result.counters["layers"] == 0
    assert node.args[-1] == spec.to_json()
    assert any("kept torch.float32" in n and "bound 200" in n for n in result.notes)


@pytest.mark.parametrize("config", [Int8WeightOnly(min_weight_sqnr=200.0, strict=True),
                                    Int4WeightOnly(group_size=128, strict=True)])
def test_strict_raises_instead_of_falling_back(config):
    with pytest.raises(PrecisionError, match="strict=True refuses to fall back"):
        _lowered(config)


def test_no_precision_is_a_no_op():
    _, result, node, spec, *_ = _lowered(None)
    assert result.counters["layers"] == 0 and node.args[-1] == spec.to_json()


@pytest.mark.tvm
def test_lowering_binds_quantised_layers_to_tvm_on_cpu():
    ctx, *_ = _lowered("int8")
    ctx = context(ctx.gm, [], kernel_backend="tvm")
    result = lower_kernels.run(ctx)
    assert result.counters["tvm"] == 1


def test_int8_activation_config_reaches_the_spec_and_the_report():
    ctx, result, node, spec, weights, values = _lowered("w4a8")  # g128 misfits K = 64 -> w8a8
    lowered = MoELayerSpec.from_json(node.args[-1])
    assert (lowered.experts.weight_format, lowered.experts.activations) == ("int8", "int8")
    assert any("int8 per-row a8: weight SQNR" in n for n in result.notes)
    assert any("int4 g128 a8: group size 128 does not divide" in n for n in result.notes)
    # The lowered layer computes the reference's fake-quantised math, not the weight-only one.
    args = dict(zip(MOE_WEIGHT_FIELDS, node.args[1:-1]))
    quantised = weights._replace(**{f: ctx.value(args[f]) for f in ("gate_up", "down", "gate_up_scale",
                                                                     "down_scale")})
    check_close(ctx.gm(*values), reference.moe_layer(values[0], quantised, lowered), torch.float32)
    weight_only = reference.moe_layer(values[0], quantised, lowered.replace(experts={"activations": "float"}))
    assert (ctx.gm(*values) - weight_only).abs().max() > 1e-5


@pytest.mark.tvm
def test_lowering_binds_int8_activation_layers_to_tvm_only_where_vnni_fits():
    from moecc.backends.tvm.build import host_has_vnni

    ctx, *_ = _lowered({"format": "int8", "group_size": 8, "activations": "int8"})  # 8 < one 16-byte step
    result = lower_kernels.run(context(ctx.gm, [], kernel_backend="tvm"))
    assert result.counters["reference"] == 1
    assert any("int8 activations:" in n and "kept on the reference kernels" in n for n in result.notes)
    ctx, *_ = _lowered("w8a8")
    result = lower_kernels.run(context(ctx.gm, [], kernel_backend="tvm"))
    assert result.counters["tvm" if host_has_vnni() else "reference"] == 1


@pytest.mark.tvm
@pytest.mark.parametrize("vnni", [False, True])
def test_int8_activations_go_weight_only_on_tvm_without_vnni(monkeypatch, vnni):
    import moecc.backends.tvm.build as tvm_build

    monkeypatch.setattr(tvm_build, "host_has_vnni", lambda: vnni)
    _, result, node, *_ = _lowered("w8a8", kernel_backend="tvm")
    lowered = MoELayerSpec.from_json(node.args[-1])
    assert (lowered.experts.weight_format, lowered.experts.activations) == ("int8", "int8" if vnni else "float")
    assert result.counters["fallbacks"] == int(not vnni)
    reported = any("AVX512-VNNI" in n and "-> weight-only" in n for n in result.notes)
    assert reported == (not vnni)
    if not vnni:
        with pytest.raises(PrecisionError, match="AVX512-VNNI.*strict=True refuses"):
            _lowered({"format": "int8", "activations": "int8", "strict": True}, kernel_backend="tvm")
