"""``brainage-study prepare``: a data source to a preprocessed, split, cached cohort."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from brainage_core._utils.io import check_output_folder, write_table
from brainage_core._utils.validation import BrainAgeInputError, check_positive
from brainage_core.data.cache import PreparedCohort, prepare_cohort, prepare_shard
from brainage_core.data.manifest import AGE_RANGE, ON_ERROR_CHOICES, check_age_range
from brainage_core.data.qc import QC_POLICIES, cohort_qc
from brainage_core.data.sources.bids import load_bids
from brainage_core.data.sources.csv import load_csv
from brainage_core.data.sources.oasis import fetch_oasis
from brainage_core.data.template import SUPPORTED_RESOLUTIONS, load_template
from brainage_core.plotting.qc import write_qc_page

#: The library's spellings in error hints, as this command spells them.
SPELLING = {
    "on_error='skip'": "--on-error skip",
    "age_range=(low, high)": "--age-range LOW HIGH",
}

DESCRIPTION = """\
Read a data source into a manifest (participant, image path, age, sex, site), run every
image through the one preprocessing path (validate, reorient to RAS, resample to the
MNI template grid, brain mask, intensity normalisation), split the participants into
age-stratified train/val/test sets and store everything as a float16 array cache in
OUT/<key>/ (key = hash of the inputs and parameters). A second run with the same inputs
reuses the cache; an interrupted run resumes. Prints the cache folder.
"""

EPILOG = """\
examples:
  brainage-study synth --n 200 --resolution 2 --out data/synth
  brainage-study prepare --bids data/synth --out .cache/prepared --resolution 2
  brainage-study prepare --csv my_manifest.csv --out .cache/prepared --on-error skip
  brainage-study prepare --oasis --n-subjects 50 --out .cache/prepared   (needs network)

A CSV manifest needs the columns participant_id, path (absolute, or relative to the CSV's
folder) and age; sex, site and any other column are kept.

A large cohort can be prepared by N processes, on one node or many sharing OUT: start
  brainage-study prepare ... --shard I N        for I = 0 .. N-1 (at the same time)
(for example --shard $SLURM_ARRAY_TASK_ID $SLURM_ARRAY_TASK_COUNT in a job array). Each
shard prepares every N-th participant into its own folder, with no shared lock; the shard
that completes the set publishes the cache, the same as one process would make.

