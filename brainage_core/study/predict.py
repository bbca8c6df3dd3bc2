"""A trained run applied to new subjects: ``brainage-study predict``.

Two halves:

- :func:`write_predict_index` (called by notebook 02 after training) makes a run portable.
  It writes ``qc/reference.npz`` (the training cohort's brain-intensity percentiles and the
  out-of-distribution reference in the predictor's features, calibrated on the validation
  split) and ``index.json``: the files ``predict`` needs (paths relative to the run folder,
  with their SHA-256), the grid, the preprocessing, the fitted bias correction and the QC
  reference figures. Nothing else of the run, and not its data cache, is needed later, so a
  run folder copied to another machine predicts.
- :func:`predict_subjects` prepares each new image exactly as the training images were
  (the grid and preprocessing read from the index, checked against this code's), measures
  its quality (:mod:`brainage_core.data.qc`), predicts its age, applies the run's bias
  correction and, with ``maps``, writes its importance map with the run's noise model. It
  streams (one subject in memory at a time), records each subject atomically under
  ``OUT/subjects/`` and skips the subjects already recorded, so it resumes after an
  interruption; the table ``OUT/predictions.tsv`` and the QC page ``OUT/qc.html`` are
  rebuilt at the end.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from brainage_core._utils.io import (
    check_output_folder,
    save_nifti,
    write_json,
    write_table,
)
from brainage_core._utils.validation import BrainAgeInputError
from brainage_core.data.manifest import find_manifest_problems, image_labels
from brainage_core.data.preprocess import PREPROCESSING, preprocessing_description
from brainage_core.data.qc import (
    QCThresholds,
    check_qc_policy,
    intensity_distance,
    intensity_percentiles,
    ncc,
    needs_search,
    preprocess_with_qc,
    qc_reasons,
    reason_codes,
    search_pose_and_orientation,
)
from brainage_core.data.template import Template, load_template
from brainage_core.models.distributed import barrier, init_distributed
from brainage_core.models.evaluation import BiasCorrection, regression_metrics
from brainage_core.models.ood import FeatureOOD, predict_with_features
from brainage_core.plotting.qc import write_qc_page
from brainage_core.study.rundir import MAPS_FILES, PREDICT_FILES, RunDir

#: Version of ``index.json``'s layout.
INDEX_VERSION = 1

#: At most this many training subjects form the OOD reference (a seeded subset beyond).
MAX_OOD_REFERENCE = 1000

#: Manifest problems that do not stop ``predict``: a new subject may have no age.
_AGE_PROBLEMS = ("missing age", "has an image but is not listed")

#: QC measure columns of the table, in order.
QC_COLUMNS = ["ncc", "coverage", "outside_ratio", "intensity_distance", "voxel_size",
              "orientation", "ood"]


# -- the run side -------------------------------------------------------------------------
def sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_predict_index(
    run_dir: str | os.PathLike,
    *,
    cohort: Any = None,
    model: torch.nn.Module | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> Path:
    """Write ``qc/reference.npz`` and ``index.json``: what ``predict`` needs from the run.

    Parameters
    ----------
    run_dir : str or os.PathLike
        The run folder, with ``config.yaml``, ``checkpoints/predictor.pt`` and the
        ``prediction`` section of ``metrics.json`` (bias correction).
    cohort : PreparedCohort or None, default=None
        The run's training cohort (None: loaded from the config's ``data`` section).
    model : torch.nn.Module or None, default=None
        The trained predictor (None: loaded from the checkpoint).
    batch_size : int, default=16
        Subjects per forward pass while the features are computed.
    progress : bool, default=True
        Show a progress bar.

    Returns
    -------
    pathlib.Path
        ``index.json``.
    """
    from brainage_core.data.cohort import load_cohort
    from brainage_core.models.training import load_predictor

    run = RunDir(run_dir)
    config = run.load_config()
    if not run.predictor_checkpoint.is_file():
        raise BrainAgeInputError("no trained predictor: run notebooks/02_train.ipynb first",
                                 run.predictor_checkpoint)
    prediction = run.read_metrics().get("prediction") or {}
    if "bias_slope" not in prediction or "bias_intercept" not in prediction:
        raise BrainAgeInputError("metrics.json has no fitted bias correction (prediction."
                                 "bias_slope/bias_intercept): run notebooks/02_train.ipynb",
                                 run.metrics_path)
    if cohort is None:
        cohort = load_cohort(config["data"], progress=progress)
    if model is None:
        model = load_predictor(run.predictor_checkpoint)
    template = load_template(cohort.resolution)

    train = np.asarray(cohort.indices("train"))
    if len(train) > MAX_OOD_REFERENCE:
        train = np.sort(np.random.default_rng(0).choice(train, MAX_OOD_REFERENCE, replace=False))
    val = np.asarray(cohort.indices("val"))
    percentiles, nccs = [], []
    features: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    bar = tqdm(total=len(train) + len(val), desc="QC reference", unit="img",
               disable=None if progress else True)
    device = next(model.parameters()).device
    for split, idx in (("train", train), ("val", val)):
        for start in range(0, len(idx), batch_size):
            chunk = idx[start:start + batch_size]
            images = np.stack([cohort.image(int(i)) for i in chunk])
            if split == "train":
                for image in images:
                    percentiles.append(intensity_percentiles(image, template.mask))
                    nccs.append(ncc(image, template))
            _, feats = predict_with_features(model, torch.from_numpy(images)[:, None].to(device))
            features[split].append(feats)
            bar.update(len(chunk))
    bar.close()
    ood = FeatureOOD.fit(np.concatenate(features["train"]), np.concatenate(features["val"]))
    reference_percentiles = np.median(np.stack(percentiles), axis=0)
    run.qc_reference.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"intensity_percentiles": reference_percentiles, **ood.to_arrays()}
    tmp = run.qc_reference.with_name(f".{run.qc_reference.name}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, run.qc_reference)

    files = {
        name: {"path": rel, "sha256": sha256(run.root / rel)}
        for name, rel in PREDICT_FILES.items()
        if name != "config"
    }
    files["config"] = {"path": PREDICT_FILES["config"]}  # read, not pinned (notes may change)
    index = {
        "version": INDEX_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "files": files,
        "optional_files": {
            name: {"path": rel, "for": "--maps"} for name, rel in MAPS_FILES.items()
        },
        "grid": {
            "resolution": int(cohort.resolution),
            "shape": list(cohort.shape),
            "affine": np.asarray(cohort.affine).tolist(),
        },
        "preprocessing": cohort.metadata.get("preprocessing", PREPROCESSING),
        "bias_correction": {
            "slope": float(prediction["bias_slope"]),
            "intercept": float(prediction["bias_intercept"]),
            "model": "pred - age = slope * age + intercept",
            "fitted_on": "validation split",
        },
        "qc_reference": {
            "n_train": int(len(train)),
            "n_val": int(len(val)),
            "ncc_median": float(np.median(nccs)),
            "ncc_range": [float(np.min(nccs)), float(np.max(nccs))],
            "ood_max": float(ood.threshold),
            "ood_calibration": "99th percentile of the validation scores x 1.5",
        },
        "training": {"test_mae": prediction.get("test_mae"), "learned": prediction.get("learned")},
    }
    write_json(run.index_path, index)
    return run.index_path


@dataclass
class TrainedRun:
    """What ``predict`` reads from a run folder (through its ``index.json``).

    Attributes
    ----------
    run : RunDir
    index : dict
        ``index.json``.
    template : Template
        The run's grid.
    model : torch.nn.Module
        The predictor (eval mode, on the device it was opened for).
    correction : BiasCorrection
        The bias correction fitted in the run.
    ood : FeatureOOD
        The out-of-distribution reference.
    reference : dict
        QC reference: ``ncc_median``, ``ood_max``, ``intensity_percentiles``.
    """

    run: RunDir
    index: dict[str, Any]
    template: Template
    model: torch.nn.Module
    correction: BiasCorrection
    ood: FeatureOOD
    reference: dict[str, Any]

    @property
    def registered(self) -> bool:
        """Whether the run's training images were registered on the way in."""
        return "registration" in self.index["preprocessing"]

    @classmethod
    def open(cls, run_dir: str | os.PathLike, *, resolution: int | None = None,
             maps: bool = False, device: str | torch.device = "cpu") -> TrainedRun:
        """Open a trained run, checking every file ``predict`` needs.

        Parameters
        ----------
        run_dir : str or os.PathLike
            The run folder (it may have been moved or copied: paths are relative).
        resolution : int or None, default=None
            The grid the caller expects (mm); another grid than the run's is an error.
        maps : bool, default=False
            Also require the noise model (``predict --maps``).
        device : str or torch.device, default="cpu"
            Where the predictor (and the noise model) compute.
        """
        from brainage_core.models.training import load_predictor

        run = RunDir(Path(run_dir).expanduser())
        if not run.root.is_dir():
            raise BrainAgeInputError("run folder does not exist", run.root)
        index = run.read_index()
        if index.get("version") != INDEX_VERSION:
            raise BrainAgeInputError(
                f"index version {index.get('version')!r}; this code reads version "
                f"{INDEX_VERSION}. Write it again with write_predict_index.", run.index_path)
        for name, entry in index["files"].items():
            path = run.root / entry["path"]
            if not path.is_file():
                raise BrainAgeInputError(
                    f"the run is missing {entry['path']} ({name}), which predict needs", path)
            if "sha256" in entry and sha256(path) != entry["sha256"]:
                raise BrainAgeInputError(
                    f"{entry['path']} ({name}) changed since index.json was written (SHA-256 "
                    "differs): the run was retrained or the file replaced; write the index "
                    "again", path)
        if maps:
            for name, entry in index.get("optional_files", {}).items():
                path = run.root / entry["path"]
                if not path.is_file():
                    raise BrainAgeInputError(
                        f"--maps needs the run's {name} ({entry['path']}): run "
                        "notebooks/03_explain.ipynb first", path)
        grid = index["grid"]
        if resolution is not None and int(resolution) != int(grid["resolution"]):
            raise BrainAgeInputError(
                f"the run was trained on a {grid['resolution']} mm grid; {resolution} mm was "
                "requested. Use a run trained on that grid, or drop --resolution", run.root)
        registered = "registration" in index["preprocessing"]
        if index["preprocessing"] != preprocessing_description(registered):
            raise BrainAgeInputError(
                "the run's images were preprocessed differently from what this code does "
                f"({index['preprocessing']} vs {preprocessing_description(registered)}); "
                "predict with the version that trained it", run.index_path)
        template = load_template(int(grid["resolution"]))
        if list(template.shape) != list(grid["shape"]) or not np.allclose(
            template.affine, np.asarray(grid["affine"])
        ):
            raise BrainAgeInputError(
                f"the run's grid {grid['shape']} differs from this code's "
                f"{list(template.shape)} at {grid['resolution']} mm", run.index_path)
        model = load_predictor(run.root / index["files"]["predictor"]["path"],
                               map_location=device)
        with np.load(run.root / index["files"]["qc_reference"]["path"]) as arrays:
            stored = {k: arrays[k] for k in arrays.files}
        bias = index["bias_correction"]
        reference = {**index["qc_reference"],
                     "intensity_percentiles": stored["intensity_percentiles"]}
        return cls(run=run, index=index, template=template, model=model,
                   correction=BiasCorrection(float(bias["slope"]), float(bias["intercept"])),
                   ood=FeatureOOD.from_arrays(stored), reference=reference)

    def noise_explainer(self) -> Any:
        """The run's amortised noise model, for ``--maps``."""
        from brainage_core.explain.noise.amortised import NoiseMapExplainer

        path = self.run.root / MAPS_FILES["noise_model"]
        return NoiseMapExplainer.load(path, self.model, mask=self.template.mask)


