"""The importance-map steps of a study run, as the notebooks call them.

A run folder (:class:`~brainage_core.rundir.RunDir`) holds the configuration, the trained
predictor and everything the map steps write:

* ``checkpoints/noise_model.pt``: the amortised noise model (resumable);
* ``tables/lambda_calibration.csv``: the MAE–noise trade-off curve, if lambda was
  calibrated;
* ``maps/sub-XXXX_importance.nii.gz``: per-subject maps (template space), indexed by
  ``tables/subject_maps.csv``;
* ``maps/population_importance.nii.gz`` and ``population_age-<lo>-<hi>_importance.nii.gz``;
* ``maps/method-<name>_mean.nii.gz``: each compared method's mean map (notebook 06);
* ``tables/regions.csv``, ``tables/method_comparison.csv``, ``tables/deletion_curves.csv``;
* ``metrics.json`` sections ``maps`` ({method: {localisation_auroc, relevance_mass,
  deletion_auc, ms_per_subject, ...}}) and ``regions`` ({"top": [...]}).

Each function here is one step of notebooks ``03_explain``, ``04_average`` and
``06_compare_methods``; they hold no computation of their own beyond wiring.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from . import population as population_mod
from ._io import save_nifti, write_json, write_table
from ._validation import BrainAgeInputError
from .attribution import CaptumExplainer
from .calibration import calibrate_lambda
from .noise_maps import MapsConfig, NoiseMapExplainer, PerSubjectNoiseMap, _read_checkpoint
from .regions import region_table, top_regions, write_region_table
from .rundir import RunDir
from .scoring import (
    deletion_auc,
    deletion_curve,
    depth_matched_auroc,
    faithfulness,
    localisation_auroc,
    planted_ranks,
    relevance_mass,
    truth_on_grid,
)

#: Names of the methods in tables and in ``metrics.json``.
NOISE = "noise"
NOISE_PER_SUBJECT = "noise_per_subject"

NOISE_CHECKPOINT = "noise_model.pt"
CALIBRATION_TABLE = "lambda_calibration.csv"
RELIANCE_TABLE = "effect_reliance.csv"
MAPS_SOURCE = ".maps_source.json"
SUBJECT_MAPS_TABLE = "subject_maps.csv"
REGIONS_TABLE = "regions.csv"


@dataclass
class GroundTruth:
    """The planted age signal of a synthetic cohort, on the cohort's grid.

    Attributes
    ----------
    mask : numpy.ndarray of bool
        Voxels that carry planted age signal.
    regions : list of str
        Atlas patterns of the planted regions.
    effect_masks : dict of str to numpy.ndarray
        The voxels of each kind of effect (for example ``"cortical_thinning"``), so that
        a map can be scored per effect; empty when unknown.
    """

    mask: np.ndarray
    regions: list[str]
    effect_masks: dict[str, np.ndarray] = field(default_factory=dict)


# -- the study a map step works on ------------------------------------------------------------
@dataclass
class MapsStudy:
    """Everything a map step needs, opened from a run folder.

    Attributes
    ----------
    run : RunDir
        The run folder.
    config : dict
        Its resolved configuration.
    settings : MapsConfig
        The ``maps`` section.
    cohort : PreparedCohort
        The prepared cohort of the ``data`` section.
    predictor : torch.nn.Module
        The trained predictor (eval mode).
    """

    run: RunDir
    config: dict[str, Any]
    settings: MapsConfig
    cohort: Any
    predictor: nn.Module
    truth: GroundTruth | None = None

    @classmethod
    def open(
        cls,
        run_dir: str | os.PathLike,
        *,
        overrides: dict[str, Any] | None = None,
        progress: bool = True,
    ) -> MapsStudy:
        """Open the run: read the config, load the cohort and the trained predictor.

        Parameters
        ----------
        run_dir : str or os.PathLike
            The run folder (with ``config.yaml`` and ``checkpoints/predictor.pt``).
        overrides : dict or None, default=None
            ``maps`` settings replacing the config's (notebook knobs); None values are
            ignored.
        progress : bool, default=True
            Show progress bars while the cohort is loaded.
        """
        from .study import load_cohort
        from .training import load_predictor

        run = RunDir(run_dir)
        config = run.load_config()
        section = dict(config.get("maps") or {})
        section.update({k: v for k, v in (overrides or {}).items() if v is not None})
        settings = MapsConfig.from_dict(section, seed=config.get("seed", 0))
        if settings.num_threads is not None:
            torch.set_num_threads(settings.num_threads)
        cohort = load_cohort(config["data"], progress=progress)
        ckpt = run.root / "checkpoints" / "predictor.pt"
        if not ckpt.is_file():
            raise BrainAgeInputError(
                "no trained predictor: run notebooks/02_train.ipynb first", ckpt
            )
        predictor = load_predictor(ckpt, map_location="cpu")
        return cls(run=run, config=config, settings=settings, cohort=cohort, predictor=predictor)

    # -- data -------------------------------------------------------------------------------
    def dataset(self, split: str) -> Any:
        """The :class:`~brainage_core.datasets.CohortDataset` of one split."""
        from .datasets import CohortDataset

        return CohortDataset(self.cohort, split=split)

    def subset(self, split: str, n: int | None) -> Any:
        """A dataset of at most ``n`` subjects of a split (a seeded random subset)."""
        from .datasets import CohortDataset

        idx = self.indices(split)
        if n is not None and len(idx) > n:
            rng = np.random.default_rng(self.settings.seed or 0)
            idx = np.sort(rng.choice(idx, size=int(n), replace=False))
        return CohortDataset(self.cohort, indices=idx)

    def indices(self, split: str = "test", n: int | None = None) -> np.ndarray:
        """Cohort positions of a split's subjects (the first ``n`` if given)."""
        idx = np.asarray(self.cohort.indices(split))
        return idx if n is None else idx[: int(n)]

    def images(self, indices: Any) -> torch.Tensor:
        """Images of the given subjects as a float32 tensor ``(N, 1, X, Y, Z)``."""
        arr = np.stack([self.cohort.image(int(i)) for i in indices]).astype(np.float32)
        return torch.from_numpy(arr)[:, None]

    def ages(self, indices: Any) -> np.ndarray:
        return self.cohort.table["age"].to_numpy(dtype=float)[np.asarray(indices, dtype=int)]

    def participant_ids(self, indices: Any) -> list[str]:
        """Keys of the given rows: ``sub-<label>``, with ``_ses-``/``_run-`` when the
        cohort keeps several sessions or runs per subject (map file names use them)."""
        from .manifest import image_labels

        ids = image_labels(self.cohort.table)
        return [ids[int(i)] for i in indices]

    @property
    def noise_checkpoint(self) -> Path:
        return self.run.checkpoints / NOISE_CHECKPOINT

    def atlas(self) -> Any:
        """The Harvard–Oxford atlas on the cohort's grid."""
        from .atlas import load_atlas

        return load_atlas(self.cohort.resolution)


