"""The shipped trained models on the Triton kernels match eager (the bounds of trained_eval.py).

On a CPU this file runs in the Triton interpreter in a child process (triton_mode.py);
the interpreter is slow, so the slice is small: 2 windows of 64 bytes per domain.
"""

from __future__ import annotations

import pytest
import torch
from triton_mode import triton_mode, whole_file_test  # noqa: F401  (autouse fixture)

from moecc.evaluate import evaluate
from moecc.models import TRAINED_MODELS
from trained_eval import assert_matches_eager

test_whole_file_in_interpreter_subprocess = whole_file_test(__file__)


@pytest.mark.parametrize("name", TRAINED_MODELS)
def test_triton_kernels_match_eager(name):
    torch._dynamo.reset()
    result = evaluate(name, {"kernel_backend": "triton", "rest_of_graph": "eager"}, max_bytes=128, batch=2,
                      seq_len=64, progress=False)
    assert result.overall.bytes_predicted >= 2 * 2 * 63
    assert_matches_eager(result, "triton")
