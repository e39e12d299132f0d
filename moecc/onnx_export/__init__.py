"""ONNX export and import of moecc-captured MoE models (docs/onnx.md).

    report = moecc.export_onnx(model, (input_ids,), "model.onnx", precision=None)
    module = moecc.import_onnx("model.onnx")
    report = moecc.onnx_export.export_onnx_decoder(model, "decoder.onnx")   # decode step + KV cache
    result = moecc.onnx_export.OnnxDecoder("decoder.onnx").greedy(input_ids, new_tokens=32)

Export: each MoE layer becomes onnxruntime's fused com.microsoft.MoE (QMoE for int8 /
int4 experts) where that operator expresses the layer, standard ONNX ops otherwise
(export.py); `export_onnx_decoder` writes the decode step with its KV cache as inputs and
outputs, and `OnnxDecoder` decodes greedily over it in onnxruntime (decoder.py). Import: an ONNX file written by export_onnx becomes a torch module whose
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


def export_onnx_decoder(model, path, precision=None, **kwargs):
    """Write `model`'s decode step with its KV cache (moecc.onnx_export.decoder.export_onnx_decoder)."""
    from moecc.onnx_export.decoder import export_onnx_decoder as _export

    return _export(model, path, precision, **kwargs)


def __getattr__(name):
    if name == "OnnxDecoder":  # onnxruntime is imported only when a decoder is built
        from moecc.onnx_export.decoder import OnnxDecoder

        return OnnxDecoder
    raise AttributeError(name)
