"""Numerical verification: does the recognised spec reproduce the original region?

The region's nodes are copied into a standalone graph and run on fresh random hidden
states with the layer's real weights; the reference moecc op runs on the same inputs;
a spec is accepted only if every token agrees within the dtype's tolerance (fp32), or
all but a small fraction of near-tie routing flips do (fp16/bf16; moecc.tolerances).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.fx as fx

from moecc.capture.graph_utils import concrete_int, concrete_shape, example_value
from moecc.capture.recognise import Recognised
from moecc.capture.regions import Region
from moecc.spec import MoELayerSpec
from moecc.tolerances import ROUTING_FLIP_FRACTION, token_mismatch_fraction
from moecc.weights import make_weights


class CannotVerify(Exception):
    """The real values the check needs are not available (e.g. fake example inputs)."""


def region_module(gm: fx.GraphModule, region: Region, rec: Recognised) -> fx.GraphModule:
    """The region as a GraphModule taking its external inputs in `rec.externals` order."""
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for i, ext in enumerate(rec.externals):
        env[ext] = g.placeholder(f"in_{i}")
    for n in region.nodes:
        env[n] = g.node_copy(n, lambda x: env[x])
    g.output(env[rec.output])
    return fx.GraphModule(gm, g)


def verify(gm: fx.GraphModule, region: Region, rec: Recognised, real_values: dict[fx.Node, Any],
           seed: int = 0) -> tuple[Optional[MoELayerSpec], float]:
    """The first candidate spec that reproduces the region, and its mismatch fraction."""
    inputs = []
    hv = example_value(rec.hidden)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    device = None
    for ext in rec.externals:
        if ext is rec.hidden:
            inputs.append(None)  # filled below once the device is known
            continue
        value = real_values.get(ext)
        if isinstance(value, torch.SymInt):
            value = concrete_int(value)
        if value is None:
            ev = example_value(ext)
            if isinstance(ev, (int, torch.SymInt)):
                value = concrete_int(ev)
            else:
                raise CannotVerify(f"no real value for {ext.name}")
        if isinstance(value, torch.Tensor):
            if isinstance(value, torch._subclasses.FakeTensor):
                raise CannotVerify(f"{ext.name} is a fake tensor")
            device = value.device
        inputs.append(value)
    hidden = (torch.randn(concrete_shape(hv), generator=gen, dtype=torch.float32)).to(device=device, dtype=hv.dtype)
    inputs[rec.externals.index(rec.hidden)] = hidden

    module = region_module(gm, region, rec)
    from moecc.backends.reference import moe_layer

    weights = make_weights(**{role: real_values[node] for role, node in rec.weights.items()})
    with torch.no_grad():
        expected = module(*inputs)
        flat = hidden.reshape(-1, hidden.shape[-1])
        best = (None, 1.0)
        for spec in rec.candidates:
            actual = moe_layer(flat, weights, spec)
            frac = token_mismatch_fraction(actual, expected.reshape(flat.shape), hv.dtype)
            if frac <= ROUTING_FLIP_FRACTION[hv.dtype] and frac < best[1] or (frac == 0.0 and best[0] is None):
                best = (spec, frac)
                if frac == 0.0:
                    break
        if best[0] is not None and best[1] <= ROUTING_FLIP_FRACTION[hv.dtype]:
            return best
    return None, min(best[1], 1.0)
