"""`moecc explain MODEL`: what moecc would do to a model, layer by layer.

MODEL is a built-in name or a transformers config.json. Small models get random weights
and every captured layer is verified numerically; models too large for memory are built
on the meta device (shapes only), where capture runs but verification cannot.
Prints the MoE layers found, what each pass did, and what was left alone and why; a
config without MoE layers, or one that transformers rejects, ends in one line that says
so (never a traceback).

`moecc explain MODEL --prune stats.json [--keep 0.75] [--criterion reap]` compiles with
expert pruning and shows, per layer, which experts go and the bytes saved (docs/pruning.md).

`moecc explain --routing stats.json [--plot load.png]` explains routing statistics from
`moecc calibrate` instead (no MODEL): per-layer load, entropy, cold experts, busiest
experts, super-expert candidates, and co-activation communities (docs/routing.md).
"""

from __future__ import annotations

import argparse
import re

# Above this many parameters explain builds on the meta device instead of allocating.
MATERIALIZE_LIMIT = 300_000_000


def register(sub) -> None:
    p = sub.add_parser("explain", help="show the MoE layers moecc finds and what each pass does",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help="built-in model name or path to a transformers config.json")
    p.add_argument("--experts-implementation", default="grouped_mm", choices=["grouped_mm", "batched_mm", "eager"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--kernel-backend", default="reference", choices=["auto", "reference", "triton", "tvm"])
    p.add_argument("--meta", action="store_true", help="build on the meta device even if the model is small")
    p.add_argument("--routing", metavar="STATS", default=None,
                   help="explain routing statistics from `moecc calibrate` instead of a model")
    p.add_argument("--plot", metavar="PNG", default=None, help="with --routing: write per-layer load as a PNG")
    p.add_argument("--prune", metavar="STATS", default=None,
                   help="compile with options['prune_experts'] from these statistics: the report says per "
                        "layer which experts go and the bytes saved (docs/pruning.md)")
    p.add_argument("--keep", type=float, default=0.75, help="with --prune: fraction of experts kept per layer")
    p.add_argument("--precision", default=None, metavar="P",
                   help="compile with options['precision'] = P (int8, int4, w8a8, w4a8 or a JSON dict): the "
                        "report says per layer which format was chosen, its measured SQNR, and why")
    p.add_argument("--quantize-linears", action="store_true",
                   help="with --precision: the attention / dense / LM-head linears too (quantize_linears)")
    p.add_argument("--criterion", default="reap",
                   help="with --prune: reap, reap_sum, frequency or random (moecc.pruning.CRITERIA)")
    p.set_defaults(func=run)


def config_error_line(model: str, exc: BaseException) -> str:
    """One line for a config that cannot be loaded: the file, the field, what was wrong.

    transformers 5 configs are strict dataclasses: a wrongly typed field raises
    huggingface_hub's StrictDataclassFieldValidationError, whose message spans two lines
    ("Validation error for field 'x':" / "TypeError: ..."); it is folded into one.
    """
    text = " ".join(str(exc).split())
    match = re.search(r"Validation error for field '([^']+)':\s*(.*)", text)
    if match:
        field, cause = match.groups()
        return (f"{model}: field {field!r} is invalid: {cause}. "
                f"Fix {field!r} in the config (see the model's transformers configuration class).")
    return f"{model}: {text}"


def moe_module_count(model) -> int:
    """Modules that own a routed `experts` child: the MoE blocks of a transformers model."""
    import torch

    return sum(1 for m in model.modules() if isinstance(getattr(m, "experts", None), torch.nn.Module))


def run_routing(args) -> int:
    """`--routing STATS`: tables (and --plot PNG) of what the statistics say."""
    from rich.console import Console

    from moecc.routing_report import plot_routing, print_routing
    from moecc.routing_stats import RoutingStatsError, load_stats

    console = Console(width=None if Console().is_terminal else 140, soft_wrap=True)
    try:
        stats = load_stats(args.routing)
    except RoutingStatsError as exc:
        console.print(str(exc), style="red", markup=False)
        return 2
    print_routing(console, stats)
    if args.plot:
        plot_routing(stats, args.plot)
        console.print(f"wrote {args.plot}", markup=False)
    return 0


def run(args) -> int:
    import warnings

    import torch
    from rich.console import Console

    import moecc
    from moecc.models import build_model, load_config

    if args.routing is not None or args.plot is not None:
        if args.model is not None or args.plot is not None and args.routing is None:
            Console().print("give either MODEL or --routing STATS (with --plot PNG), not both", style="red")
            return 2
        return run_routing(args)
    console = Console(width=None if Console().is_terminal else 140, soft_wrap=True)
    if args.model is None:
        console.print("moecc explain needs a MODEL (built-in name or config.json) or --routing STATS", style="red")
        return 2
    try:
        config = load_config(args.model)
    except Exception as exc:  # noqa: BLE001 - any unloadable config ends in one line, not a traceback
        console.print(config_error_line(args.model, exc), style="red", markup=False)
        return 2
    prune = None
    if args.prune is not None:
        from moecc.pruning import PruningError, parse_prune_config

        try:  # bad statistics or keep: one line before anything is built
            prune = parse_prune_config({"stats": args.prune, "keep": args.keep, "criterion": args.criterion})
        except PruningError as exc:
            console.print(f"--prune: {exc}", style="red", markup=False)
            return 2
    precision = None
    if args.precision is not None:
        import json

        from moecc.precision import PrecisionError, parse_precision

        try:  # a bad format: one line before anything is built
            text = args.precision.strip()
            precision = parse_precision(json.loads(text) if text.startswith("{") else text)
        except (PrecisionError, json.JSONDecodeError) as exc:
            console.print(f"--precision: {exc}", style="red", markup=False)
            return 2
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    with console.status("building the model"):
        from transformers import AutoModelForCausalLM

        try:
            with torch.device("meta"):
                meta_model = AutoModelForCausalLM.from_config(config)
        except Exception as exc:  # noqa: BLE001 - e.g. a config field transformers validates late
            console.print(config_error_line(args.model, exc), style="red", markup=False)
            return 2
    n_params = sum(p.numel() for p in meta_model.parameters())
    if moe_module_count(meta_model) == 0 or not meta_model._can_set_experts_implementation():
        console.print(f"{args.model}: {type(meta_model).__name__} has no MoE layers (no module with routed "
                      "experts): nothing for moecc to capture; torch.compile(backend='moecc') compiles it "
                      "like any dense model.", markup=False)
        return 0
    with console.status("building the model"):
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
               "verify_capture": not on_meta, "prune_experts": prune, "precision": precision,
               "quantize_linears": bool(args.quantize_linears and precision is not None)}
    compiled = torch.compile(model, backend="moecc", options=options)
    ids = torch.zeros(1, 4, dtype=torch.long, device=device)
    with console.status("tracing and capturing"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            try:
                compiled(ids, use_cache=False)
            except Exception as exc:  # noqa: BLE001 - statistics of another model: one line
                from moecc.pruning import PruningError

                cause = exc
                while cause is not None and not isinstance(cause, PruningError):
                    cause = cause.__cause__ or cause.__context__
                if cause is None:
                    raise
                console.print(f"--prune: {cause}", style="red", markup=False)
                return 2
    console.print(report.format())
    console.print(f"{len(report.captured)} MoE layer(s) captured, {len(report.skipped)} left alone")
    return 0
