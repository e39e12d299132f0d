"""`moecc autotune`: fill the per-GPU tuning database (see docs/tuning.md).

    moecc autotune --model path/to/config.json            # tune this model's MoE shape
    moecc autotune --shape E=128,N=768,K=2048,topk=8 --dtype bf16 --batches 1,4,16
    moecc autotune ... --budget 5m --out DIR              # bounded, resumable
    moecc autotune --predict --device rtx4090             # predicted tables, no GPU needed
    moecc autotune --list                                 # what the database holds
    moecc autotune --plot                                 # PNG of roofline fractions

Without --model/--shape the four reference shapes (moecc/shapes.py) are used. Tables go
to --out, else $MOECC_TUNING_DIR, else the default cache folder ~/.cache/moecc/tuning.
torch.compile(backend="moecc") reads $MOECC_TUNING_DIR and the default cache folder (and
the tables shipped in the package): a table written elsewhere with --out is used once it
is copied there or $MOECC_TUNING_DIR points to its folder.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("autotune", help="tune kernel launch configurations for this GPU",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_argument_group("what to tune")
    what.add_argument("--model", action="append", default=[], metavar="NAME_OR_CONFIG",
                      help="a transformers config.json (or folder) or a built-in model name; repeatable")
    what.add_argument("--shape", action="append", default=[], metavar="E=..,N=..,K=..,topk=..",
                      help="an MoE shape; repeatable")
    what.add_argument("--dtype", default="bf16", help="weight/activation dtype (default bf16)")
    what.add_argument("--batches", default=None, metavar="M,M,...",
                      help="token counts (default 1,4,16,64,256,1024,4096)")
    what.add_argument("--op", default="triton.moe", help="op whose table to fill (default triton.moe)")
    what.add_argument("--strategy", default="auto", choices=("auto", "decode", "prefill"),
                      help="auto: best over the strategies allowed at each M")
    how = p.add_argument_group("how")
    how.add_argument("--budget", default=None, help="stop after this long (90s, 5m, 1h); rerun to resume")
    how.add_argument("--out", default=None, type=Path, help="folder for the tables (default: see above)")
    how.add_argument("--max-configs", type=int, default=40, metavar="N",
                     help="measure at most the cost model's best N configs per token count (0: all)")
    how.add_argument("--fit-check", default="auto", choices=("auto", "aot", "analytic"),
                     help="shared-memory pruning (docs/tuning.md): auto = lower bound, then the launch "
                          "(tuning) or an ahead-of-time compile of the chosen config (--predict); "
                          "analytic = conservative estimate only, no compiling; aot = compile every candidate")
    modes = p.add_argument_group("other modes")
    modes.add_argument("--predict", action="store_true",
                       help="write predicted tables from the device profile (no GPU needed)")
    modes.add_argument("--device", default=None, help="device key or name for --predict/--list/--plot")
    modes.add_argument("--list", action="store_true", help="list the tables the database holds")
    modes.add_argument("--plot", nargs="?", const="", default=None, metavar="PNG",
                       help="plot roofline fraction against M (default file: moecc-roofline-DEVICE.png)")
    p.set_defaults(func=run)


def run(args) -> int:
    from moecc.tuning.keys import parse_shape

    try:
        if args.list:
            return _list(args)
        if args.plot is not None:
            return _plot(args)
        shapes = _shapes(args, parse_shape)
        batches = _batches(args.batches)
        if args.predict:
            return _predict(args, shapes, batches)
        return _tune(args, shapes, batches)
    except (ValueError, RuntimeError, KeyError) as exc:
        print(f"moecc autotune: error: {exc}", file=sys.stderr)
        return 2


# -- arguments ---------------------------------------------------------------------
def _shapes(args, parse_shape) -> list[tuple[str, tuple]]:
    from moecc.tuning.model_shapes import shapes_from_model

    shapes = [(s, parse_shape(s)) for s in args.shape]
    for model in args.model:
        shapes.extend(shapes_from_model(model))
    if not shapes:
        from moecc.shapes import REFERENCE_SHAPES

        shapes = [(s.name, (s.num_experts, s.intermediate_size, s.hidden_size, s.top_k)) for s in REFERENCE_SHAPES]
    return shapes


def _batches(text: str | None) -> list[int]:
    from moecc.shapes import REFERENCE_TOKEN_COUNTS

    if not text:
        return list(REFERENCE_TOKEN_COUNTS)
    try:
        batches = sorted({int(t) for t in text.replace("...", "").split(",") if t.strip()})
    except ValueError:
        raise ValueError(f"--batches {text!r} is not a comma-separated list of token counts") from None
    if not batches or batches[0] < 1:
        raise ValueError("--batches needs positive token counts")
    return batches


def _out_dir(args) -> Path:
    from moecc.tuning.lookup import user_dirs

    return (args.out or user_dirs()[0]).expanduser()


def _folders(args):
    from moecc.tuning.lookup import packaged_dir, user_dirs

    folders = [("out", args.out)] if args.out else []
    return folders + [("user", d) for d in user_dirs()] + [("packaged", packaged_dir())]


def _device_key(args) -> str:
    from moecc.devices import normalise_device_key
    from moecc.tuning.lookup import current_device_key

    return normalise_device_key(args.device) if args.device else current_device_key()


def _report_corrupt(exc) -> None:
    print(f"warning: {exc}", file=sys.stderr)


# -- modes -------------------------------------------------------------------------
def _list(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from moecc.tuning.catalog import scan

    here = _device_key(args)
    rows = scan(_folders(args))
    console = Console() if sys.stdout.isatty() else Console(width=240)  # pipes: no truncation
    console.print(f"current device: [bold]{here}[/bold]"
                  + ("" if here != "cpu" else " (no CUDA GPU: tuning needs one; --predict does not)"))
    if not rows:
        console.print("the tuning database is empty; run `moecc autotune --help`")
        return 0
    table = Table("source", "device", "op", "strategy", "shape", "dtype", "compiler", "M buckets", "origin", "file")
    for r in rows:
        mark = "[bold]" if r.key.device == here else ""
        table.add_row(r.source, f"{mark}{r.key.device}", r.key.op, r.key.strategy, r.key.shape_tag, r.key.dtype,
                      f"{r.key.compiler} {r.key.version}",
                      ",".join(str(m) for m in sorted(r.entries)) if not r.error else "[red]unreadable[/red]",
                      r.origin, str(r.path))
    console.print(table)
    for r in rows:
        if r.error:
            console.print(f"[red]warning:[/red] {r.error}")
    return 0


def _plot(args) -> int:
    from moecc.tuning.catalog import scan
    from moecc.tuning.plot import plot_roofline

    device = _device_key(args)
    rows = [r for r in scan(_folders(args)) if r.key.device == device and not r.error]
    out = Path(args.plot) if args.plot else Path(f"moecc-roofline-{device}.png")
    lines = plot_roofline(rows, out, title=f"moecc on {device}: fraction of roofline floor")
    if not lines:
        print(f"moecc autotune: no table with measurements for {device}; tune first, or pass --device",
              file=sys.stderr)
        return 1
    print(f"wrote {out} ({lines} line(s))")
    return 0


def _predict(args, shapes, batches) -> int:
    from moecc.devices import profile
    from moecc.tuning.keys import TableKey, compiler_of, compiler_version
    from moecc.tuning.predict import predicted_entries
    from moecc.tuning.store import merge_entries

    if not args.device:
        raise ValueError("--predict needs --device (e.g. --device rtx4090); known: see moecc/devices.py")
    if not args.op.startswith("triton."):
        raise ValueError(f"--predict models the Triton kernels only, not {args.op}")
    prof = profile(args.device)
    out = _out_dir(args)
    for label, shape in shapes:
        key = TableKey(prof.key, args.op, args.strategy, tuple(shape), args.dtype,
                       compiler_version(compiler_of(args.op)))
        entries = predicted_entries(prof, shape, args.dtype, batches, args.strategy, args.fit_check)
        if not entries:
            print(f"{label}: no configuration fits {prof.name} for {args.dtype}", file=sys.stderr)
            continue
        merge_entries(out / key.filename, key, entries, on_corrupt=_report_corrupt)
        print(f"{label}: predicted {len(entries)} bucket(s) -> {out / key.filename}")
    return 0


def _tune(args, shapes, batches) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from moecc.devices import current_profile, normalise_device_key
    from moecc.tuning.keys import TableKey, compiler_of, compiler_version
    from moecc.tuning.tune import measure_ceilings, parse_budget, plan, require_cuda, tune_table

    if not args.op.startswith("triton."):
        raise ValueError(f"timing {args.op} is not implemented: `moecc autotune` tunes the Triton kernels "
                         "(--op triton.moe)")
    require_cuda()  # before anything slow: the error names --predict
    deadline = time.monotonic() + parse_budget(args.budget)
    prof = current_profile()
    device = prof.key
    if args.device and normalise_device_key(args.device) != device:
        raise ValueError(f"--device {args.device} is not this GPU ({device}); tuning times the local GPU. "
                         "For another GPU use --predict --device ...")
    out = _out_dir(args)
    ceilings = measure_ceilings()
    print(f"{device}: copy bandwidth {ceilings.bandwidth_gbps:.0f} GB/s, bf16 matmul {ceilings.peak_tflops:.0f} "
          f"TFLOP/s (measured); tables -> {out}")
    exit_code = 0
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[now]}")) as bar:
        for label, shape in shapes:
            key = TableKey(device, args.op, args.strategy, tuple(shape), args.dtype,
                           compiler_version(compiler_of(args.op)))
            total = len(plan(key, batches, prof, args.fit_check, args.max_configs))
            task = bar.add_task(label, total=total, now="")
            report = tune_table(key, out / key.filename, batches, prof, deadline=deadline,
                                progress=lambda s, t=task: bar.update(t, now=s),
                                advance=lambda t=task: bar.advance(t), on_corrupt=_report_corrupt,
                                fit_mode=args.fit_check, ceilings=ceilings, max_configs=args.max_configs)
            bar.update(task, now=f"{report.measured} measured, {report.skipped} resumed, {report.failed} failed")
            if report.out_of_budget:
                bar.console.print(f"budget spent during {label}; rerun the same command to resume")
                exit_code = 3
                break
    return exit_code
