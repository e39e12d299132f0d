"""lower_kernels, Before/Expected: layer nodes rebind to the chosen kernel backend's op."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from graph_builders import context, layer_graph

from moecc.passes import lower_kernels
from moecc.spec import ExpertSpec, MoELayerSpec, RouterSpec
from moecc.weights import make_weights


def _layer(canonical=True):
    spec = MoELayerSpec(RouterSpec(4, 2), ExpertSpec(16, 8, gate_up_layout="concat" if canonical else "interleaved"))
    w = make_weights(router_weight=torch.randn(4, 16), gate_up=torch.randn(4, 16, 16), down=torch.randn(4, 16, 8))
    return layer_graph(w, spec)


def _target(gm):
    return next(n for n in gm.graph.nodes if n.op == "call_function").target


def test_reference_backend_keeps_the_reference_op():
    gm, values = _layer()
    result = lower_kernels.run(context(gm, values, kernel_backend="reference"))
    assert _target(gm) is torch.ops.moecc.moe_layer.default
    assert result.counters == {"triton": 0, "tvm": 0, "reference": 1}


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    gm, values = _layer()
    with pytest.raises(lower_kernels.KernelBackendUnavailable, match="CUDA GPU.*'auto'"):
        lower_kernels.run(context(gm, values, kernel_backend="triton"))


@pytest.mark.skipif(importlib.util.find_spec("tvm") is None, reason="needs apache-tvm")
def test_auto_on_cpu_picks_tvm_when_installed():
    gm, values = _layer()
    result = lower_kernels.run(context(gm, values, kernel_backend="auto"))
    assert _target(gm) is torch.ops.moecc.moe_layer_tvm.default
    assert result.counters["tvm"] == 1


def test_non_canonical_layer_stays_on_reference_kernels():
    gm, values = _layer(canonical=False)
    result = lower_kernels.run(context(gm, values, kernel_backend="auto"))
    assert _target(gm) is torch.ops.moecc.moe_layer.default
    assert any("not canonical" in n for n in result.notes)
