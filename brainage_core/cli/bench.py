"""``brainage-study bench``: run the benchmarks and print their figures."""

from __future__ import annotations

import argparse
import sys

from brainage_core._utils.validation import BrainAgeInputError
from brainage_core.bench import BENCHMARKS, load_benchmark

DESCRIPTION = """\
Run a benchmark and print its figures (speed, memory, accuracy against the targets of
the study). Benchmarks are figures, not tests: they take minutes, not seconds.

  data     generate and prepare a synthetic cohort: seconds per subject, peak RAM,
           cache size on disk
  predict  train the predictor on a default-sized cohort: test MAE against the oracle
           and the ridge baseline, seconds per epoch, subjects per second, peak RAM
  maps     fit the noise model and score the maps against the planted ground truth:
           localisation AUROC, region ranking, milliseconds per subject
  memory   memory per subject of each heavy step (training, noise model, integrated
           gradients, prediction) at the run's grid, and estimated at 2 mm and 1 mm, to
           size a GPU job: bench memory --preset paper [-p KEY VALUE] [--device cuda]
  all      all of the above, in that order
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``bench`` subcommand."""
    parser = subparsers.add_parser(
        "bench",
        help="run the benchmarks (data, predict, maps, memory) and print their figures",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("name", choices=(*BENCHMARKS, "all"), help="which benchmark to run")
    parser.add_argument(
        "extra", nargs=argparse.REMAINDER, metavar="...",
        help="further arguments, handed to the benchmark as args.extra (a list of strings)",
    )
    parser.set_defaults(func=main)
    return parser


def main(args: argparse.Namespace) -> int:
    """Run the chosen benchmark(s); return the exit code."""
    names = BENCHMARKS if args.name == "all" else (args.name,)
    missing = []
    for name in names:
        try:
            module = load_benchmark(name)
        except BrainAgeInputError as err:
            if args.name != "all":
                raise
            missing.append(name)
            print(f"--- bench {name}: skipped ({err})", file=sys.stderr)
            continue
        print(f"--- bench {name}", flush=True)
        module.run(args)
    if missing and len(missing) == len(names):
        raise BrainAgeInputError(f"no benchmark is available (missing: {missing}).")
    return 1 if missing else 0