# -- the new subjects ---------------------------------------------------------------------
def check_predict_manifest(manifest: pd.DataFrame, source: str) -> pd.DataFrame:
    """Keep the rows ``predict`` can use; ages may be missing, nothing else may be wrong.

    Rows without an image (a BIDS participant with no T1w) are dropped with a notice in
    ``attrs["dropped"]``; any other problem (a missing file, a duplicate, a non-numeric
    age) is an error naming the participant and the file.
    """
    problems = find_manifest_problems(manifest)
    no_image = problems["reason"].str.startswith("no image path")
    age_only = problems["reason"].str.startswith(_AGE_PROBLEMS)
    # an age problem hides a missing path: look again at those rows
    for row in problems.loc[age_only, "row"]:
        path = manifest.iloc[int(row)]["path"]
        if pd.isna(path) or str(path) == "":
            no_image[problems["row"] == row] = True
        elif not Path(str(path)).is_file():
            raise BrainAgeInputError(
                f"participant {manifest.iloc[int(row)]['participant_id']!r}: image file does "
                f"not exist (in {source})", path)
    bad = problems[~(no_image | age_only)]
    if len(bad):
        first = bad.iloc[0]
        raise BrainAgeInputError(
            f"participant {first['participant_id']!r}: {first['reason']} (in {source})",
            first["path"] or source)
    drop = problems.loc[no_image, "row"].to_numpy(dtype=int)
    keep = np.ones(len(manifest), dtype=bool)
    keep[drop] = False
    clean = manifest.loc[keep].reset_index(drop=True).copy()
    if len(clean) == 0:
        raise BrainAgeInputError("no participant with an image", source)
    clean["participant_id"] = clean["participant_id"].astype(str)
    clean["age"] = pd.to_numeric(clean["age"], errors="coerce").astype(float)
    clean.attrs = {"dropped": manifest.iloc[drop]["participant_id"].astype(str).tolist()}
    return clean


