"""Writing and reading a synthetic cohort: the BIDS folder and its ground truth."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from brainage_core import __version__
from brainage_core._utils.io import (
    remove_temporary_files,
    save_nifti,
    write_json,
    write_table,
)
from brainage_core._utils.validation import (
    BrainAgeInputError,
    check_positive,
)
from brainage_core._utils.workers import process_pool
from brainage_core.data.atlas import ATLAS_NAME
from brainage_core.data.synth.ages import (
    PARTICIPANT_COLUMNS,
    draw_participants,
    oracle_mae,
    regional_age_column,
)
from brainage_core.data.synth.config import AGE_SPAN, SynthConfig
from brainage_core.data.synth.render import AgeingModel, SubjectRenderer, SubjectSpec

_WORKER: SubjectRenderer | None = None


def _init_worker(renderer: SubjectRenderer) -> None:
    global _WORKER
    _WORKER = renderer


def _write_in_worker(subject: SubjectSpec) -> bool:
    assert _WORKER is not None
    return _WORKER.write(subject)


# --------------------------------------------------------------------------- dataset


@dataclass(frozen=True, eq=False)
class GroundTruth:
    """Where a synthetic cohort carries planted age signal.

    Attributes
    ----------
    mask_img : nibabel.Nifti1Image
        Binary (uint8) mask of the voxels whose noise-free intensity changes with ``b``.
    strength_img : nibabel.Nifti1Image
        Continuous map: absolute intensity change between ``b = age_min`` and ``age_max``.
    effect_mask_imgs : dict of str to nibabel.Nifti1Image
        One mask per effect kind.
    effects : pandas.DataFrame
        ``effects.tsv``: one row per effect (kind, regions, matched_regions, strength, onset,
        form, smoothing_mm, n_voxels, volume_ml).
    oracle_mae : float
        The cohort's oracle MAE (years).
    regions : list of str
        Names of the atlas regions in which effects were planted.
    regional_ages : pandas.DataFrame or None
        ``regional_ages.tsv``: per participant, the age driving each effect
        (``regional_age_1 .. regional_age_K``, in the order of ``effects``); None for
        cohorts written before regional heterogeneity existed.
    """

    mask_img: nib.Nifti1Image
    strength_img: nib.Nifti1Image
    effect_mask_imgs: dict[str, nib.Nifti1Image]
    effects: pd.DataFrame
    oracle_mae: float
    regions: list[str]
    regional_ages: pd.DataFrame | None = None

    @property
    def mask(self) -> np.ndarray:
        """The mask as a boolean array."""
        return np.asarray(self.mask_img.dataobj) > 0


def generate_cohort(
    config: SynthConfig | Mapping[str, Any],
    out_dir: str | os.PathLike,
    *,
    n_jobs: int = 2,
    progress: bool = True,
) -> Path:
    """Generate a synthetic ageing cohort as a BIDS-like folder.

    Parameters
    ----------
    config : SynthConfig or mapping
        The cohort's parameters (a mapping goes through :meth:`SynthConfig.from_dict`).
    out_dir : str or os.PathLike
        Output folder. It must be empty, absent, or a cohort generated earlier with the
        same config, whose missing subjects are then generated (resumable).
    n_jobs : int, default=2
        Worker processes; the output does not depend on it.
    progress : bool, default=True
        Show a progress bar.

    Returns
    -------
    pathlib.Path
        ``out_dir``, holding ``dataset_description.json``, ``participants.tsv``,
        ``participants.json``, ``sub-XXXX/anat/sub-XXXX_T1w.nii.gz`` and
        ``derivatives/ground_truth/``.
    """
    if not isinstance(config, SynthConfig):
        config = SynthConfig.from_dict(config)
    check_positive("n_jobs", n_jobs, integer=True)
    out = Path(out_dir)
    _check_output_folder(out, config)
    model = AgeingModel(config)  # validates regions and strengths before anything is written
    oracle = oracle_mae(config)
    participants = draw_participants(config)

    out.mkdir(parents=True, exist_ok=True)
    remove_temporary_files(out)  # left by an interrupted run that is now resumed
    write_json(out / "dataset_description.json", _dataset_description(config, oracle))
    regional = [regional_age_column(k) for k in range(len(config.effects))]
    write_table(out / "participants.tsv", participants[list(PARTICIPANT_COLUMNS)])
    write_json(out / "participants.json", _PARTICIPANTS_SIDECAR)
    _write_ground_truth(out, model, oracle)
    write_table(
        out / "derivatives" / "ground_truth" / "regional_ages.tsv",
        participants[["participant_id", *regional]],
    )

    subjects = [
        SubjectSpec(
            index=i,
            participant_id=row.participant_id,
            sex=row.sex,
            biological_age=tuple(float(participants.at[i, c]) for c in regional),
            path=os.fspath(out / row.participant_id / "anat" / f"{row.participant_id}_T1w.nii.gz"),
        )
        for i, row in enumerate(participants.itertuples(index=False))
    ]
    renderer = SubjectRenderer(model)
    quiet = {} if progress else {"disable": True}  # TQDM_DISABLE=1 silences it too
    bar = tqdm(total=len(subjects), desc="synthetic cohort", unit="subject", **quiet)
    with bar:
        if n_jobs == 1 or len(subjects) == 1:
            for subject in subjects:
                renderer.write(subject)
                bar.update()
        else:
            chunk = max(1, min(8, len(subjects) // (4 * n_jobs)))
            # Workers die with this process, even on SIGKILL (see _utils.workers).
            with process_pool(n_jobs, initializer=_init_worker, initargs=(renderer,)) as pool:
                for _ in pool.map(_write_in_worker, subjects, chunksize=chunk):
                    bar.update()
    return out


def load_ground_truth(dataset_root: str | os.PathLike) -> GroundTruth:
    """Load the planted ground truth of a synthetic cohort.

    Parameters
    ----------
    dataset_root : str or os.PathLike
        Folder written by :func:`generate_cohort`.

    Returns
    -------
    GroundTruth
    """
    root = Path(dataset_root)
    gt = root / "derivatives" / "ground_truth"
    meta = _synthetic_metadata(root)
    for name in ("age_signal_mask.nii.gz", "age_signal_strength.nii.gz", "effects.tsv"):
        if not (gt / name).is_file():
            raise BrainAgeInputError("ground-truth file is missing.", gt / name)
    effects = pd.read_csv(gt / "effects.tsv", sep="\t")
    kind_masks = {
        kind: nib.load(gt / f"effect-{kind}_mask.nii.gz")
        for kind in dict.fromkeys(effects["kind"])
        if (gt / f"effect-{kind}_mask.nii.gz").is_file()
    }
    regions: list[str] = []
    for matched in effects["matched_regions"]:
        regions += [r for r in str(matched).split(";") if r and r not in regions]
    return GroundTruth(
        mask_img=nib.load(gt / "age_signal_mask.nii.gz"),
        strength_img=nib.load(gt / "age_signal_strength.nii.gz"),
        effect_mask_imgs=kind_masks,
        effects=effects,
        oracle_mae=float(meta["oracle_mae"]),
        regions=regions,
        regional_ages=(
            pd.read_csv(gt / "regional_ages.tsv", sep="\t")
            if (gt / "regional_ages.tsv").is_file()
            else None
        ),
    )


_PARTICIPANTS_SIDECAR = {
    "age": {"Description": "Chronological age", "Units": "years"},
    "sex": {"Description": "Sex", "Levels": {"M": "male", "F": "female"}},
    "gap": {
        "Description": "True brain-age gap (biological minus chronological age)",
        "Units": "years",
    },
    "biological_age": {
        "Description": "Biological age that drives the planted ageing",
        "Units": "years",
    },
    "group": {
        "Description": "Ageing group",
        "Levels": {"control": "normal ageing", "accelerated": "accelerated ageing"},
    },
}


def _dataset_description(config: SynthConfig, oracle: float) -> dict[str, Any]:
    return {
        "Name": "Synthetic ageing cohort (brainage_core)",
        "BIDSVersion": "1.9.0",
        "DatasetType": "raw",
        "License": "CC0 (synthetic); regions from the Harvard-Oxford atlas (FSL licence)",
        "GeneratedBy": [{"Name": "brainage_core.data.synth.render", "Version": __version__}],
        "SyntheticCohort": {
            "config": config.to_dict(),
            "oracle_mae": oracle,
            "atlas": ATLAS_NAME,
            "template": "MNI152 2009 (nilearn)",
            "age_span_years": AGE_SPAN,
        },
    }


def read_cohort_config(dataset_root: str | os.PathLike) -> SynthConfig:
    """The :class:`SynthConfig` a cohort was generated with (from its description).

    Raises
    ------
    BrainAgeInputError
        Naming ``dataset_description.json`` if it is missing, unreadable, or not that of
        a synthetic cohort.
    """
    root = Path(dataset_root)
    config = _synthetic_metadata(root).get("config")
    if not isinstance(config, Mapping):
        raise BrainAgeInputError(
            "the 'SyntheticCohort' entry has no 'config'.", root / "dataset_description.json"
        )
    return SynthConfig.from_dict(config)


def _synthetic_metadata(root: Path) -> dict[str, Any]:
    """The ``SyntheticCohort`` entry of a cohort's ``dataset_description.json``."""
    path = root / "dataset_description.json"
    meta = _read_description(path).get("SyntheticCohort")
    if not isinstance(meta, dict):
        raise BrainAgeInputError("not a synthetic cohort (no 'SyntheticCohort' entry).", path)
    return meta


