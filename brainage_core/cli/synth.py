"""``brainage-study synth``: generate the synthetic ageing cohort as a BIDS folder."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from brainage_core._utils.io import check_output_folder, read_yaml_mapping
from brainage_core._utils.validation import check_positive
from brainage_core.data.template import SUPPORTED_RESOLUTIONS

DESCRIPTION = """\
Generate a synthetic ageing cohort from the MNI152 template: each subject's T1 image is
driven by a biological age (chronological age + gap) through ageing effects planted in
atlas regions (ventricle expansion, hippocampal atrophy, cortical thinning), plus
age-independent nuisance (deformation, head size, bias field, noise, misregistration).
Writes a BIDS folder: OUT/participants.tsv, OUT/sub-XXXX/anat/sub-XXXX_T1w.nii.gz,
OUT/dataset_description.json (with the oracle MAE) and the ground truth under
OUT/derivatives/ground_truth/. The output is deterministic for a given seed. Prepare it
for training with `brainage-study prepare --bids OUT ...`.
"""

EPILOG = """\
examples:
  brainage-study synth --n 200 --resolution 2 --seed 0 --out data/synth
  brainage-study synth --config synth.yaml --out data/synth

synth.yaml holds SynthConfig fields (n_subjects, resolution, seed, age_min, age_max,
sigma_gap, accelerated_fraction, effects, ...), or a whole study config whose
data.synthetic section is used. Options given on the command line override the file.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``synth`` on the ``brainage-study`` parser."""
    parser = subparsers.add_parser(
        "synth",
        help="generate the synthetic ageing cohort (a BIDS folder with ground truth)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        required=True,
        help="output BIDS folder: new, empty, or an interrupted run with the same settings "
        "(which is then completed)",
    )
    parser.add_argument(
        "--n",
        type=int,
        metavar="N",
        default=None,
        help="number of subjects (default: the config's, else the generator's default)",
    )
    parser.add_argument(
        "--resolution",
        type=int,
        choices=SUPPORTED_RESOLUTIONS,
        default=None,
        help="voxel size (mm) of the generated images (default: the config's, else the "
        "generator's default)",
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="random seed (default: the config's, else 0)"
    )
    parser.add_argument(
        "--config",
        metavar="YAML",
        default=None,
        help="YAML file of generator settings (SynthConfig fields, or a study config's "
        "data.synthetic section)",
    )
    parser.add_argument("--n-jobs", type=int, default=2, help="worker processes (default: 2)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=run)
    return parser


def synth_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Merge the YAML file (if any) and the command-line options into SynthConfig fields."""
    settings: dict[str, Any] = {}
    if args.config:
        loaded = read_yaml_mapping(args.config, what="generator settings")
        if isinstance(loaded.get("data"), dict):  # a whole study config
            loaded = loaded["data"].get("synthetic") or {}
        settings.update(loaded)
    for key, value in (
        ("n_subjects", args.n),
        ("resolution", args.resolution),
        ("seed", args.seed),
    ):
        if value is not None:
            settings[key] = value
    return settings


def run(args: argparse.Namespace) -> int:
    """Generate the cohort and print where it is; return the exit code."""
    from brainage_core.data.synth.cohort import generate_cohort
    from brainage_core.data.synth.config import SynthConfig

    check_positive("--n-jobs", args.n_jobs, integer=True)
    if args.n is not None:
        check_positive("--n", args.n, integer=True)
    out = Path(args.out)
    config = SynthConfig.from_dict(synth_settings(args))
    check_output_folder(out, "--out")
    root = generate_cohort(config, out, n_jobs=args.n_jobs, progress=not args.no_progress)
    description = Path(root) / "dataset_description.json"
    oracle = None
    if description.is_file():
        oracle = json.loads(description.read_text()).get("SyntheticCohort", {}).get("oracle_mae")
    print(f"synthetic cohort: {Path(root).resolve()}")
    print(
        f"  {config.n_subjects} subjects at {config.resolution} mm, seed {config.seed}"
        + (f"; oracle MAE {oracle:.2f} y" if oracle is not None else "")
    )
    print(f"  next: brainage-study prepare --bids {root} --out CACHE_DIR")
    return 0