@dataclass
class PredictResult:
    """What :func:`predict_subjects` gives back.

    Attributes
    ----------
    table : pandas.DataFrame
        One row per subject (also ``OUT/predictions.tsv``).
    metrics : dict
        ``n``, ``n_predicted``, ``n_flagged``, ``n_skipped``, ``n_with_age`` and, with ages,
        ``mae`` and ``r`` over the predicted subjects, and ``mae_qc_pass``/``r_qc_pass`` over
        those that passed QC; ``seconds_per_subject`` of the subjects computed in this call.
    out : pathlib.Path
        The output folder.
    """

    table: pd.DataFrame
    metrics: dict[str, Any]
    out: Path


def predict_subjects(
    run_dir: str | os.PathLike,
    manifest: pd.DataFrame,
    out: str | os.PathLike,
    *,
    maps: bool = False,
    qc: str = "warn",
    thresholds: QCThresholds | None = None,
    resolution: int | None = None,
    register: bool | None = None,
    source: str = "manifest",
    progress: bool = True,
    device: str = "auto",
) -> PredictResult:
    """Predict the brain age of new subjects with a trained run (see the module docstring).

    Under ``torchrun`` (``WORLD_SIZE`` > 1; ``brainage-study predict --nproc N``) each
    process predicts (and maps) every ``N``-th subject, on the GPU of its ``LOCAL_RANK``
    when there is one, and records them; then rank 0 alone writes the table, the
    metrics and the QC page, which are those one process writes.

    Parameters
    ----------
    run_dir : str or os.PathLike
        The trained run folder (with ``index.json``).
    manifest : pandas.DataFrame
        ``participant_id``, ``path`` and, where known, ``age`` (from ``load_bids``/
        ``load_csv`` with ``require_age=False``).
    out : str or os.PathLike
        Output folder: ``predictions.tsv``, ``bias_correction.json``, ``qc.html``,
        ``qc_mosaic.png``, ``subjects/`` (one record per subject) and, with ``maps``,
        ``maps/<label>_importance.nii.gz``.
    maps : bool, default=False
        Also write each subject's importance map with the run's noise model.
    qc : {"warn", "skip", "raise"}, default="warn"
        A subject failing QC is predicted and flagged (``warn``), flagged and not predicted
        (``skip``), or stops the command with its reasons (``raise``).
    thresholds : QCThresholds or None, default=None
        QC limits (None: the documented defaults).
    resolution : int or None, default=None
        The grid the caller expects; another grid than the run's is an error.
    register : bool or None, default=None
        Register each image affinely to the MNI template first (raw T1 images). None does
        what the run's training data went through; True also registers the new images of
        a run trained on images already in MNI space.
    source : str, default="manifest"
        Name of the manifest's source in error messages.
    progress : bool, default=True
        Show a progress bar (tqdm; silenced by ``TQDM_DISABLE=1``).
    device : str, default="auto"
        ``"auto"`` (the GPU of this process's ``LOCAL_RANK`` when CUDA is present, else
        the CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Returns
    -------
    PredictResult
        In every process; ``seconds_per_subject`` and ``n_computed`` count all processes.
    """
    qc = check_qc_policy("qc", qc)
    thresholds = thresholds or QCThresholds()
    ctx = init_distributed(device)
    trained = TrainedRun.open(run_dir, resolution=resolution, maps=maps, device=ctx.device)
    manifest = check_predict_manifest(manifest, source)
    out = check_output_folder(out, "--out")
    records_dir = out / "subjects"
    records_dir.mkdir(parents=True, exist_ok=True)
    explainer = trained.noise_explainer() if maps else None
    register = trained.registered if register is None else bool(register)
    model_id = trained.index["files"]["predictor"]["sha256"]
    labels = image_labels(manifest)
    computed, seconds = 0, 0.0
    mine = range(ctx.rank, len(manifest), ctx.world_size)
    bar = tqdm(total=len(mine), desc="predict", unit="subject",
               disable=None if progress and ctx.is_main else True)
    for i in mine:
        row = manifest.iloc[i]
        label = labels[i]
        record_path = records_dir / f"{label}.json"
        map_path = out / "maps" / f"{label}_importance.nii.gz"
        if _is_current(record_path, model_id, qc, row["path"]) and (
            not maps or map_path.is_file() or not _predicted(record_path)
        ):
            bar.update(1)
            continue
        start = time.perf_counter()
        record = _predict_one(trained, row, label, qc=qc, thresholds=thresholds,
                              explainer=explainer, map_path=map_path, register=register)
        record["model_sha256"] = model_id
        write_json(record_path, record)
        computed += 1
        seconds += time.perf_counter() - start
        bar.update(1)
    bar.close()
    if ctx.distributed:  # every process's records are written before rank 0 reads them
        counts: list[Any] = [None] * ctx.world_size
        dist.all_gather_object(counts, (computed, seconds))
        computed, seconds = sum(c for c, _ in counts), sum(t for _, t in counts)
    table = _collect(manifest, labels, records_dir)
    metrics = _metrics(table)
    metrics["seconds_per_subject"] = seconds / computed if computed else None
    metrics["n_computed"] = computed
    if ctx.is_main:
        write_table(out / "predictions.tsv", table)
        write_json(out / "bias_correction.json", {
            **trained.index["bias_correction"],
            "run": str(trained.run.root.resolve()),
            "qc_thresholds": thresholds.to_dict(),
            "qc_reference": {k: v for k, v in trained.reference.items()
                             if k != "intensity_percentiles"},
        })
        write_json(out / "metrics.json", metrics)
        write_qc_page(table, out, trained.template, title=f"QC of {len(table)} subjects "
                      f"(run {trained.run.root.name})")
    barrier(ctx)
    return PredictResult(table=table, metrics=metrics, out=out)