A killed or interrupted prepare leaves no worker behind and resumes where it stopped.
Two prepares of the same data share the work: the second waits for the first (or, with
--no-wait, stops at once naming it).
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``prepare`` on the ``brainage-study`` parser."""
    parser = subparsers.add_parser(
        "prepare",
        help="preprocess a BIDS folder, CSV manifest or OASIS into an array cache",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_argument_group("data source (exactly one)").add_mutually_exclusive_group(
        required=True
    )
    source.add_argument(
        "--bids",
        metavar="DIR",
        help="BIDS folder with participants.tsv (participant_id, age, sex, ...) and "
        "sub-*/[ses-*/]anat/*_T1w.nii[.gz]; a synthetic cohort is such a folder",
    )
    source.add_argument(
        "--csv",
        metavar="FILE",
        help="CSV (or .tsv) manifest with columns participant_id, path, age [, sex, site, ...]",
    )
    source.add_argument(
        "--oasis",
        action="store_true",
        help="download the OASIS-1 VBM grey-matter maps with nilearn (needs network)",
    )
    parser.add_argument(
        "--session",
        default="first",
        help="BIDS sessions that enter: first (default), last, all (one row per session, "
        "split by subject) or a session label",
    )
    parser.add_argument(
        "--run",
        default="first",
        help="BIDS runs of a session that enter: first (default), last, all or a run index",
    )
    parser.add_argument(
        "--out",
        metavar="CACHE_DIR",
        required=True,
        help="folder holding the prepared caches; the cohort goes to CACHE_DIR/<key>/",
    )
    parser.add_argument(
        "--resolution",
        type=int,
        default=2,
        choices=SUPPORTED_RESOLUTIONS,
        help="voxel size (mm) of the template grid the images are resampled to (default: 2)",
    )
    parser.add_argument(
        "--on-error",
        choices=ON_ERROR_CHOICES,
        default="raise",
        help="bad participant (unreadable image, missing age, ...): 'raise' stops with an "
        "error naming it; 'skip' leaves it out and lists it in skipped.tsv (default: raise)",
    )
    parser.add_argument(
        "--age-range",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        default=AGE_RANGE,
        help="plausible ages in years; an age outside is a bad participant (default: "
        f"{AGE_RANGE[0]:g} {AGE_RANGE[1]:g})",
    )
    parser.add_argument(
        "--split-fractions",
        type=float,
        nargs=3,
        metavar=("TRAIN", "VAL", "TEST"),
        default=(0.7, 0.15, 0.15),
        help="fractions of the age-stratified train/val/test split (default: 0.7 0.15 0.15)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the train/val/test split (default: 0)"
    )
    parser.add_argument(
        "--n-subjects",
        type=int,
        metavar="N",
        default=None,
        help="use only the first N participants of the source (default: all)",
    )
    parser.add_argument(
        "--n-jobs",
        type=int,
        default=2,
        help="worker processes preprocessing images (default: 2)",
    )
    parser.add_argument(
        "--oasis-dir",
        metavar="DIR",
        default=None,
        help="with --oasis: nilearn data folder to download to (default: ~/nilearn_data)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="with --oasis: seconds to wait for the download (default: 600)",
    )
    parser.add_argument(
        "--no-wait",
        action="store_true",
        help="if another process is preparing the same cache, stop at once (naming it) "
        "instead of waiting for it",
    )
    parser.add_argument(
        "--shard",
        type=int,
        nargs=2,
        metavar=("INDEX", "COUNT"),
        default=None,
        help="prepare only participants INDEX, INDEX+COUNT, ... (0 <= INDEX < COUNT) into "
        "a shard of the cache; the shard that completes the set publishes the cache",
    )
    parser.add_argument(
        "--register",
        action="store_true",
        help="register every image affinely to the MNI template first (raw T1 images; "
        "SimpleITK; part of the cache key)",
    )
    parser.add_argument(
        "--qc",
        choices=QC_POLICIES,
        default="warn",
        help="input quality control of every image against the template and the cohort "
        "(brainage_core.data.qc): warn lists the flagged images (default), skip leaves them "
        "out, raise stops at the first (once the cohort is prepared: each image is read once, "
        "measured as it is prepared); the table and page go to CACHE_DIR/<key>.qc/",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=run, spelling=SPELLING)
    return parser


def run(args: argparse.Namespace) -> int:
    """Build the manifest, prepare the cohort, print a summary; return the exit code."""
    check_positive("--n-jobs", args.n_jobs, integer=True)
    if args.n_subjects is not None:
        check_positive("--n-subjects", args.n_subjects, integer=True)
    check_age_range(list(args.age_range), "--age-range")
    check_output_folder(args.out, "--out")
    if args.bids:
        manifest = load_bids(args.bids, session=args.session, run=args.run,
                             database_dir=Path(args.out) / "bids_index", validate=True)
        found = manifest.attrs["metadata"]["bids_validation"]
        print(f"BIDS validation ({found['tool']}): {found['n_errors']} error(s), "
              f"{found['n_warnings']} warning(s)")
        for issue in found["issues"]:
            print(f"  {issue}")
    elif args.csv:
        manifest = load_csv(args.csv)
    else:
        manifest = fetch_oasis(
            data_dir=args.oasis_dir, n_subjects=args.n_subjects, timeout=args.timeout
        )
    if args.n_subjects is not None and args.n_subjects < len(manifest):
        attrs = dict(manifest.attrs)
        manifest = manifest.iloc[: args.n_subjects].reset_index(drop=True)
        manifest.attrs = attrs
    # One read per image: the QC measures are taken while each image is prepared (a shard
    # measures its own rows only); the flags compare each image with the whole cohort, so
    # they follow once every image is in (the publishing shard judges them).
    full = _prepare(args, manifest)
    if full is None:
        index, count = args.shard
        print(f"shard {index} of {count} done; the shard that completes the set "
              "publishes the cache")
        return 0
    checked = _quality_control(full, manifest, args)
    bad = checked[~checked["qc_pass"] & ~checked["qc_flags"].str.startswith("unreadable")]
    if len(bad) and args.qc == "raise":
        first = bad.iloc[0]
        raise BrainAgeInputError(
            f"participant {first['participant_id']!r} fails quality control: "
            f"{first['qc_reasons']} (use --qc warn to keep it flagged, --qc skip to leave it "
            "out)", first["path"])
    cohort = full
    if len(bad) and args.qc == "skip":
        # the cohort without them: its images are copied from the whole one, not read again
        attrs = dict(manifest.attrs)
        kept = manifest[~manifest["path"].isin(set(bad["path"]))].reset_index(drop=True)
        kept.attrs = attrs
        cohort = _prepare_whole(args, kept, reuse=full)
    _summary(cohort, checked, args)
    return 0


def _prepare(args: argparse.Namespace, manifest: pd.DataFrame) -> PreparedCohort | None:
    """The whole manifest prepared with its QC measures (None: a shard, not the last)."""
    if args.shard is None:
        return _prepare_whole(args, manifest)
    return prepare_shard(manifest, args.out, shard=tuple(args.shard), **_prepare_options(args))


def _prepare_whole(args: argparse.Namespace, manifest: pd.DataFrame,
                   reuse: PreparedCohort | None = None) -> PreparedCohort:
    return prepare_cohort(manifest, args.out, wait=not args.no_wait, reuse=reuse,
                          **_prepare_options(args))


def _prepare_options(args: argparse.Namespace) -> dict[str, Any]:
    """The preparation settings a whole and a sharded ``prepare`` share (QC measured)."""
    return {"resolution": args.resolution, "on_error": args.on_error,
            "split_fractions": args.split_fractions, "seed": args.seed,
            "n_jobs": args.n_jobs, "progress": not args.no_progress,
            "age_range": tuple(args.age_range), "register": args.register, "qc": True}


def _summary(cohort: PreparedCohort, checked: pd.DataFrame, args: argparse.Namespace) -> None:
    counts = cohort.table["split"].value_counts()
    print(f"prepared cohort: {cohort.root}")
    print(
        f"  {len(cohort)} images on a {cohort.resolution} mm grid {cohort.shape}; "
        f"train {counts.get('train', 0)}, val {counts.get('val', 0)}, "
        f"test {counts.get('test', 0)}"
    )
    _report_qc(checked, cohort, args)
    skipped = cohort.skipped
    if len(skipped):
        print(f"  {len(skipped)} participant(s) skipped (listed in {cohort.root / 'skipped.tsv'}):")
        with pd.option_context("display.max_colwidth", 120, "display.width", 200):
            print(skipped[["participant_id", "reason"]].to_string(index=False), file=sys.stdout)


def _quality_control(cohort: PreparedCohort, manifest: pd.DataFrame,
                     args: argparse.Namespace) -> pd.DataFrame:
    """QC of every image with a file, from the measures taken while preparing it.

    An image without measures (never read: a manifest row left out for its metadata, an
    unreadable image, a cache prepared earlier without QC) is measured here.
    """
    has_file = [bool(p) and Path(str(p)).is_file() for p in manifest["path"]]
    return cohort_qc(manifest.loc[has_file], load_template(args.resolution),
                     register=args.register, progress=not args.no_progress,
                     measured=cohort.qc_measures())


def _report_qc(checked: pd.DataFrame, cohort, args: argparse.Namespace) -> None:
    folder = cohort.root.with_name(f"{cohort.root.name}.qc")
    folder.mkdir(exist_ok=True)
    checked = checked.assign(qc_action=np.where(checked["qc_pass"], "ok",
                                                "skipped" if args.qc == "skip" else "flagged"))
    write_table(folder / "qc.tsv", checked)
    write_qc_page(checked, folder, load_template(args.resolution),
                  title=f"QC of {len(checked)} images ({cohort.root.name})")
    flagged = checked[~checked["qc_pass"]]
    if len(flagged):
        print(f"  QC flagged {len(flagged)} image(s)"
              f"{' (left out)' if args.qc == 'skip' else ''}; see {folder / 'qc.html'}:")
        with pd.option_context("display.max_colwidth", 160, "display.width", 220):
            print(flagged[["participant_id", "qc_reasons"]].to_string(index=False))
    else:
        print(f"  QC: every image passed ({folder / 'qc.html'})")
