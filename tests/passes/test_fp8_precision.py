"""fp8 block-scaled experts in the precision options and the precision-lowering pass:
Fp8BlockScaled's validation, the "fp8" shorthand, the pass packing a layer to e4m3fn with
block scales under its SQNR bounds, the fallback chain, strict mode, and fp8 activations
("dynamic"), which no CPU can run: reported fallback to weight-only, or an error."""

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
from moecc.precision import (Fp8BlockScaled, Int8WeightOnly, PrecisionError, describe, format_name,  # noqa: E402
                             parse_precision)
from moecc.spec import MoELayerSpec  # noqa: E402
from moecc.tolerances import check_close  # noqa: E402
from moecc.weights import MOE_WEIGHT_FIELDS  # noqa: E402


def _lowered(precision, k=96, n=48):
    return lowered_layer(precision, k, n)


def test_fp8_config_shorthand_dict_and_defaults():
    assert CompileOptions(precision="fp8").precision == Fp8BlockScaled()
    cfg = parse_precision({"format": "fp8", "block": [64, 64], "activations": "dynamic", "fallback": "int8"})
    assert cfg.block == (64, 64) and cfg.activations == "dynamic" and cfg.fallback == Int8WeightOnly()
    assert Fp8BlockScaled.VERSION == 1 and Fp8BlockScaled().group_size == 128 and Fp8BlockScaled().fallback is None
    assert format_name(Fp8BlockScaled()) == "fp8 b128" and describe(Fp8BlockScaled()).endswith("-> dense")


@pytest.mark.parametrize("value,message", [
    ({"format": "fp8", "group_size": 128}, "valid: block, activations, min_weight_sqnr"),
    ({"format": "fp8", "activations": "int8"}, "activations must be one of ('weight_only', 'dynamic')"),
    ({"format": "fp8", "block": [128, 64]}, "only square blocks"),
    ({"format": "fp8", "block": 128}, "two positive ints"),
    ({"format": "fp16"}, "'format' one of ('int8', 'int4', 'fp8')"),
    ("fp8_e5m2", "'fp8', Int8WeightOnly"),
])
def test_bad_fp8_options_list_what_is_valid(value, message):
    with pytest.raises(OptionsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        CompileOptions(precision=value)


def test_fp8_layer_is_packed_with_block_scales_and_computes_the_decoded_layer():
    # K = 96, N = 48 with 64-blocks: short last blocks, a gate/up scale row holding both.
    ctx, result, node, spec, weights, values = _lowered(Fp8BlockScaled(block=(64, 64)))
    assert result.counters["fp8"] == 1 and result.counters["layers"] == 1 and result.counters["fallbacks"] == 0
    lowered = MoELayerSpec.from_json(node.args[-1])
    assert (lowered.experts.weight_format, lowered.experts.group_size, lowered.experts.activations) == \
        ("fp8", 64, "float")
    args = dict(zip(MOE_WEIGHT_FIELDS, node.args[1:-1]))
    gu, gus = ctx.value(args["gate_up"]), ctx.value(args["gate_up_scale"])
    dn, dns = ctx.value(args["down"]), ctx.value(args["down_scale"])
    assert gu.dtype == torch.float8_e4m3fn and tuple(gu.shape) == (8, 96, 96) and tuple(gus.shape) == (8, 2, 2)
    assert tuple(dn.shape) == (8, 96, 48) and tuple(dns.shape) == (8, 2, 1)
    assert ctx.value(args["router_weight"]) is weights.router_weight  # router untouched
    note = next(n for n in result.notes if n.startswith("layer") or "fp8 b64:" in n)
    assert "fp8 b64: weight SQNR >=" in note and "output SQNR" in note
    sqnr = float(note.split("weight SQNR >= ")[1].split(" dB")[0])
    assert 28.0 < sqnr < 40.0  # e4m3's 3 mantissa bits: ~31 dB on Gaussian weights
    dense = weights._replace(gate_up=dequantize(gu, gus, "fp8", group_size=64),
                             down=dequantize(dn, dns, "fp8", group_size=64))
    out = ctx.gm(*values)
    check_close(out, reference.moe_layer(values[0], dense, spec), torch.float32)
    assert not torch.equal(out, reference.moe_layer(values[0], weights, spec))  # really rounded


def test_fp8_bound_missed_falls_back_along_the_chain_and_says_why():
    _, result, node, *_ = _lowered(Fp8BlockScaled(min_weight_sqnr=60.0, fallback=Int8WeightOnly()))
    assert result.counters["int8"] == 1 and result.counters["fallbacks"] == 1
    assert MoELayerSpec.from_json(node.args[-1]).experts.weight_format == "int8"
    assert any("fp8 b128: weight SQNR" in n and "(bound 60)" in n and "-> fallback" in n for n in result.notes)
    _, result, node, spec, *_ = _lowered(Fp8BlockScaled(min_output_sqnr=90.0))  # fp8 -> original
    assert result.counters["dense"] == 1 and node.args[-1] == spec.to_json()
    with pytest.raises(PrecisionError, match="strict=True refuses to fall back"):
        _lowered(Fp8BlockScaled(min_weight_sqnr=60.0, strict=True))


def test_fp8_activations_on_cpu_fall_back_to_weight_only_reported_or_raise_with_strict():
    ctx, result, node, spec, weights, values = _lowered(Fp8BlockScaled(block=(32, 32), activations="dynamic"))
    lowered = MoELayerSpec.from_json(node.args[-1])
    assert (lowered.experts.weight_format, lowered.experts.activations) == ("fp8", "float")
    assert any("fp8 b32: weight SQNR" in n and "fp8 b32 dynamic: fp8 activations need fp8 arithmetic, which CPUs "
               "do not have -> weight_only" in n for n in result.notes)
    with pytest.raises(PrecisionError, match="fp8 activations need fp8 arithmetic.*strict=True"):
        _lowered(Fp8BlockScaled(activations="dynamic", strict=True))


@pytest.mark.tvm
def test_lowering_binds_fp8_layers_to_tvm_on_cpu_and_matches_the_reference():
    ctx, _, node, _, weights, values = _lowered("fp8")
    result = lower_kernels.run(context(ctx.gm, [], kernel_backend="tvm"))
    assert result.counters["tvm"] == 1
    ctx.gm.recompile()
    args = dict(zip(MOE_WEIGHT_FIELDS, node.args[1:-1]))
    packed = weights._replace(**{f: ctx.value(args[f]) for f in ("gate_up", "down", "gate_up_scale", "down_scale")})
    check_close(ctx.gm(*values), reference.moe_layer(values[0], packed, MoELayerSpec.from_json(node.args[-1])),
                torch.float32)


def test_onnx_export_refuses_fp8_experts_instead_of_misreading_them():
    """QMoE reads int8 / int4 only, and the decomposed fallback has no fp8 decoder yet:
    an fp8 layer is never written as if its bytes were integers."""
    from moecc.onnx_export.decompose import _expert_stacks
    from moecc.onnx_export.ort_ops import ort_experts_unsupported

    ctx, _, node, *_ = _lowered("fp8")
    spec = MoELayerSpec.from_json(node.args[-1])
    assert any("fp8" in why for why in ort_experts_unsupported(spec))
    weights = dict(zip(MOE_WEIGHT_FIELDS, (ctx.value(n) if n is not None else None for n in node.args[1:-1])))
    from moecc.weights import MoEWeights
    with pytest.raises(NotImplementedError, match="does not write fp8"):
        _expert_stacks(MoEWeights(**weights), spec, torch.float32)
