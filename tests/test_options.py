"""Options: typed, validated; an unknown key is an error that lists the valid ones."""

from __future__ import annotations

import pytest
import torch

from moecc.options import CompileOptions, OptionsError


def test_unknown_key_lists_valid_options():
    with pytest.raises(OptionsError) as info:
        CompileOptions.from_torch_compile({"kernel_backnd": "triton"})
    msg = str(info.value)
    assert "kernel_backnd" in msg and "kernel_backend" in msg and "rest_of_graph" in msg


@pytest.mark.parametrize("key, value, fragment", [
    ("kernel_backend", "cuda", "'auto', 'reference', 'triton', 'tvm'"),
    ("rest_of_graph", "aot", "'inductor', 'eager'"),
    ("verify_capture", "yes", "True or False"),
    ("mode", "fast", "reduce-overhead"),
    ("report", {}, "CompileReport"),
])
def test_bad_values_say_what_is_allowed(key, value, fragment):
    with pytest.raises(OptionsError, match=fragment):
        CompileOptions.from_torch_compile({key: value})


def test_mode_from_torch_compile_or_options_but_not_conflicting():
    assert CompileOptions.from_torch_compile(None, "reduce-overhead").mode == "reduce-overhead"
    assert CompileOptions.from_torch_compile({"mode": "max-autotune"}).mode == "max-autotune"
    with pytest.raises(OptionsError, match="mode given twice"):
        CompileOptions.from_torch_compile({"mode": "max-autotune"}, "reduce-overhead")


def test_bad_option_fails_torch_compile_clearly():
    model = torch.nn.Linear(4, 4)
    compiled = torch.compile(model, backend="moecc", options={"not_an_option": 1})
    with pytest.raises(Exception, match="unknown moecc option"):
        compiled(torch.randn(2, 4))


def test_backend_is_found_through_the_entry_point_only():
    from importlib.metadata import entry_points

    eps = [ep for ep in entry_points(group="torch_dynamo_backends") if ep.name == "moecc"]
    assert len(eps) == 1 and eps[0].value == "moecc.backend:moecc_backend"
    import subprocess
    import sys

    # In a fresh interpreter, importing moecc registers nothing with Dynamo; the name
    # resolves only through the entry point when torch.compile looks it up.
    code = ("import moecc, torch._dynamo.backends.registry as r; "
            "print('moecc' in r._COMPILER_FNS); r.lookup_backend('moecc'); print('moecc' in r._COMPILER_FNS)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True"]
