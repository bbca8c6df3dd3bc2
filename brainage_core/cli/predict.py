"""``brainage-study predict``: a trained run applied to new subjects (see study.predict)."""

from __future__ import annotations

import argparse
from pathlib import Path

from brainage_core.data.qc import QC_POLICIES
from brainage_core.data.sources.bids import load_bids
from brainage_core.data.sources.csv import load_csv
from brainage_core.data.template import SUPPORTED_RESOLUTIONS
from brainage_core.study.predict import predict_subjects, qc_summary

DESCRIPTION = """\
Predict the brain age of new subjects with a trained run. Each image is prepared exactly
as the run's training images were (grid, brain mask and normalisation read from the run's
index.json), checked (similarity to the template, brain coverage, signal around the brain,
intensity distribution and out-of-distribution score against the training cohort, voxel
size and orientation), predicted, and bias-corrected with the run's fitted correction.

Writes OUT/predictions.tsv (participant, age if known, predicted age, raw and
bias-corrected gap, QC flags and reasons, the QC measures), OUT/bias_correction.json, the
QC page OUT/qc.html with OUT/qc_mosaic.png and, with --maps, each subject's importance map
OUT/maps/<label>_importance.nii.gz (template space). With ages, prints MAE and r.
Subjects are processed one at a time and recorded under OUT/subjects/: an interrupted
predict resumes where it stopped.
"""

EPILOG = """\
examples:
  brainage-study predict --run-dir runs/quick --bids /data/new_scans --out predictions/
  brainage-study predict --run-dir runs/quick --csv new.csv --out predictions/ --maps
  brainage-study predict --run-dir runs/quick --bids /data/new --out p/ --qc skip

A CSV needs the columns participant_id and path (absolute, or relative to the CSV); age
is optional (no MAE without it). --qc: warn (default) predicts and flags a subject that
fails QC, skip flags it without a prediction, raise stops at the first one.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``predict`` on the ``brainage-study`` parser."""
    parser = subparsers.add_parser(
        "predict",
        help="predict brain age (and maps) of new subjects with a trained run",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--run-dir", required=True, metavar="RUN",
                        help="the trained run folder (with index.json)")
    source = parser.add_argument_group("new subjects (exactly one)").add_mutually_exclusive_group(
        required=True)
    source.add_argument("--bids", metavar="DIR",
                        help="BIDS folder with participants.tsv (age optional)")
    source.add_argument("--csv", metavar="FILE",
                        help="CSV (or .tsv) with participant_id, path [, age]")
    parser.add_argument("--session", default="first",
                        help="BIDS sessions: first (default), last, all or a label")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--maps", action="store_true",
                        help="also write each subject's importance map (the run's noise model)")
    parser.add_argument("--qc", choices=QC_POLICIES, default="warn",
                        help="a subject failing QC: warn (predict and flag; default), skip "
                        "(flag, no prediction) or raise (stop)")
    parser.add_argument("--resolution", type=int, choices=SUPPORTED_RESOLUTIONS, default=None,
                        help="the grid (mm) you expect the run to use; another is an error")
    parser.add_argument("--register", action="store_true",
                        help="register each image affinely to the MNI template first (raw "
                        "T1 images); default: what the run's training images went through")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=run, spelling={})
    return parser


def run(args: argparse.Namespace) -> int:
    """Predict, print the summary; return the exit code."""
    if args.bids:
        manifest = load_bids(args.bids, session=args.session,
                             database_dir=Path(args.out) / ".bids_index", require_age=False)
        source = args.bids
    else:
        manifest = load_csv(args.csv, require_age=False)
        source = args.csv
    result = predict_subjects(args.run_dir, manifest, args.out, maps=args.maps, qc=args.qc,
                              resolution=args.resolution, source=str(source),
                              register=True if args.register else None,
                              progress=not args.no_progress)
    m = result.metrics
    print(f"predicted {m['n_predicted']} of {m['n']} subject(s): {result.out / 'predictions.tsv'}")
    if m.get("mae") is not None:
        line = f"  MAE {m['mae']:.2f} y, r {m['r']:.3f}" if m.get("r") is not None else \
            f"  MAE {m['mae']:.2f} y"
        print(f"{line} ({m['n_with_age']} subject(s) with age)")
        if m["n_flagged"] and m.get("mae_qc_pass") is not None:
            print(f"  MAE {m['mae_qc_pass']:.2f} y over the subjects that passed QC")
    else:
        print("  no ages given: no MAE")
    if m["n_flagged"]:
        counts = ", ".join(f"{k} {v}" for k, v in qc_summary(result.table).items())
        print(f"  QC flagged {m['n_flagged']} subject(s) ({counts}); skipped "
              f"{m['n_skipped']}: see {result.out / 'qc.html'}")
    else:
        print(f"  QC: every subject passed; see {result.out / 'qc.html'}")
    return 0
