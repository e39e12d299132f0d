"""`moecc explain MODEL`: what moecc would do to a model, layer by layer.

MODEL is a built-in name or a transformers config.json. Small models get random weights
and every captured layer is verified numerically; models too large for memory are built
on the meta device (shapes only), where capture runs but verification cannot.
Prints the MoE layers found, what each pass did, and what was left alone and why.
"""

from __future__ import annotations

import argparse

# Above this many parameters explain builds on the meta device instead of allocating.
MATERIALIZE_LIMIT = 300_000_000


def register(sub) -> None:
    p = sub.add_parser("explain", help="show the MoE layers moecc finds and what each pass does",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="built-in model name or path to a transformers config.json")
    p.add_argument("--experts-implementation", default="grouped_mm", choices=["grouped_mm", "batched_mm", "eager"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--kernel-backend", default="reference", choices=["auto", "reference", "triton", "tvm"])
    p.add_argument("--meta", action="store_true", help="build on the meta device even if the model is small")
    p.set_defaults(func=run)


def run(args) -> int:
    import warnings

    import torch
    from rich.console import Console

    import moecc
    from moecc.models import build_model, load_config

    console = Console(width=None if Console().is_terminal else 140, soft_wrap=True)
    try:
        config = load_config(args.model)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        console.print(f"[red]{exc}[/red]")
        return 2
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    with console.status("building the model"):
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            meta_model = AutoModelForCausalLM.from_config(config)
        n_params = sum(p.numel() for p in meta_model.parameters())
        on_meta = args.meta or n_params > MATERIALIZE_LIMIT
        if on_meta:
            model = meta_model.to(dtype).eval()
            model.set_experts_implementation(args.experts_implementation)
        else:
            model = build_model(args.model, dtype=dtype, experts_implementation=args.experts_implementation)
    device = "meta" if on_meta else "cpu"
    console.print(f"{args.model}: {type(model).__name__}, {n_params / 1e6:,.1f} M parameters"
                  + (" (built on the meta device: capture is not verified numerically)" if on_meta else ""))
    report = moecc.CompileReport()
    options = {"report": report, "rest_of_graph": "eager", "kernel_backend": args.kernel_backend,
               "verify_capture": not on_meta}
    compiled = torch.compile(model, backend="moecc", options=options)
    ids = torch.zeros(1, 4, dtype=torch.long, device=device)
    with console.status("tracing and capturing"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            compiled(ids, use_cache=False)
    console.print(report.format())
    console.print(f"{len(report.captured)} MoE layer(s) captured, {len(report.skipped)} left alone")
    return 0
