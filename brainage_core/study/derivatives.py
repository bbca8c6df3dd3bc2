"""A run's outputs as a BIDS-Derivatives dataset that pybids, nilearn and other tools index.

The run folder keeps its own layout (``maps/``, ``tables/``, ...: the notebooks and the
book read it); :func:`write_derivatives` adds a view of it, ``<run>/derivatives/``::

    derivatives/
      dataset_description.json     DatasetType "derivative", GeneratedBy (name, version,
                                   the run's configuration hash)
      brainage.tsv, brainage.json  the brain-age table and its data dictionary
      sub-<label>/[ses-<label>/]anat/
        sub-<label>[_ses-<label>][_run-<index>]_space-MNI152NLin2009cSym_res-<mm>_desc-noiseimportance_map.nii.gz
        ... .json                  method, settings, units
      group/
        space-MNI152NLin2009cSym_res-<mm>_desc-noiseimportancePopulation_map.nii.gz
        space-..._desc-noiseimportanceAge<lo>to<hi>_map.nii.gz     age-band maps
        space-..._desc-<method>Mean_map.nii.gz                     mean map of each
                                                                    compared method
        (each with its .json sidecar)

Image files are hard links to the run's files where the file system allows (no extra
space), copies otherwise. The view is rebuilt from scratch on every call, so it always
matches the run folder.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from brainage_core._utils.io import write_json, write_table
from brainage_core._utils.validation import BrainAgeInputError
from brainage_core.study.rundir import RunDir

#: Folder of the derivative dataset inside a run folder.
DERIVATIVES_DIR = "derivatives"

#: Template space of every map (the MNI152 2009c symmetric template, see ``data.template``).
SPACE = "MNI152NLin2009cSym"

#: BIDS version the dataset description declares.
BIDS_VERSION = "1.9.0"

#: ``desc-`` label of each method's maps (BIDS labels are alphanumeric).
METHOD_DESC = {
    "noise": "noiseimportance",
    "noise_per_subject": "noisePerSubject",
    "saliency": "saliency",
    "integrated_gradients": "integratedGradients",
}

#: What each method's map holds, for the sidecars.
METHOD_DESCRIPTION = {
    "noise": "Amortised noise-model importance: 1 - B, where B is the noise scale the "
             "model may add to a voxel without changing the predicted age (0: any noise "
             "changes the prediction, 1 - B near 1: the voxel matters).",
    "noise_per_subject": "Noise importance optimised for each subject (1 - B).",
    "saliency": "Absolute gradient of the predicted age with respect to the voxel (captum).",
    "integrated_gradients": "Integrated gradients of the predicted age from a black image "
                            "(captum).",
}

#: Units of each method's values.
METHOD_UNITS = {
    "noise": "arbitrary (importance, 0 to 1)",
    "noise_per_subject": "arbitrary (importance, 0 to 1)",
    "saliency": "years per intensity unit (gradient magnitude)",
    "integrated_gradients": "years (attribution of the predicted age)",
}

#: Data dictionary of ``brainage.tsv`` (BIDS tabular-file sidecar).
BRAINAGE_COLUMNS: dict[str, dict[str, str]] = {
    "participant_id": {"Description": "Participant label (sub-<label>)."},
    "session": {"Description": "Session label (ses-<label>) of the image."},
    "run": {"Description": "Run index of the image."},
    "age": {"Description": "Chronological age at the scan.", "Units": "year"},
    "sex": {"Description": "Sex (M or F).", "Levels": {"M": "male", "F": "female"}},
    "site": {"Description": "Acquisition site or source dataset."},
    "split": {"Description": "Split of the study the image belongs to.",
              "Levels": {"train": "fitted on", "val": "early stopping and the bias "
                         "correction", "test": "held out, reported"}},
    "predicted_age": {"Description": "Brain age: the predictor's age estimate.",
                      "Units": "year"},
    "gap": {"Description": "Brain-age gap: predicted_age - age.", "Units": "year"},
    "predicted_age_corrected": {
        "Description": "Predicted age after the linear age-bias correction: the gap's "
                       "linear trend with age (gap = slope * age + intercept, fitted on the "
                       "validation split) is removed, so that the corrected gap does not "
                       "depend on age (regression to the mean).",
        "Units": "year"},
    "gap_corrected": {"Description": "predicted_age_corrected - age: the bias-corrected "
                                     "brain-age gap.", "Units": "year"},
    "true_gap": {"Description": "Synthetic cohorts: the planted gap (biological - "
                                "chronological age).", "Units": "year"},
    "group": {"Description": "Synthetic cohorts: the planted group."},
    "baseline_predicted_age": {"Description": "Age predicted by the baseline model.",
                               "Units": "year"},
}


def derivatives_dir(run_dir: str | os.PathLike) -> Path:
    """``<run>/derivatives``."""
    return Path(run_dir) / DERIVATIVES_DIR


def map_name(label: str, resolution: int, desc: str) -> str:
    """BIDS name of a map: ``<label>_space-..._res-<mm>_desc-<desc>_map.nii.gz``.

    ``label`` is an image key (``sub-01_ses-02``) or "" for a group map.
    """
    entities = f"space-{SPACE}_res-{resolution}_desc-{desc}_map.nii.gz"
    return f"{label}_{entities}" if label else entities


def write_derivatives(run_dir: str | os.PathLike) -> Path:
    """Write (or rebuild) the run's BIDS-Derivatives view; return its folder.

    Parameters
    ----------
    run_dir : str or os.PathLike
        A run folder with ``config.yaml``; whatever of ``tables/predictions.csv``,
        ``tables/subject_maps.csv``, the population, age-band and method maps exists is
        included.

    Returns
    -------
    pathlib.Path
        The dataset folder, ``<run>/derivatives``.
    """
    from brainage_core import __version__
    from brainage_core.study.config import config_hash

    run = RunDir(run_dir)
    if not run.config_path.is_file():
        raise BrainAgeInputError("not a run folder (no config.yaml)", run.root)
    config = run.load_config()
    resolution = int(config["data"].get("resolution", 4))
    out = derivatives_dir(run.root)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    settings = dict(config.get("maps") or {})
    write_json(partial / "dataset_description.json", {
        "Name": f"brainage-study importance maps, run {run.root.resolve().name}",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [{
            "Name": "brainage-study",
            "Version": str(__version__),
            "Description": f"configuration hash {config_hash(config, 16)} (config.yaml of "
                           "the run folder)",
            "ConfigHash": config_hash(config, 16),
        }],
        "SourceDatasets": [{"Description": f"data.source = {config['data'].get('source')}"}],
    })
    _brainage_table(run, partial)
    index = run.table("subject_maps")
    if index.is_file():
        for row in pd.read_csv(index).itertuples(index=False):
            source = run.root / str(row.path)
            if not source.is_file():
                continue
            label = str(row.participant_id)
            folder = partial.joinpath(*_entity_folders(label), "anat")
            name = map_name(label, resolution, METHOD_DESC["noise"])
            _place(source, folder / name)
            _sidecar(folder / name, "noise", settings, extra={"Split": str(row.split),
                                                              "Age": float(row.age)})
    _group_maps(run, partial / "group", resolution, settings)
    if out.exists():
        shutil.rmtree(out)
    os.replace(partial, out)
    return out


def _brainage_table(run: RunDir, out: Path) -> None:
    source = run.table("predictions")
    if not source.is_file():
        return
    table = pd.read_csv(source)
    write_table(out / "brainage.tsv", table.fillna("n/a"))
    dictionary: dict[str, Any] = {}
    for column in table.columns:
        dictionary[column] = BRAINAGE_COLUMNS.get(column, {"Description": column})
    prediction = run.read_metrics().get("prediction", {})
    if "predicted_age_corrected" in dictionary and "bias_slope" in prediction:
        dictionary["predicted_age_corrected"] = {
            **dictionary["predicted_age_corrected"],
            "BiasCorrection": {"slope": prediction["bias_slope"],
                               "intercept": prediction.get("bias_intercept")}}
    write_json(out / "brainage.json", dictionary)


def _group_maps(run: RunDir, out: Path, resolution: int, settings: Mapping[str, Any]) -> None:
    noise = METHOD_DESC["noise"]
    population = run.population_map
    if population.is_file():
        name = map_name("", resolution, f"{noise}Population")
        _place(population, out / name)
        _sidecar(out / name, "noise", settings,
                 extra={"Statistic": "mean over the test subjects' maps"})
    band = re.compile(r"population_age-([0-9.]+)-([0-9.]+)_importance\.nii\.gz$")
    for path in sorted((run.root / "maps").glob("population_age-*_importance.nii.gz")):
        match = band.match(path.name)
        if not match:
            continue
        lo, hi = match.groups()
        name = map_name("", resolution,
                        f"{noise}Age{lo.replace('.', 'p')}to{hi.replace('.', 'p')}")
        _place(path, out / name)
        _sidecar(out / name, "noise", settings, extra={
            "Statistic": "mean over the test subjects in the age band",
            "AgeBand": [float(lo), float(hi)]})
    for path in sorted(run.maps.glob(run.method_map("*").name)):
        method = path.name[len("method-"):-len("_mean.nii.gz")]
        desc = METHOD_DESC.get(method, _alnum(method))
        name = map_name("", resolution, f"{desc}Mean")
        _place(path, out / name)
        _sidecar(out / name, method, settings,
                 extra={"Statistic": "mean over the compared test subjects' maps"})


def _sidecar(image: Path, method: str, settings: Mapping[str, Any],
             extra: Mapping[str, Any] | None = None) -> None:
    sidecar = image.with_name(image.name.replace(".nii.gz", ".json"))
    write_json(sidecar, {
        "Method": method,
        "Description": METHOD_DESCRIPTION.get(method, method),
        "Units": METHOD_UNITS.get(method, "arbitrary"),
        "Settings": dict(settings),
        "SpatialReference": SPACE,
        **dict(extra or {}),
    })


def _entity_folders(label: str) -> list[str]:
    parts = label.split("_")
    return [p for p in parts if p.startswith(("sub-", "ses-"))]


def _place(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _alnum(text: str) -> str:
    words = re.split(r"[^A-Za-z0-9]+", str(text))
    return words[0] + "".join(w[:1].upper() + w[1:] for w in words[1:] if w)
