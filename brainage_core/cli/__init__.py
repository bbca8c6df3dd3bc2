"""The ``brainage-study`` command line.

Each subcommand lives in its own module of this package and exposes
``add_parser(subparsers)``, which registers the subcommand and sets ``func`` (a callable
taking the parsed arguments and returning an exit code) and, optionally, ``spelling``:
how the library's Python spellings in error hints read on this command's line (e.g.
``on_error='skip'`` -> ``--on-error skip``).

Every failure ends with one line ``brainage-study COMMAND: error: ...`` on standard error
and exit status 1 (2 for a command-line usage error, from argparse); Ctrl-C (or SIGTERM)
stops with one line and status 130 (143), never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from collections.abc import Mapping

from brainage_core._utils.locks import COMMAND_ENV, LOCK_WAIT_ENV
from brainage_core._utils.validation import BrainAgeInputError

#: Subcommand modules, in the order ``--help`` lists them.
SUBCOMMANDS = ("synth", "prepare", "run", "predict", "book", "bench")

#: Exit status of a failure (bad input, unwritable folder, failed step).
EXIT_ERROR = 1

#: Exit status after Ctrl-C (128 + SIGINT), as shells report it.
EXIT_INTERRUPTED = 130

#: Exit status after SIGTERM (128 + SIGTERM), e.g. a cluster job at its time limit.
EXIT_TERMINATED = 143


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when the process receives SIGTERM."""


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
    words = sys.argv[1:] if argv is None else list(argv)
    saved_env = {name: os.environ.get(name) for name in (COMMAND_ENV, LOCK_WAIT_ENV)}
    os.environ[COMMAND_ENV] = " ".join(["brainage-study", *words])  # named by its locks
    if getattr(args, "no_wait", False):
        os.environ[LOCK_WAIT_ENV] = "0"  # inherited by the notebook kernels of a run
    prefix = f"brainage-study {args.command}"
    previous = _on_sigterm()
    try:
        return int(args.func(args) or 0)
    except BrainAgeInputError as err:
        return _fail(prefix, str(err), getattr(args, "spelling", {}))
    except OSError as err:  # an unwritable folder, a full disk, ...
        return _fail(prefix, _describe_os_error(err), {})
    except Terminated:
        print(f"{prefix}: error: terminated (SIGTERM); {_resume_note(args)}", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print(f"{prefix}: error: interrupted (Ctrl-C); {_resume_note(args)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _fail(prefix: str, message: str, spelling: Mapping[str, str]) -> int:
    for python, cli in spelling.items():
        message = message.replace(python, cli)
    print(f"{prefix}: error: {message}", file=sys.stderr)
    return EXIT_ERROR


def _describe_os_error(err: OSError) -> str:
    where = f"{err.filename}: " if err.filename else ""
    reason = err.strerror or str(err)
    hints = {
        13: " (is the folder read-only?)",
        30: " (the file system is mounted read-only)",
        28: " (the disk is full)",
    }
    return f"{where}{reason}{hints.get(err.errno or 0, '')}"


def _resume_note(args: argparse.Namespace) -> str:
    if args.command in ("synth", "prepare", "run", "predict"):
        return "what was finished is kept; run the same command again to resume"
    return "nothing was finished"


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def _on_sigterm():
    """Turn SIGTERM into :class:`Terminated` (main thread only); return the old handler."""
    try:
        return signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread
        return None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
