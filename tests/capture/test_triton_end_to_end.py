"""Capture -> expert fusion -> Triton kernels, end to end, in the Triton interpreter (fp32).

Triton reads TRITON_INTERPRET when it is first imported, so the check runs in a child
process with the interpreter on; on a GPU the `gpu` test runs it in bf16 in-process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

SCRIPT = textwrap.dedent("""
    import warnings, torch, moecc
    warnings.simplefilter("ignore")
    from moecc.models import build_model
    for name in ["qwen3-moe-tiny", "deepseek-v3-tiny", "gpt-oss-tiny"]:
        torch._dynamo.reset()
        m = build_model(name)
        r = moecc.CompileReport()
        c = torch.compile(m, backend="moecc", fullgraph=True,
                          options={"report": r, "kernel_backend": "triton", "rest_of_graph": "eager"})
        ids = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            a, b = m(ids).logits, c(ids).logits
        assert torch.isfinite(b).all(), name
        err = ((a - b).abs().max() / a.abs().max()).item()
        assert err < 1e-5, (name, err)
        assert r.pass_counter("lower_kernels", "triton") == 2, r.format()
        print(name, "ok", err)
""")


def test_models_run_on_triton_kernels_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.count(" ok ") == 3


@pytest.mark.gpu
def test_models_run_on_triton_kernels_on_the_gpu_bf16():
    from model_checks import assert_logits_close

    import moecc
    from moecc.models import build_model

    for name in ["qwen3-moe-tiny", "deepseek-v3-tiny", "gpt-oss-tiny", "mixtral-tiny"]:
        torch._dynamo.reset()
        m = build_model(name, dtype=torch.bfloat16, device="cuda")
        r = moecc.CompileReport()
        c = torch.compile(m, backend="moecc", fullgraph=True, options={"report": r, "kernel_backend": "triton"})
        ids = torch.randint(0, 256, (2, 7), device="cuda")
        with torch.no_grad():
            assert_logits_close(c(ids).logits, m(ids).logits)
        assert r.pass_counter("lower_kernels", "triton") == 2
