"""Test support: run the Triton kernels on the CPU under the Triton interpreter.

Triton decides between compiled and interpreted kernels when `@triton.jit` runs, i.e.
when a module defining kernels is imported, and that includes triton's own standard
library (`tl.max`, `tl.sigmoid`, ... are jit functions decorated at `import triton`).
So TRITON_INTERPRET=1 must be in the environment before triton is first imported in the
process; it cannot be switched on afterwards, and switching it on for a whole pytest
session would change how every other test uses triton. The kernel test modules
therefore run in-process only when the process was started with the variable
(`interpreter_usable()`), and otherwise run themselves in a child process that has it
(`run_in_subprocess`). For tests only.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

# Dependency order: a module is reloaded after the modules it imports kernels from.
KERNEL_MODULES = ("weight_load", "routing", "align", "grouped_gemm", "combine", "moe")
_TRUE = ("1", "true", "on", "yes")


def interpreter_usable() -> bool:
    """Whether kernels launched from now on can run under the interpreter in this process."""
    if os.environ.get("TRITON_INTERPRET", "0").lower() not in _TRUE:
        return False
    if "triton" not in sys.modules:
        return True  # triton will be imported in interpreter mode
    import triton.language.standard as standard
    from triton.runtime.jit import JITFunction

    return not isinstance(standard.max, JITFunction)


def _holds_compiled_kernels(module) -> bool:
    from triton.runtime.jit import JITFunction

    return any(isinstance(v, JITFunction) for v in vars(module).values())


def use_interpreter() -> None:
    """Make the moecc kernels interpreted: re-import kernel modules decorated otherwise.

    Requires `interpreter_usable()`; raises RuntimeError otherwise.
    """
    if not interpreter_usable():
        raise RuntimeError("triton was imported without TRITON_INTERPRET=1; the interpreter cannot be "
                           "enabled in this process (set the variable before anything imports triton)")
    loaded = [sys.modules[f"moecc.backends.triton.{m}"] for m in KERNEL_MODULES
              if f"moecc.backends.triton.{m}" in sys.modules]
    if any(_holds_compiled_kernels(m) for m in loaded):
        for module in loaded:  # dependency order, so re-imported names are the new kernels
            importlib.reload(module)


def run_in_subprocess(test_file: str, timeout: float = 600, markexpr: str = "") -> subprocess.CompletedProcess:
    """Run one pytest file in a fresh interpreter-mode Python process (repo root on the path).

    `markexpr`: the parent session's `-m` expression, so `make test` (-m "not slow") does
    not run the file's slow tests in the child."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH", "")]))
    marks = ["-m", markexpr] if markexpr else []
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *marks, test_file],
                          env=env, capture_output=True, text=True, timeout=timeout, cwd=root)
