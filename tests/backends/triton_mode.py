"""How Triton kernel tests run: compiled on a GPU, else under the Triton interpreter.

Triton fixes interpreter mode when it is first imported, so on a CPU a test file runs
in-process only if pytest was started with TRITON_INTERPRET=1; otherwise its tests skip
here and `whole_file_in_interpreter_subprocess` reruns the whole file in a child process
that has it (setting it in this process would leak into every later test).

Use in a test file:
    from triton_mode import triton_mode, whole_file_test  # noqa: F401  (autouse fixture)
    test_whole_file_in_interpreter_subprocess = whole_file_test(__file__)
"""

from __future__ import annotations

import pytest
import torch

CUDA = torch.cuda.is_available()
SUBPROCESS_TEST = "test_whole_file_in_interpreter_subprocess"


def interpreting() -> bool:
    from moecc.backends.triton import testing

    return testing.interpreter_usable()


@pytest.fixture(autouse=True)
def triton_mode(request):
    if CUDA or request.node.name == SUBPROCESS_TEST:
        return
    if not interpreting():
        pytest.skip(f"CPU without TRITON_INTERPRET=1: this file runs in a child process instead ({SUBPROCESS_TEST})")
    from moecc.backends.triton import testing

    testing.use_interpreter()


def whole_file_test(path: str):
    def test_whole_file_in_interpreter_subprocess(request):
        """CPU only: every test of this file under the interpreter, in a fresh process
        (selected by this session's -m expression: `make test` skips the slow ones there too)."""
        if CUDA or interpreting():
            pytest.skip("the tests run in this process")
        from moecc.backends.triton import testing

        proc = testing.run_in_subprocess(path, markexpr=request.config.getoption("markexpr") or "")
        assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]

    return test_whole_file_in_interpreter_subprocess
