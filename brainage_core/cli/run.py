"""``brainage-study run``: execute the study notebooks for a preset, a config and overrides."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from brainage_core._utils.io import check_output_folder
from brainage_core.study.config import PRESETS, load_config, run_name

#: The library's spellings in error hints, as this command spells them.
SPELLING = {
    "on_error='skip'": "-p data.on_error skip",
    "age_range=(low, high)": "-p data.age_range '[LOW, HIGH]'",
    "'until'": "'--until'",
}

DESCRIPTION = """\
Run the whole study: the notebooks notebooks/NN_step.ipynb (01_data, 02_train,
03_explain, 04_average, 05_visualise, 06_compare_methods) are executed in order with
papermill into RUN_DIR/notebooks/, after the resolved configuration is written to
RUN_DIR/config.yaml.

The configuration is a preset, then an optional YAML file merged over it, then
-p KEY VALUE overrides (dotted keys, YAML values). Without --run-dir the run folder is
runs/<name>-<hash of the config>, so a run with other parameters never overwrites another;
runs/<name> then links to the latest of them.
Re-running the same command skips the steps whose notebook, configuration and code have
not changed; a failing cell stops the run and names the notebook and the cell, and the
partially executed notebook is kept in RUN_DIR/notebooks/ for inspection.

One run folder serves one command at a time: a second run on the same folder waits for
the first (then skips what it did) or, with --no-wait, stops at once naming it. Ctrl-C
stops with status 130 and records the step as interrupted; a killed run leaves nothing
that blocks the next one, which resumes.
"""

EPILOG = """\
presets:
  quick    tiny synthetic cohort on an 8 mm grid: about 5 minutes on 2 CPU cores (CI,
           classroom laptops, the exercises)
  default  the published study on ~1,000 synthetic subjects at 4 mm: about 30 minutes on
           2 CPU cores (what `make book` runs)
  paper    the paper's scale on your own BIDS data at 2 mm, for a GPU; needs
           -p data.path /path/to/bids

examples:
  brainage-study run --preset quick
  brainage-study run --preset quick -p prediction.epochs 3 -p maps.lam 0.5
  brainage-study run --preset default --run-dir runs/default
  brainage-study run --preset paper -p data.path /data/my_bids --config my_gpu.yaml
  brainage-study run --preset quick --config my_changes.yaml --force
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``run`` subcommand."""
    parser = subparsers.add_parser(
        "run",
        help="run the study notebooks for a preset (papermill) into a run folder",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--preset", choices=PRESETS, default=None,
        help="configuration to start from (default: 'default')",
    )
    parser.add_argument(
        "--config", metavar="FILE", default=None,
        help="YAML file merged over the preset; it may hold only the keys you change, "
             "e.g. 'prediction: {epochs: 5}'",
    )
    parser.add_argument(
        "-p", "--param", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
        dest="params",
        help="override one setting by its dotted key; VALUE is read as YAML (3 is a number, "
             "'[1, 2]' a list, null is None). Repeat for several.",
    )
    parser.add_argument(
        "--run-dir", metavar="DIR", default=None,
        help="run folder (default: runs/<name>-<config hash>). A folder that already holds "
             "a run of another configuration is refused, never overwritten.",
    )
    parser.add_argument(
        "--runs-root", metavar="DIR", default="runs",
        help="parent folder of the derived run folders (default: runs)",
    )
    parser.add_argument(
        "--notebooks", metavar="DIR", default=None,
        help="folder of the source notebooks (default: the checkout's notebooks/)",
    )
    parser.add_argument(
        "--force", action="store_true",
        help="re-execute every step, even those that have not changed",
    )
    parser.add_argument(
        "--dry-run", action="store_true",
        help="print the resolved configuration and the run folder, run nothing",
    )
    parser.add_argument(
        "--no-wait", action="store_true",
        help="if another command uses the run folder (or prepares the same cache), stop at "
             "once naming it instead of waiting for it",
    )
    parser.add_argument(
        "--until", metavar="STEP", default=None,
        help="stop after this notebook (e.g. 01_data, 02_train); on a cluster the heavy "
             "steps run between such partial runs under torchrun (README: GPUs and clusters)",
    )
    parser.add_argument(
        "--nproc", type=int, default=1, metavar="N",
        help="processes per node of the heavy steps (training, noise model, maps, method "
             "comparison): with "
             "N > 1 the notebooks launch them through torchrun (one per GPU; gloo on the "
             "CPU) and show their results (default: 1, in the notebook's kernel)",
    )
    parser.set_defaults(func=main, spelling=SPELLING)
    return parser


def main(args: argparse.Namespace) -> int:
    """Resolve the configuration and run the pipeline; return the exit code."""
    from brainage_core._utils.validation import check_positive
    from brainage_core.pipeline.runner import NOTEBOOK_DIR, StepFailed, run_pipeline
    from brainage_core.study.config import dump_config
    from brainage_core.study.launch import NPROC_ENV

    check_positive("--nproc", args.nproc, integer=True)
    config = load_config(args.preset, args.config, [tuple(p) for p in args.params])
    if args.run_dir is not None:
        check_output_folder(args.run_dir, "--run-dir")
    else:
        check_output_folder(args.runs_root, "--runs-root")
    run_dir = args.run_dir or os.path.join(args.runs_root, run_name(config))
    cache_dir = (config.get("data") or {}).get("cache_dir")
    if cache_dir:
        check_output_folder(cache_dir, "data.cache_dir")
    if args.dry_run:
        print(f"# run folder: {run_dir}")
        print(dump_config(config), end="")
        return 0
    start = time.perf_counter()
    previous = os.environ.get(NPROC_ENV)
    os.environ[NPROC_ENV] = str(args.nproc)  # read by the notebooks' launch_step
    try:
        result = run_pipeline(
            config,
            run_dir,
            notebook_dir=args.notebooks or NOTEBOOK_DIR,
            force=args.force,
            progress=sys.stderr.isatty(),
            wait=not args.no_wait,
            until=args.until,
        )
    except StepFailed as err:
        message = str(err)
        for python, cli in SPELLING.items():
            message = message.replace(python, cli)
        print(f"brainage-study run: error: {message}", file=sys.stderr)
        return 1
    finally:
        _restore(NPROC_ENV, previous)
    if args.run_dir is None:
        _link_latest(args.runs_root, config["name"], result.run_dir)
    minutes = (time.perf_counter() - start) / 60
    print(
        f"done in {minutes:.1f} min: {len(result.ran)} step(s) ran, "
        f"{len(result.skipped)} unchanged. Run folder: {result.run_dir}\n"
        f"Build the book with: brainage-study book --run-dir {run_dir}"
    )
    return 0


def _restore(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def _link_latest(runs_root: str, name: str, run_dir: os.PathLike) -> None:
    """Point ``runs_root/<name>`` at the latest run of that name (a relative symlink).

    This is what the notebooks' default ``run_dir = "runs/quick"`` finds when opened by
    hand. A real folder of that name is left alone.
    """
    link = Path(runs_root) / name
    if link.exists() and not link.is_symlink():
        return
    tmp = link.with_name(f".{name}.link")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(Path(run_dir).name, target_is_directory=True)
    os.replace(tmp, link)
