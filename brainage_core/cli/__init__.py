"""The ``brainage-study`` command line.

Each subcommand lives in its own module of this package and exposes
``add_parser(subparsers)``, which registers the subcommand and sets ``func`` (a callable
taking the parsed arguments and returning an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from brainage_core._utils.validation import BrainAgeInputError

#: Subcommand modules, in the order ``--help`` lists them.
SUBCOMMANDS = ("synth", "prepare", "run", "book", "bench")


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="brainage-study",
        description="Interpretable brain-age study: data, training, importance maps and book.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f".{name}", __name__).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``brainage-study``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except BrainAgeInputError as err:
        print(f"brainage-study {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
