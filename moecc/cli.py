"""The `moecc` command line: one subcommand per module in moecc/commands.

Each command module defines `register(subparsers)` which adds its parser and sets
`func` (called with the parsed args, returns an exit code). Modules are imported only
when the CLI starts, so `import moecc` stays cheap.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = ("demo", "eval", "explain", "autotune", "bench", "doctor", "export", "coverage", "calibrate",
                   "plan_placement", "prune_eval")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moecc", description="Compile Mixture-of-Experts models to fused GPU kernels."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"moecc.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"moecc.commands.{name}":
                continue  # command not built yet in this checkout
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