# -- 03: fit the noise model ---------------------------------------------------------------
@dataclass
class FitResult:
    """Outcome of :func:`fit_noise_model`.

    Attributes
    ----------
    explainer : NoiseMapExplainer
        The trained amortised explainer.
    calibration : pandas.DataFrame or None
        The lambda trade-off curve, if lambda was calibrated.
    train_seconds : float
        Total training time of the noise model (all epochs, resumed ones included).
    """

    explainer: NoiseMapExplainer
    calibration: pd.DataFrame | None
    train_seconds: float


def fit_noise_model(study: MapsStudy, *, progress: bool = True) -> FitResult:
    """Fit (or resume, or load) the amortised noise model of the run.

    If ``maps.calibrate`` is true, lambda is first calibrated on the training and
    validation splits (once: the curve is kept in ``tables/lambda_calibration.csv`` and
    reused). The model trains on the training split with the validation split monitored,
    checkpointing to ``checkpoints/noise_model.pt`` after every epoch; a complete
    checkpoint with the same settings is loaded instead. A checkpoint with other settings
    (the config changed) is replaced, with a warning.
    """
    s = study.settings
    kwargs = s.explainer_kwargs()
    curve = None
    if s.calibrate:
        curve = _calibration_curve(study, progress=progress)
        kwargs["lam"] = float(curve.loc[curve["chosen"], "lam"].iloc[0])
    explainer = NoiseMapExplainer(study.predictor, mask=study.cohort.mask, **kwargs)
    resume = True
    if study.noise_checkpoint.is_file():
        stored = _read_checkpoint(study.noise_checkpoint)["settings"]
        if stored != explainer.settings():
            warnings.warn(
                f"{study.noise_checkpoint}: trained with {stored}, the config now asks for "
                f"{explainer.settings()}; training a new noise model.",
                stacklevel=2,
            )
            resume = False
    explainer.fit(
        study.subset("train", s.max_train_subjects),
        study.subset("val", s.max_val_subjects),
        epochs=s.epochs,
        batch_size=s.batch_size,
        lr=s.lr,
        checkpoint_path=study.noise_checkpoint,
        resume=resume,
        progress=progress,
    )
    seconds = float(explainer.history_["seconds"].sum())
    study.run.update_metrics(
        "maps",
        {
            NOISE: {
                **study.run.read_metrics().get("maps", {}).get(NOISE, {}),
                "lam": explainer.lam,
                "epochs": explainer.epochs_trained,
                "train_seconds": seconds,
                "target": explainer.target,
            }
        },
    )
    return FitResult(explainer=explainer, calibration=curve, train_seconds=seconds)