def _read_description(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise BrainAgeInputError("dataset_description.json is missing.", path)
    try:
        desc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise BrainAgeInputError(f"cannot read the dataset description ({err}).", path) from err
    if not isinstance(desc, dict):
        raise BrainAgeInputError("the dataset description must be a JSON object.", path)
    return desc


def _check_output_folder(out: Path, config: SynthConfig) -> None:
    """Allow an absent or empty folder, or an earlier cohort with the same config."""
    if out.exists() and not out.is_dir():
        raise BrainAgeInputError("the output folder is a file.", out)
    if not out.exists() or not any(out.iterdir()):
        return
    desc_path = out / "dataset_description.json"
    hint = "Choose an empty or new folder."
    if not desc_path.is_file():
        raise BrainAgeInputError(f"the output folder is not empty and holds no cohort. {hint}", out)
    previous = _read_description(desc_path).get("SyntheticCohort")
    old = previous.get("config") if isinstance(previous, dict) else None
    new = json.loads(json.dumps(config.to_dict()))
    if old != new:
        differ = sorted(k for k in set(new) | set(old or {}) if (old or {}).get(k) != new.get(k))
        raise BrainAgeInputError(
            f"the output folder holds a different dataset (settings that differ: {differ}). {hint}",
            out,
        )


def _write_ground_truth(out: Path, model: AgeingModel, oracle: float) -> None:
    config = model.config
    template = model.template
    folder = out / "derivatives" / "ground_truth"
    b_lo, b_hi = float(config.age_min), float(config.age_max)
    threshold = config.ground_truth_threshold
    change = model.change(b_lo, b_hi)
    save_nifti(template.to_image(change, dtype=np.float32), folder / "age_signal_strength.nii.gz")
    save_nifti(
        template.to_image(change > threshold, dtype=np.uint8), folder / "age_signal_mask.nii.gz"
    )
    voxel_ml = config.resolution**3 / 1000.0
    rows = []
    kind_masks: dict[str, np.ndarray] = {}
    for effect, names in zip(model.effects, model.region_names, strict=True):
        single = AgeingModel(dataclasses.replace(config, effects=[effect]))
        mask = single.change(b_lo, b_hi) > threshold
        kind_masks[effect.kind] = kind_masks.get(effect.kind, np.zeros_like(mask)) | mask
        rows.append(
            {
                **effect.to_dict(),
                "regions": ";".join(effect.regions),
                "matched_regions": ";".join(names),
                "smoothing_mm": effect.sigma_mm,
                "n_voxels": int(mask.sum()),
                "volume_ml": float(mask.sum() * voxel_ml),
            }
        )
    for kind, mask in kind_masks.items():
        save_nifti(template.to_image(mask, dtype=np.uint8), folder / f"effect-{kind}_mask.nii.gz")
    columns = [
        "kind",
        "regions",
        "matched_regions",
        "strength",
        "onset",
        "form",
        "smoothing_mm",
        "n_voxels",
        "volume_ml",
    ]
    write_table(folder / "effects.tsv", pd.DataFrame(rows, columns=columns))
    write_json(
        folder / "dataset_description.json",
        {
            "Name": "Planted age signal (ground truth)",
            "BIDSVersion": "1.9.0",
            "DatasetType": "derivative",
            "GeneratedBy": [{"Name": "brainage_core.data.synth.render", "Version": __version__}],
            "BiologicalAgeRange": [b_lo, b_hi],
            "Threshold": threshold,
            "OracleMAE": oracle,
            "Atlas": ATLAS_NAME,
        },
    )
