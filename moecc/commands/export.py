"""`moecc export`: build the TVM MoE kernels ahead of time, or write the model as ONNX.

    moecc export --model qwen3-moe-tiny --target cuda --arch 90 --out DIR
    moecc export --model path/to/config.json --target cuda --arch 90 89 86 --out DIR
    moecc export --shape E=128,N=768,K=2048,topk=8 --target llvm --dtype float32 --out DIR

DIR gets one .so per kernel configuration (+ a .cubin per CUDA arch), manifest.json and,
with --with-runtime, lib/ holding libtvm_runtime*.so: with the apache-tvm-ffi wheel that
is all a machine needs to run them (moecc.backends.tvm.load_kernels(DIR)). No GPU is
needed to export; CUDA exports need nvcc.
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="build the TVM MoE kernels ahead of time (llvm or cuda), or write the model as ONNX",
        description="Compile the TVM MoE kernels for a model's MoE layer shape and write them, with a "
                    "manifest, to --out; load them with moecc.backends.tvm.load_kernels(DIR), which needs "
                    "only the TVM runtime. With --format onnx: write the whole model to --out/model.onnx "
                    "with onnxruntime's fused MoE / QMoE operators, checked with onnxruntime (docs/onnx.md).")
    p.add_argument("--format", choices=["tvm", "onnx"], default="tvm",
                   help="tvm: the MoE kernels as shared libraries (default); onnx: the whole model as ONNX "
                        "with onnxruntime's fused MoE operators (needs pip install 'moecc[onnx]')")
    p.add_argument("--precision", choices=["int8", "int4"], default=None,
                   help="onnx only: lower the routed experts to int8 / int4 (QMoE), as options={'precision': ...}")
    p.add_argument("--group-size", type=int, default=None, metavar="G",
                   help="onnx only, with --precision: scales per G weights along the reduction axis "
                        "(QMoE needs a power of two >= 16; default: the precision config's)")
    p.add_argument("--standard-ops", action="store_true",
                   help="onnx only: every MoE layer in standard ONNX ops, no onnxruntime com.microsoft operators")
    p.add_argument("--decoder", action="store_true",
                   help="onnx only: write the decode step with its KV cache as inputs / outputs (decoder.onnx; "
                        "run it with moecc.onnx_export.OnnxDecoder) instead of one cache-less forward")
    p.add_argument("--tokens-per-example", type=int, default=16, metavar="S",
                   help="onnx only: sequence length of the example input (batch 2); dynamic in the file")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a built-in model name (see moecc.models) or a transformers config.json")
    src.add_argument("--shape", help="E=..,N=..,K=..,topk=.. (routed experts, intermediate, hidden, top-k)")
    p.add_argument("--target", choices=["cuda", "llvm"], default="cuda")
    p.add_argument("--arch", nargs="+", type=int, default=[90], metavar="SM",
                   help="CUDA compute capabilities, e.g. 90 89 86 (cuda only)")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                   help="kernel dtype (default: float32 for --target llvm, float16 for cuda)")
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 64, 1024], metavar="M",
                   help="token-count buckets; each picks its tuned configuration")
    p.add_argument("--with-runtime", action="store_true", help="copy the TVM runtime libraries to DIR/lib")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=main)


def layer_spec_from_model(name_or_path: str):
    """The MoELayerSpec of a model's MoE layers (activation, biases, shared experts)."""
    from moecc.models import load_config, moe_shape_from_config
    from moecc.spec import ExpertSpec, MoELayerSpec, RouterSpec

    config = load_config(name_or_path)
    shape = moe_shape_from_config(config, name_or_path)
    model_type = getattr(config, "model_type", "")
    gpt_oss = model_type == "gpt_oss"
    shared = int(getattr(config, "n_shared_experts", 0) or 0)
    return MoELayerSpec(
        RouterSpec(shape.num_experts, shape.top_k, scoring="topk_softmax" if gpt_oss else "softmax"),
        ExpertSpec(shape.hidden_size, shape.intermediate_size,
                   activation="swiglu_oai" if gpt_oss else "silu", has_bias=gpt_oss,
                   num_shared=shared, shared_fused=bool(shared)),
        source=name_or_path,
    )