def load_noise_model(study: MapsStudy) -> NoiseMapExplainer:
    """The trained noise model of the run (``checkpoints/noise_model.pt``)."""
    if not study.noise_checkpoint.is_file():
        raise BrainAgeInputError(
            "no trained noise model: run notebooks/03_explain.ipynb first", study.noise_checkpoint
        )
    return NoiseMapExplainer.load(study.noise_checkpoint, study.predictor, mask=study.cohort.mask)


def _calibration_curve(study: MapsStudy, *, progress: bool) -> pd.DataFrame:
    path = study.run.tables / CALIBRATION_TABLE
    s = study.settings
    if path.is_file():
        curve = pd.read_csv(path)
        same = sorted(curve["lam"].tolist()) == sorted(float(v) for v in s.lambdas)
        if same and "tolerance" in curve and float(curve["tolerance"].iloc[0]) == s.tolerance:
            return curve
    kwargs = s.explainer_kwargs()
    kwargs.pop("lam")
    result = calibrate_lambda(
        study.predictor,
        study.subset("train", s.max_train_subjects),
        study.subset("val", s.max_val_subjects),
        lambdas=s.lambdas,
        tolerance=s.tolerance,
        explainer_kwargs={"mask": study.cohort.mask, **kwargs},
        fit_kwargs={"epochs": s.calibration_epochs, "batch_size": s.batch_size, "lr": s.lr},
        progress=progress,
    )
    curve = result.curve.assign(tolerance=s.tolerance)
    write_table(path, curve)
    return curve


# -- 03: per-subject maps ------------------------------------------------------------------
def subject_map_path(maps_dir: str | os.PathLike, participant_id: str) -> Path:
    """``maps_dir/<participant_id>_importance.nii.gz``."""
    return Path(maps_dir) / f"{participant_id}_importance.nii.gz"


def write_subject_maps(
    study: MapsStudy,
    explainer: Any,
    *,
    split: str = "test",
    shard: tuple[int, int] | None = None,
    resume: bool = True,
    progress: bool = True,
) -> pd.DataFrame:
    """Explain every subject of a split and save the maps as NIfTI in template space.

    The step is resumable and can be sharded. With ``resume``, a subject whose map file
    already exists and was made by the same noise model (the SHA-256 of
    ``checkpoints/noise_model.pt``, recorded in ``maps/.maps_source.json``) is not
    explained again, so an interrupted run picks up where it stopped. With
    ``shard=(i, n)``, only every ``n``-th subject starting at ``i`` is explained: start
    ``n`` processes (or ``torchrun`` ranks) with ``i = 0 .. n-1`` once the noise model is
    trained, then call once more without ``shard`` to collect the index.

    Parameters
    ----------
    study : MapsStudy
        The run.
    explainer : object with ``attribute(x)``
        The run's trained noise model (or any captum-like explainer, with
        ``resume=False``).
    split : str, default="test"
        The split to explain.
    shard : tuple of (int, int) or None, default=None
        ``(index, count)`` of this worker's share; None explains (or collects) all.
    resume : bool, default=True
        Keep the existing maps of the run's noise model; False explains every subject
        again (needed when ``explainer`` is not the noise model of
        ``checkpoints/noise_model.pt``).
    progress : bool, default=True
        Show a progress bar.

    Returns
    -------
    pandas.DataFrame
        ``participant_id``, ``age``, ``split``, ``path`` (relative to the run folder) of
        the subjects of this call; without ``shard`` also written to
        ``tables/subject_maps.csv``.
    """
    indices = study.indices(split)
    if shard is not None:
        index, count = _check_shard(shard)
        indices = indices[index::count]
    if resume:
        source = _maps_source(study)
    else:  # maps of unknown origin: a later resume must not trust them
        (study.run.maps / MAPS_SOURCE).unlink(missing_ok=True)
        source = None
    todo = [i for i in indices if not _map_is_current(study, i, source)]
    batch = study.settings.batch_size
    for start in tqdm(
        range(0, len(todo), batch), desc=f"maps ({split})", disable=None if progress else True
    ):
        chunk = np.asarray(todo[start : start + batch])
        maps = explainer.attribute(study.images(chunk))
        for pid, arr in zip(study.participant_ids(chunk), maps[:, 0].numpy(), strict=True):
            save_nifti(
                study.cohort.to_image(arr.astype(np.float32)), subject_map_path(study.run.maps, pid)
            )
    table = pd.DataFrame(
        {
            "participant_id": study.participant_ids(indices),
            "age": [float(a) for a in study.ages(indices)],
            "split": split,
            "path": [
                os.path.relpath(subject_map_path(study.run.maps, pid), study.run.root)
                for pid in study.participant_ids(indices)
            ],
        },
        columns=["participant_id", "age", "split", "path"],
    )
    if shard is None:
        write_table(study.run.tables / SUBJECT_MAPS_TABLE, table)
    return table


