"""``brainage-study book``: build the Jupyter Book from a study run."""

from __future__ import annotations

import argparse
import os
import sys
import time

from brainage_core._utils.validation import BrainAgeInputError
from brainage_core.study.config import PRESETS, load_config, run_name

DESCRIPTION = """\
Build the study's book (Jupyter Book 1) from a finished run.

The book's pages (book/, _config.yml, _toc.yml, references.bib) are staged in OUT/src
together with the run's executed notebooks (as book/results/NN_step.ipynb), a results
summary, the status page's run table, and download links for the run's NIfTI maps, CSV
tables, metrics and config. The run's notebooks are published as papermill executed them;
only the cheap pages of book/ are executed at build time.

The build uses warnings as errors, so it fails if a page fails to execute, a reference is
broken or a citation is missing; a run with a failed step is refused before building.
The result is OUT/html/index.html.
"""

EPILOG = """\
The run is named either by its folder (--run-dir) or by the same --preset, --config and
-p options that 'brainage-study run' was given (the folder is then derived the same way).

examples:
  brainage-study run --preset quick && brainage-study book --preset quick
  brainage-study book --preset quick -p prediction.epochs 3
  brainage-study book --run-dir runs/default --out _build
  python -m http.server -d _build/html        # then open http://localhost:8000
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``book`` subcommand."""
    parser = subparsers.add_parser(
        "book",
        help="build the Jupyter Book (HTML) from a finished run",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--run-dir", metavar="DIR",
                       help="the run folder (made by 'brainage-study run')")
    which.add_argument("--preset", choices=PRESETS,
                       help="derive the run folder from this preset (with --config and -p), "
                            "as 'brainage-study run' does")
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="with --preset: the YAML file the run was given")
    parser.add_argument("-p", "--param", nargs=2, action="append", default=[],
                        metavar=("KEY", "VALUE"), dest="params",
                        help="with --preset: the overrides the run was given")
    parser.add_argument("--runs-root", metavar="DIR", default="runs",
                        help="with --preset: parent of the run folders (default: runs)")
    parser.add_argument("--out", metavar="DIR", default="_build",
                        help="output folder; the book goes to OUT/html (default: _build)")
    parser.add_argument("--allow-warnings", action="store_true",
                        help="do not treat Sphinx warnings as errors (errors still fail)")
    parser.set_defaults(func=main)
    return parser


def main(args: argparse.Namespace) -> int:
    """Build the book; return the exit code."""
    from brainage_core.pipeline.book import BookBuildError, build_book

    run_dir = args.run_dir
    if run_dir is None:
        config = load_config(args.preset, args.config, [tuple(p) for p in args.params])
        run_dir = os.path.join(args.runs_root, run_name(config))
    elif args.config or args.params:
        raise BrainAgeInputError("--config and -p name a run together with --preset, "
                                 "not with --run-dir")
    start = time.perf_counter()
    try:
        index = build_book(run_dir, args.out,
                           warnings_as_errors=not args.allow_warnings)
    except BookBuildError as err:
        print(f"brainage-study book: error: {err}", file=sys.stderr)
        return 1
    print(f"book built in {time.perf_counter() - start:.0f} s: {index}")
    return 0