def _predict_one(trained: TrainedRun, row: pd.Series, label: str, *, qc: str,
                 thresholds: QCThresholds, explainer: Any, map_path: Path,
                 register: bool) -> dict[str, Any]:
    path = str(row["path"])
    age = float(row["age"]) if pd.notna(row["age"]) else None
    record: dict[str, Any] = {"label": label, "participant_id": str(row["participant_id"]),
                              "path": path, "age": age}
    try:
        result = preprocess_with_qc(path, trained.template, register=register)
    except BrainAgeInputError as err:
        if qc == "raise":
            raise
        record.update(qc_pass=False, qc_reasons=[f"unreadable: {err}"], qc_action="skipped")
        return record
    measures = dict(result.measures)
    # exactly the training images' numbers: the cache stores float16
    image = result.image.astype(np.float16).astype(np.float32)
    measures["intensity_distance"] = intensity_distance(
        image, trained.template.mask, trained.reference["intensity_percentiles"])
    if needs_search(measures, thresholds, trained.reference):
        measures.update(search_pose_and_orientation(result.aligned))
    x = torch.from_numpy(image)[None, None].to(next(trained.model.parameters()).device)
    ages, features = predict_with_features(trained.model, x)
    measures["ood"] = float(trained.ood.score(features)[0])
    reasons = qc_reasons(measures, thresholds, trained.reference,
                         resolution=trained.template.resolution)
    record.update({k: measures.get(k) for k in (*QC_COLUMNS, "orientation_fix", "pose_fix")})
    record["qc_pass"] = not reasons
    record["qc_reasons"] = reasons
    if reasons and qc == "raise":
        raise BrainAgeInputError(
            f"participant {label!r} fails quality control: {'; '.join(reasons)} (use --qc warn "
            "to predict and flag it, --qc skip to leave it out)", path)
    if reasons and qc == "skip":
        record["qc_action"] = "skipped"
        return record
    record["qc_action"] = "flagged" if reasons else "ok"
    pred = float(ages[0])
    record["predicted_age"] = pred
    if age is not None:
        record["gap"] = pred - age
        record["predicted_age_corrected"] = float(
            trained.correction.corrected_prediction([age], [pred])[0])
        record["gap_corrected"] = float(trained.correction.corrected_gap([age], [pred])[0])
    if explainer is not None:
        importance = explainer.attribute(x)[0, 0].cpu().numpy().astype(np.float32)
        save_nifti(trained.template.to_image(importance), map_path)
        record["map"] = os.path.join("maps", map_path.name)
    return record