def _check_shard(shard: Any) -> tuple[int, int]:
    ok = (
        isinstance(shard, (tuple, list))
        and len(shard) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in shard)
        and shard[1] >= 1
        and 0 <= shard[0] < shard[1]
    )
    if not ok:
        raise BrainAgeInputError(
            f"'shard' must be (index, count) with 0 <= index < count; {shard!r} was provided."
        )
    return int(shard[0]), int(shard[1])


def _maps_source(study: MapsStudy) -> str | None:
    """Identity of the noise model the maps come from; records it in ``maps/``.

    Maps made by another noise model (or an unknown one) are never reused.
    """
    ckpt = study.noise_checkpoint
    if not ckpt.is_file():
        return None
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    record = study.run.maps / MAPS_SOURCE
    try:
        previous = json.loads(record.read_text(encoding="utf-8")).get("noise_model_sha256")
    except (OSError, ValueError, AttributeError):
        previous = None
    if previous != digest:
        # Another noise model: every existing map is stale. Record the new one only
        # once the stale maps can no longer be mistaken for current ones.
        for stale in study.run.maps.glob("*_importance.nii.gz"):
            if not stale.name.startswith("population"):
                stale.unlink()
        write_json(record, {"noise_model_sha256": digest})
    return digest


def _map_is_current(study: MapsStudy, index: int, source: str | None) -> bool:
    if source is None:
        return False
    path = subject_map_path(study.run.maps, study.participant_ids([index])[0])
    if not path.is_file():
        return False
    try:
        return tuple(nib.load(path).shape) == tuple(study.cohort.mask.shape)
    except Exception:  # a truncated or foreign file: explain the subject again
        return False


def read_subject_maps(study: MapsStudy) -> pd.DataFrame:
    """The index of per-subject maps written by :func:`write_subject_maps` (absolute paths)."""
    path = study.run.root / "tables" / SUBJECT_MAPS_TABLE
    if not path.is_file():
        raise BrainAgeInputError("no per-subject maps: run notebooks/03_explain.ipynb first", path)
    table = pd.read_csv(path)
    table["path"] = [str(study.run.root / p) for p in table["path"]]
    return table


def time_methods(
    study: MapsStudy, explainer: NoiseMapExplainer, *, n_subjects: int | None = None
) -> pd.DataFrame:
    """Milliseconds per subject: one amortised forward pass vs per-subject optimisation.

    Both explain the same first ``n_subjects`` test subjects, one at a time. The figures
    go to ``metrics.json`` (``maps.<method>.ms_per_subject``).
    """
    n = study.settings.timing_subjects if n_subjects is None else int(n_subjects)
    indices = study.indices("test", n)
    if len(indices) == 0:
        return pd.DataFrame(columns=["method", "ms_per_subject", "n_subjects"])
    per_subject = _per_subject_explainer(study, explainer)
    rows = []
    for name, method in ((NOISE, explainer), (NOISE_PER_SUBJECT, per_subject)):
        images = study.images(indices)
        method.attribute(images[:1])  # warm-up (allocations, lazy initialisation)
        start = time.perf_counter()
        for i in range(len(indices)):
            method.attribute(images[i : i + 1])
        ms = 1000.0 * (time.perf_counter() - start) / len(indices)
        rows.append({"method": name, "ms_per_subject": ms, "n_subjects": len(indices)})
        _merge_metrics(study, name, {"ms_per_subject": ms})
    return pd.DataFrame(rows)


