"""`medlora models`: the built-in base models, where they come from, and whether they are prepared."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prepare", nargs="*", metavar="NAME", default=None,
                        help="prepare these built-in models now (all when no name is given)")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from medlora.errors import ModelError
    from medlora.registry import BUILTIN_MODELS, describe_models, prepare_builtin

    if args.prepare is not None:
        for name in args.prepare or list(BUILTIN_MODELS):
            if name not in BUILTIN_MODELS:
                raise ModelError(f"unknown built-in model {name!r}; known: {', '.join(BUILTIN_MODELS)}")
            prepare_builtin(name)
    table = Table(title="medlora built-in models")
    for column in ("name", "source", "licence", "size", "prepared", "path"):
        table.add_column(column)
    for row in describe_models():
        table.add_row(*(("yes" if row[c] else "no") if c == "prepared" else str(row[c])
                        for c in ("name", "source", "licence", "size", "prepared", "path")))
    Console(width=160).print(table)
    return 0
