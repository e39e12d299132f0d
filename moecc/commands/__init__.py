"""Subcommands of the moecc CLI, one module each (see moecc/cli.py)."""