def _per_subject_explainer(study: MapsStudy, explainer: NoiseMapExplainer) -> PerSubjectNoiseMap:
    s = study.settings
    return PerSubjectNoiseMap(
        study.predictor,
        mask=study.cohort.mask,
        lam=explainer.lam,
        s_min=explainer.s_min,
        s_max=explainer.s_max,
        target=explainer.target,
        steps=s.per_subject_steps,
        lr=s.per_subject_lr,
        seed=explainer.seed,
    )


def _merge_metrics(study: MapsStudy, method: str, values: dict[str, Any]) -> None:
    current = study.run.read_metrics().get("maps", {}).get(method, {})
    study.run.update_metrics("maps", {method: {**current, **values}})


# -- 04: population maps, regions, ground truth -------------------------------------------
def load_truth(study: MapsStudy) -> GroundTruth | None:
    """The ground truth of a synthetic cohort on its grid; None for real data.

    ``study.truth``, when set, is returned as is.
    """
    if study.truth is not None:
        return study.truth
    root = study.cohort.metadata.get("source_root")
    if not root or not (Path(root) / "derivatives" / "ground_truth").is_dir():
        return None
    from .synth import load_ground_truth

    truth = load_ground_truth(root)
    grid = (study.cohort.affine, study.cohort.mask.shape)
    mask = truth_on_grid(truth.mask_img, *grid)
    effect_masks = {
        kind: truth_on_grid(img, *grid) & study.cohort.mask
        for kind, img in truth.effect_mask_imgs.items()
    }
    return GroundTruth(
        mask=mask & study.cohort.mask,
        regions=planted_patterns(truth),
        effect_masks=effect_masks,
    )


def truth_mask_image(run_dir: str | os.PathLike) -> nib.Nifti1Image | None:
    """The planted ground-truth mask of a run's synthetic cohort (its own grid); None for
    real data or before the data step has run."""
    root = RunDir(run_dir).read_metrics().get("data", {}).get("source_root")
    if not root or not (Path(root) / "derivatives" / "ground_truth").is_dir():
        return None
    from .synth import load_ground_truth

    return load_ground_truth(root).mask_img


def population_images(run_dir: str | os.PathLike) -> dict[str, nib.Nifti1Image]:
    """A run's population map and age-band maps, labelled for a viewer's menu."""
    maps = RunDir(run_dir).root / "maps"
    out: dict[str, nib.Nifti1Image] = {}
    population = maps / population_mod.POPULATION_FILE
    if population.is_file():
        out["population (all test subjects)"] = nib.load(population)
    bands = []
    for path in maps.glob("population_age-*_importance.nii.gz"):
        lo, hi = path.name[len("population_age-"):-len("_importance.nii.gz")].split("-")
        bands.append((float(lo), lo, hi, path))
    for _, lo, hi, path in sorted(bands):
        out[f"age {lo}-{hi}"] = nib.load(path)
    return out


def planted_patterns(truth: Any) -> list[str]:
    """Atlas patterns of the planted regions of a ``synth.GroundTruth``."""
    for name in ("planted_regions", "regions", "region_names"):
        value = getattr(truth, name, None)
        if value:
            return [str(v) for v in value]
    effects = getattr(truth, "effects", None)
    if effects is not None and "regions" in effects:
        out: list[str] = []
        for cell in effects["regions"]:
            out.extend(p.strip() for p in str(cell).replace(";", ",").split(",") if p.strip())
        return sorted(set(out))
    raise BrainAgeInputError("the ground truth names no planted regions")


@dataclass
class PopulationResult:
    """Outcome of :func:`population_maps`."""

    population: np.ndarray
    bands: dict[tuple[int, int], np.ndarray]
    paths: dict[str, Path]
    table: pd.DataFrame


