"""moecc: a torch.compile backend that compiles Mixture-of-Experts layers to fused kernels.

Use it through torch.compile; the backend is found by its entry point, no import needed:

    torch.compile(model, backend="moecc", options={"kernel_backend": "auto"})

`passes/` and `backends/` sit beside this package in the source tree and are installed as
`moecc.passes` and `moecc.backends` (pyproject's package-dir). Importing this package has
no side effects beyond making those two names resolvable from a source checkout.
"""

from __future__ import annotations

import os as _os

__version__ = "0.1.0"


def _extend_path_for_source_checkout() -> None:
    # In a source checkout run with PYTHONPATH=. (no install), passes/ and backends/ live
    # at the repository root; adding the root to this package's search path makes them
    # import as moecc.passes / moecc.backends, as they do once installed.
    root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    if _os.path.isfile(_os.path.join(root, "pyproject.toml")) and _os.path.isdir(
        _os.path.join(root, "passes")
    ):
        if root not in __path__:
            __path__.append(root)


_extend_path_for_source_checkout()


def __getattr__(name: str):
    # Lazy public API: importing moecc stays cheap and side-effect free.
    if name == "CompileReport":
        from moecc.capture.report import CompileReport

        return CompileReport
    if name == "use_compilable_experts":
        from moecc.hf import use_compilable_experts

        return use_compilable_experts
    if name in ("record_routing", "RoutingStats", "load_stats"):
        from moecc import routing_stats

        return getattr(routing_stats, name)
    if name in ("export_onnx", "import_onnx"):
        from moecc import onnx_export

        return getattr(onnx_export, name)
    if name == "quantize_":
        from moecc.quantize_module import quantize_

        return quantize_
    if name in ("save_quantized", "load_quantized"):
        from moecc import quantized_checkpoint

        return getattr(quantized_checkpoint, name)
    if name == "CompileOptions":
        from moecc.options import CompileOptions

        return CompileOptions
    raise AttributeError(f"module 'moecc' has no attribute {name!r}")
