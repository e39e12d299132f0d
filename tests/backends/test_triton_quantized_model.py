"""A shipped trained model compiled with precision lowering runs its quantised layers on
the Triton kernels, and scores what the reference op scores on the same packed weights.

Both runs quantise the same weights (int4 g32, weight-only) and compile with the rest of
the graph eager; only the kernel backend differs, so their held-out bits per byte agree
to fp32 kernel accuracy (the quantisation error itself is the same in both). On a CPU
the Triton run is the interpreter in a child process (triton_mode.py): slow, so marked.
"""

from __future__ import annotations

import math

import pytest
import torch
from triton_mode import triton_mode, whole_file_test  # noqa: F401  (autouse fixture)

from moecc.evaluate import evaluate

test_whole_file_in_interpreter_subprocess = pytest.mark.slow(whole_file_test(__file__))

OPTIONS = {"rest_of_graph": "eager", "precision": {"format": "int4", "group_size": 32}}


def _run(kernel_backend: str):
    torch._dynamo.reset()
    return evaluate("qwen3-moe-stdlib", dict(OPTIONS, kernel_backend=kernel_backend), max_bytes=64, batch=2,
                    seq_len=32, progress=False)


@pytest.mark.slow
def test_int4_layers_run_on_triton_and_match_the_reference_op():
    triton, ref = _run("triton"), _run("reference")
    assert triton.kernels.get("triton") == triton.moe_layers > 0, triton.kernels  # every layer on Triton
    assert ref.kernels.get("reference") == ref.moe_layers
    for t, r in zip([triton.overall, *triton.domains.values()], [ref.overall, *ref.domains.values()]):
        assert math.isfinite(t.compiled_bpb) and t.bytes_predicted == r.bytes_predicted > 0
        assert abs(t.compiled_bpb - r.compiled_bpb) <= 1e-4 * r.compiled_bpb, (t.domain, t.compiled_bpb, r.compiled_bpb)
        assert t.compiled_bpb != t.eager_bpb  # the weights really were quantised
