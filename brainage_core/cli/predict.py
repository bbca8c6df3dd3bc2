"""``brainage-study predict``: a trained run applied to new subjects (see study.predict)."""

from __future__ import annotations

import argparse
import os
import subprocess
from pathlib import Path

from brainage_core._utils.validation import BrainAgeInputError, check_positive
from brainage_core.data.qc import QC_POLICIES
from brainage_core.data.sources.bids import load_bids
from brainage_core.data.sources.csv import load_csv
from brainage_core.data.template import SUPPORTED_RESOLUTIONS
from brainage_core.models.distributed import barrier, init_distributed
from brainage_core.study.launch import torchrun_command, torchrun_env
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

Many subjects: --nproc N runs N processes of torchrun (one per GPU; gloo on the CPU),
each predicting every N-th subject; rank 0 writes the one table. On a cluster, launch
the same command under torchrun yourself:
  torchrun --nnodes 2 --nproc_per_node 4 --rdzv_backend c10d \
      --rdzv_endpoint $HEAD_NODE:29500 --rdzv_id $SLURM_JOB_ID \
      -m brainage_core.cli predict --run-dir runs/paper --bids /data/new --out p/
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
    parser.add_argument("--device", default="auto",
                        help="auto (default: the GPU of each process when there is one), "
                        "cpu, cuda or cuda:N")
    parser.add_argument("--nproc", type=int, default=1, metavar="N",
                        help="processes of torchrun on this node, each predicting every N-th "
                        "subject (default: 1, this process)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=run, spelling={})
    return parser


def run(args: argparse.Namespace) -> int:
    """Predict, print the summary; return the exit code."""
    check_positive("--nproc", args.nproc, integer=True)
    if args.nproc > 1 and int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return _launch(args)
    ctx = init_distributed(args.device)
    if not ctx.is_main:  # rank 0 builds the BIDS index; the others then read it
        barrier(ctx)
    if args.bids:
        manifest = load_bids(args.bids, session=args.session,
                             database_dir=Path(args.out) / ".bids_index", require_age=False)
        source = args.bids
    else:
        manifest = load_csv(args.csv, require_age=False)
        source = args.csv
    if ctx.is_main:
        barrier(ctx)
    result = predict_subjects(args.run_dir, manifest, args.out, maps=args.maps, qc=args.qc,
                              resolution=args.resolution, source=str(source),
                              register=True if args.register else None,
                              progress=not args.no_progress, device=args.device)
    if not ctx.is_main:
        return 0
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


def _launch(args: argparse.Namespace) -> int:
    """Run this command as ``--nproc`` processes of ``torchrun``; they print the summary."""
    if args.bids:  # build the BIDS index once, before the processes read it
        load_bids(args.bids, session=args.session, database_dir=Path(args.out) / ".bids_index",
                  require_age=False)
    argv = ["predict", "--run-dir", str(args.run_dir),
            *(["--bids", str(args.bids), "--session", str(args.session)] if args.bids
              else ["--csv", str(args.csv)]),
            "--out", str(args.out), "--qc", args.qc, "--device", args.device,
            *(["--resolution", str(args.resolution)] if args.resolution is not None else []),
            *(["--maps"] if args.maps else []), *(["--register"] if args.register else []),
            *(["--no-progress"] if args.no_progress else [])]
    done = subprocess.run(torchrun_command(args.nproc, ["brainage_core.cli", *argv]),
                          env=torchrun_env(), check=False)
    if done.returncode != 0:
        raise BrainAgeInputError(
            f"the {args.nproc} processes of torchrun stopped with status {done.returncode}; "
            "their messages are above (run the same command again to resume)", args.out)
    return 0

