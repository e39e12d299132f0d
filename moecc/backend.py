"""The torch.compile backend: Dynamo graph in, compiled callable out.

Found through the `torch_dynamo_backends` entry point (pyproject.toml), so
`torch.compile(model, backend="moecc")` works without importing moecc; nothing is
registered at import time. Flow: options -> capture -> pass pipeline -> the rest of
the graph to Inductor (default) or eager.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx as fx

from moecc.options import CompileOptions

log = logging.getLogger("moecc")


def moecc_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], mode: Optional[str] = None,
                  options: Optional[dict] = None) -> Callable:
    opts = CompileOptions.from_torch_compile(options, mode)
    import moecc.ops  # noqa: F401  (defines the moecc custom ops)
    from moecc.capture import capture_moe_layers, real_input_values
    from moecc.weight_store import WeightStore
    from moecc.passes.context import PassContext
    from moecc.passes.pipeline import run_pipeline

    graph_report = capture_moe_layers(gm, example_inputs, opts)
    if graph_report.eager_experts_detected:
        from moecc.capture import EAGER_EXPERTS_HINT

        log.warning(EAGER_EXPERTS_HINT)
    ctx = PassContext(gm=gm, options=opts, real_values=real_input_values(gm, example_inputs),
                      weights=WeightStore(gm), device=_graph_device(example_inputs))
    graph_index = len(opts.report.graphs) if opts.report is not None else 0
    graph_report.passes = run_pipeline(ctx, graph_index)
    lowering = next((p for p in graph_report.passes if p.name == "lower_kernels"), None)
    graph_report.kernel_backend = ", ".join(f"{k}x{v}" for k, v in lowering.counters.items() if v) or "none"
    graph_report.rest_of_graph = opts.rest_of_graph
    if opts.report is not None:
        opts.report.graphs.append(graph_report)

    if opts.rest_of_graph == "eager":
        return gm.forward
    from torch._inductor.compile_fx import compile_fx

    patches = torch._inductor.list_mode_options(opts.mode) if opts.mode else {}
    return compile_fx(gm, example_inputs, config_patches=patches)


def _graph_device(example_inputs: Sequence[Any]) -> torch.device:
    for t in example_inputs:
        if isinstance(t, torch.Tensor) and t.device.type != "cpu":
            return t.device
    return torch.device("cpu")