def population_maps(study: MapsStudy) -> PopulationResult:
    """Population and age-band maps of the test subjects, and the region table.

    Writes the NIfTI maps to ``maps/``, the ranked region table to ``tables/regions.csv``
    and ``regions.top`` to ``metrics.json``.
    """
    s = study.settings
    index = read_subject_maps(study)
    paths = population_mod.save_population_maps(
        list(index["path"]),
        index["age"].to_numpy(),
        study.cohort.to_image,
        study.run.maps,
        width=s.age_band_width,
        min_subjects=s.age_band_min_subjects,
    )
    population = population_mod.mean_map(list(index["path"]))
    bands = population_mod.age_band_maps(
        list(index["path"]),
        index["age"].to_numpy(),
        width=s.age_band_width,
        min_subjects=s.age_band_min_subjects,
    )
    table = region_table(population, study.atlas(), min_voxels=s.min_region_voxels)
    write_region_table(table, study.run.tables / REGIONS_TABLE)
    study.run.update_metrics("regions", {"top": top_regions(table, s.top_regions)})
    return PopulationResult(population=population, bands=bands, paths=paths, table=table)


def score_map(
    importance: np.ndarray,
    table: pd.DataFrame | None,
    truth: GroundTruth | None,
    brain: np.ndarray,
) -> dict[str, Any]:
    """Localisation scores of one (population) map; empty without ground truth."""
    if truth is None:
        return {}
    scores: dict[str, Any] = {
        "localisation_auroc": localisation_auroc(importance, truth.mask, brain),
        "relevance_mass": relevance_mass(np.clip(importance, 0, None), truth.mask, brain),
        "relevance_mass_uniform": float(truth.mask[brain].mean()),
        "localisation_auroc_depth_matched": depth_matched_auroc(importance, truth.mask, brain),
    }
    if truth.effect_masks:
        # Each effect against the unplanted brain (the other effects' voxels left out).
        scores["localisation_auroc_by_effect"] = {
            kind: localisation_auroc(importance, mask, brain & (mask | ~truth.mask))
            for kind, mask in truth.effect_masks.items()
        }
    if table is not None:
        ranks = planted_ranks(table, truth.regions)
        scores.update(
            {
                "planted_top": ranks["top"],
                "planted_precision_at_k": ranks["precision_at_k"],
                "planted_ranks": ranks["ranks"],
            }
        )
    return scores


def score_population(study: MapsStudy, result: PopulationResult) -> dict[str, Any]:
    """Score the population map against the planted truth and record it under ``maps.noise``.

    Also computes the deletion curve of the noise maps on the comparison subjects (the
    first ``maps.compare_subjects`` test subjects), so that ``deletion_auc`` is comparable
    with :func:`compare_methods`.
    """
    truth = load_truth(study)
    scores = score_map(result.population, result.table, truth, study.cohort.mask)
    index = read_subject_maps(study).set_index("participant_id")
    indices = study.indices("test", study.settings.compare_subjects)
    pids = study.participant_ids(indices)
    maps = np.stack([population_mod.load_map(index.loc[p, "path"]) for p in pids])
    curve = deletion_curve(
        study.predictor,
        study.images(indices),
        torch.from_numpy(maps[:, None].astype(np.float32)),
        study.cohort.mask,
        steps=study.settings.deletion_steps,
    )
    scores["deletion_auc"] = deletion_auc(curve)
    scores["n_subjects"] = len(index)
    _merge_metrics(study, NOISE, {k: v for k, v in scores.items() if k != "planted_ranks"})
    return scores


def model_reliance(study: MapsStudy, *, progress: bool = True) -> pd.DataFrame | None:
    """How much the predictor relies on each planted effect (synthetic cohorts only).

    Re-renders the first ``maps.reliance_subjects`` test subjects with one effect at a
    time aged by ``maps.reliance_delta`` years (:func:`brainage_core.reliance.effect_reliance`),
    writes ``tables/effect_reliance.csv`` and records each effect's share under
    ``reliance`` in ``metrics.json``. Returns None (and writes nothing) for real data or
    when ``maps.reliance_subjects`` is 0.
    """
    s = study.settings
    root = study.cohort.metadata.get("source_root")
    if not s.reliance_subjects or load_truth(study) is None or not root:
        return None
    from .reliance import effect_reliance

    indices = study.indices("test", s.reliance_subjects)
    table = effect_reliance(
        study.predictor,
        root,
        study.cohort.template,
        study.participant_ids(indices),
        delta=s.reliance_delta,
        progress=progress,
    )
    write_table(study.run.tables / RELIANCE_TABLE, table)
    study.run.update_metrics(
        "reliance",
        {
            "delta_years": s.reliance_delta,
            "n_subjects": int(len(indices)),
            "shift": {r.kind: r.mean_shift for r in table.itertuples()},
            "share": {r.kind: r.share for r in table.itertuples() if r.kind != "all"},
        },
    )
    return table


