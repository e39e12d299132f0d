"""ONNX export and import of moecc-captured MoE models (docs/onnx.md).

    report = moecc.export_onnx(model, (input_ids,), "model.onnx", precision=None)
    module = moecc.import_onnx("model.onnx")

Export: each MoE layer becomes onnxruntime's fused com.microsoft.MoE (QMoE for int8 /
int4 experts) where that operator expresses the layer, standard ONNX ops otherwise
(export.py). Import: an ONNX file written by export_onnx becomes a torch module whose
MoE layers are moecc ops (importer.py). Needs the `onnx` extra: pip install 'moecc[onnx]'.
Nothing is imported from onnx / onnxscript / onnxruntime until a function is called.
"""

from __future__ import annotations


def export_onnx(model, example_inputs, path, precision=None, **kwargs):
    """Write `model` as ONNX at `path`; returns an ExportReport (moecc.onnx_export.export.export_onnx)."""
    from moecc.onnx_export.export import export_onnx as _export

    return _export(model, example_inputs, path, precision, **kwargs)


def import_onnx(path, **kwargs):
    """An ONNX file from export_onnx as a torch module (moecc.onnx_export.importer.import_onnx)."""
    from moecc.onnx_export.importer import import_onnx as _import

    return _import(path, **kwargs)