def _is_current(record_path: Path, model_id: str, qc: str, path: str) -> bool:
    """A recorded subject is kept if the same model and image made it under the same policy."""
    if not record_path.is_file():
        return False
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    same = record.get("model_sha256") == model_id and record.get("path") == path
    # a subject skipped under --qc skip is computed again under --qc warn
    return same and not (record.get("qc_action") == "skipped" and qc == "warn"
                         and not str(record.get("qc_reasons", [""])[0]).startswith("unreadable"))


def _predicted(record_path: Path) -> bool:
    record = json.loads(record_path.read_text(encoding="utf-8"))
    return record.get("predicted_age") is not None


_TABLE_COLUMNS = ["participant_id", "age", "predicted_age", "gap", "predicted_age_corrected",
                  "gap_corrected", "qc_pass", "qc_action", "qc_flags", "qc_reasons", *QC_COLUMNS,
                  "orientation_fix", "pose_fix", "map", "path"]


def _collect(manifest: pd.DataFrame, labels: list[str], records_dir: Path) -> pd.DataFrame:
    rows = []
    for (_, row), label in zip(manifest.iterrows(), labels, strict=True):
        record = json.loads((records_dir / f"{label}.json").read_text(encoding="utf-8"))
        record["qc_flags"] = ";".join(reason_codes(record.get("qc_reasons", [])))
        record["qc_reasons"] = " | ".join(record.get("qc_reasons", []))
        for extra in ("session", "run"):
            if extra in manifest.columns and pd.notna(row.get(extra)):
                record[extra] = row[extra]
        rows.append(record)
    table = pd.DataFrame(rows)
    for column in _TABLE_COLUMNS:
        if column not in table:
            table[column] = np.nan
    extras = [c for c in ("session", "run") if c in table]
    return table[["participant_id", *extras, *_TABLE_COLUMNS[1:]]]


def _metrics(table: pd.DataFrame) -> dict[str, Any]:
    predicted = table[table["predicted_age"].notna()]
    out: dict[str, Any] = {
        "n": int(len(table)),
        "n_predicted": int(len(predicted)),
        "n_flagged": int((~table["qc_pass"].astype(bool)).sum()),
        "n_skipped": int((table["qc_action"] == "skipped").sum()),
        "n_with_age": int(table["age"].notna().sum()),
    }
    with_age = predicted[predicted["age"].notna()]
    if len(with_age):
        m = regression_metrics(with_age["age"], with_age["predicted_age"])
        out["mae"], out["r"] = m["mae"], m["r"]
        ok = with_age[with_age["qc_pass"].astype(bool)]
        m = regression_metrics(ok["age"], ok["predicted_age"])
        out["mae_qc_pass"], out["r_qc_pass"] = m["mae"], m["r"]
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in out.items()}


def qc_summary(table: pd.DataFrame) -> Mapping[str, int]:
    """How many subjects each QC reason flagged."""
    codes = [c for flags in table["qc_flags"].fillna("") for c in str(flags).split(";") if c]
    return dict(pd.Series(codes, dtype=object).value_counts().items())