# -- 06: comparison with the baselines ----------------------------------------------------
def method_map_file(method: str) -> str:
    """File name (in ``maps/``) of a compared method's mean map: ``method-<name>_mean.nii.gz``."""
    return f"method-{method}_mean.nii.gz"


def compare_methods(
    study: MapsStudy,
    explainer: NoiseMapExplainer,
    *,
    n_subjects: int | None = None,
    methods: list[str] | None = None,
    progress: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, np.ndarray]]:
    """Score the noise maps and the captum baselines on the same test subjects.

    For each method: mean map over the subjects, its localisation AUROC (overall and per
    effect, columns ``auroc_<kind>``) and relevance mass (synthetic data), deletion-curve
    area, faithfulness (prediction shift with noise placed by the map / at random / by the
    inverted map) and milliseconds per subject.

    Returns
    -------
    scores : pandas.DataFrame
        One row per method (also ``tables/method_comparison.csv``; merged into
        ``metrics.json`` for the methods other than ``noise``, whose population scores
        :func:`score_population` records).
    curves : pandas.DataFrame
        Deletion curves: ``method``, ``fraction``, ``change`` (``tables/deletion_curves.csv``).
    mean_maps : dict
        The mean map of each method.
    """
    s = study.settings
    n = s.compare_subjects if n_subjects is None else int(n_subjects)
    indices = study.indices("test", n)
    images = study.images(indices)
    truth = load_truth(study)
    atlas = study.atlas()
    candidates: dict[str, Any] = {
        NOISE: explainer,
        NOISE_PER_SUBJECT: _per_subject_explainer(study, explainer),
    }
    for name in s.baselines if methods is None else methods:
        if name not in candidates:
            candidates[name] = CaptumExplainer(
                study.predictor, name, mask=study.cohort.mask, n_steps=s.ig_steps
            )
    rows, curves, mean_maps = [], [], {}
    for name, method in tqdm(
        candidates.items(), desc="methods", disable=None if progress else True
    ):
        start = time.perf_counter()
        maps = torch.cat([method.attribute(images[i : i + 1]) for i in range(len(indices))])
        ms = 1000.0 * (time.perf_counter() - start) / max(len(indices), 1)
        mean = maps.mean(0)[0].numpy()
        mean_maps[name] = mean
        save_nifti(study.cohort.to_image(mean.astype(np.float32)),
                   study.run.maps / method_map_file(name))
        table = region_table(mean, atlas, min_voxels=s.min_region_voxels)
        row: dict[str, Any] = {"method": name, "ms_per_subject": ms, "n_subjects": len(indices)}
        scores = score_map(mean, table, truth, study.cohort.mask)
        scores.pop("planted_ranks", None)
        by_effect = scores.pop("localisation_auroc_by_effect", {})
        row.update(scores)
        row.update({f"auroc_{kind}": value for kind, value in by_effect.items()})
        curve = deletion_curve(
            study.predictor, images, maps, study.cohort.mask, steps=s.deletion_steps
        )
        row["deletion_auc"] = deletion_auc(curve)
        curves.append(curve.assign(method=name))
        faith = faithfulness(
            study.predictor,
            images,
            maps,
            study.cohort.mask,
            fraction=s.faithfulness_fraction,
            sigma=explainer.s_max,
            seed=s.seed or 0,
        )
        row.update({f"shift_{k}": v for k, v in faith.items()})
        row["top_region"] = table["name"].iloc[0] if len(table) else ""
        rows.append(row)
        if name != NOISE:
            values = {k: v for k, v in row.items() if k != "method" and not k.startswith("auroc_")}
            if by_effect:
                values["localisation_auroc_by_effect"] = by_effect
            _merge_metrics(study, name, values)
    scores_df = pd.DataFrame(rows)
    curves_df = pd.concat(curves, ignore_index=True)[["method", "fraction", "change"]]
    write_table(study.run.tables / "method_comparison.csv", scores_df)
    write_table(study.run.tables / "deletion_curves.csv", curves_df)
    return scores_df, curves_df, mean_maps