def parse_shape(text: str):
    from moecc.shapes import MoEShape

    fields = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        fields[name.strip().lower()] = int(value)
    try:
        return MoEShape("shape", fields["e"], fields["topk"], fields["k"], fields["n"])
    except KeyError as exc:
        raise ValueError(f"--shape needs E=..,N=..,K=..,topk=.. ; missing {exc}") from exc


def main(args: argparse.Namespace) -> int:
    if args.format == "onnx":
        return export_onnx_main(args)
    try:
        from moecc.backends.tvm.runtime import tvm_importable
    except ImportError as exc:  # pragma: no cover - broken checkout
        print(f"moecc export: {exc}", file=sys.stderr)
        return 2
    if not tvm_importable():
        print("moecc export needs apache-tvm (pip install 'moecc[tvm]')", file=sys.stderr)
        return 2
    from moecc.backends.tvm.export import export_kernels

    try:
        layer = layer_spec_from_model(args.model) if args.model else parse_shape(args.shape)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        print(f"moecc export: {exc}", file=sys.stderr)
        return 2
    dtype = args.dtype or ("float32" if args.target == "llvm" else "float16")
    manifest = export_kernels([layer], args.target, args.out, arch=args.arch, dtype=dtype,
                              token_buckets=args.tokens, include_runtime=args.with_runtime)
    import json

    entries = json.loads(manifest.read_text())["entries"]
    print(f"wrote {len(entries)} kernel module(s) and {manifest}")
    for e in entries:
        print(f"  {e['file']}" + (f"  + {e['cubin']}" if e["cubin"] else "") + f"  (T >= {e['min_tokens']})")
    return 0


def export_onnx_main(args: argparse.Namespace) -> int:
    """`--format onnx`: the whole model (built-in name, trained name or trained folder) as ONNX."""
    import os

    if not args.model:
        print("moecc export --format onnx needs --model (a built-in or trained model, or a trained folder)",
              file=sys.stderr)
        return 2
    from moecc.onnx_export.export import require_onnx

    try:
        require_onnx()
    except ImportError as exc:
        print(f"moecc export: {exc}", file=sys.stderr)
        return 2
    import torch

    from moecc.models import build_model, load_config
    from moecc.onnx_export import export_onnx
    from moecc.onnx_export.export import OnnxExportError

    try:
        model = build_model(args.model)
        vocab = int(load_config(args.model).vocab_size)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        print(f"moecc export: {exc}", file=sys.stderr)
        return 2
    path = os.path.join(args.out, "decoder.onnx" if args.decoder else "model.onnx")
    precision = args.precision
    if precision and args.group_size:
        precision = {"format": precision, "group_size": args.group_size}
    try:
        if args.decoder:
            from moecc.onnx_export import export_onnx_decoder

            report = export_onnx_decoder(model.eval(), path, precision, onnxruntime_ops=not args.standard_ops)
        else:
            model.config.use_cache = False  # one forward, logits out; no KV cache in the graph
            # Batch 2: torch.export specialises size-1 dimensions, and both should stay dynamic.
            example = torch.randint(0, vocab, (2, max(2, args.tokens_per_example)),
                                    generator=torch.Generator().manual_seed(0))
            report = export_onnx(model, (example,), path, precision=precision, onnxruntime_ops=not args.standard_ops)
    except OnnxExportError as exc:  # onnxruntime disagrees with PyTorch: an error, never a silent file
        print(f"moecc export: {exc}", file=sys.stderr)
        return 1
    text = report.summary()
    with open(os.path.join(args.out, "export_report.txt"), "w") as f:
        f.write(text + "\n")
    print(text)
    return 0
