"""The importance-map steps of a study run, as the notebooks call them.

A run folder (:class:`~brainage_core.rundir.RunDir`) holds the configuration, the trained
predictor and everything the map steps write:

* ``checkpoints/noise_model.pt``: the amortised noise model (resumable);
* ``tables/lambda_calibration.csv``: the MAE–noise trade-off curve, if lambda was
  calibrated;
* ``maps/sub-XXXX_importance.nii.gz``: per-subject maps (template space), indexed by
  ``tables/subject_maps.csv``;
* ``maps/population_importance.nii.gz`` and ``population_age-<lo>-<hi>_importance.nii.gz``;
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
    age_correlation_map,
    budget_faithfulness,
    core_truth,
    coverage_regions,
    deletion_auc,
    deletion_curve,
    depth_matched_auroc,
    faithfulness,
    image_on_grid,
    localisation_auroc,
    planted_in_top,
    planted_ranks,
    rank_correlation,
    relevance_mass,
    truth_on_grid,
)

#: Names of the methods in tables and in ``metrics.json``.
NOISE = "noise"
NOISE_PER_SUBJECT = "noise_per_subject"
#: The model-free ceiling map |corr(intensity, age)| over the training split.
CEILING = "ceiling_age_correlation"
CEILING_MAP = "ceiling_age_correlation.nii.gz"

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
    strength : numpy.ndarray or None
        Continuous truth: the planted intensity change of each voxel (0 outside the
        truth); None when unknown.
    weak_tail : float
        Planted voxels whose change is below this are left out of the core scores.
    """

    mask: np.ndarray
    regions: list[str]
    effect_masks: dict[str, np.ndarray] = field(default_factory=dict)
    strength: np.ndarray | None = None
    weak_tail: float = 0.05

    def core(self) -> tuple[np.ndarray, np.ndarray]:
        """Planted voxels without the weak tails, and the voxels that are scored."""
        if self.strength is None:
            return self.mask, np.ones(self.mask.shape, bool)
        return core_truth(self.mask, self.strength, self.weak_tail)


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
        ids = self.cohort.table["participant_id"].to_numpy()
        return [str(ids[int(i)]) for i in indices]

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
    images = study.images(indices)
    per_subject = _per_subject_explainer(study, explainer, images)
    rows = []
    for name, method in ((NOISE, explainer), (NOISE_PER_SUBJECT, per_subject)):
        method.attribute(images[:1])  # warm-up (allocations, lazy initialisation)
        start = time.perf_counter()
        for i in range(len(indices)):
            method.attribute(images[i : i + 1])
        ms = 1000.0 * (time.perf_counter() - start) / len(indices)
        rows.append({"method": name, "ms_per_subject": ms, "n_subjects": len(indices)})
        _merge_metrics(study, name, {"ms_per_subject": ms})
    return pd.DataFrame(rows)


def _per_subject_explainer(
    study: MapsStudy, explainer: NoiseMapExplainer, images: torch.Tensor | None = None
) -> PerSubjectNoiseMap:
    """The per-subject mode with the amortised model's perturbation and operating point.

    With ``maps.per_subject_match_mean_b`` and ``images``, the per-subject maps are held at
    the amortised model's mean B on those images, so both modes spend the same budget.
    """
    s = study.settings
    mean_b = None
    if s.per_subject_match_mean_b and images is not None:
        mask = torch.as_tensor(study.cohort.mask, dtype=torch.float32)
        b = explainer.noise_level(images)[:, 0]
        mean_b = float(((b * mask).flatten(1).sum(1) / mask.sum()).mean())
        mean_b = min(max(mean_b, 0.01), 0.99)
    return PerSubjectNoiseMap(
        study.predictor,
        mask=study.cohort.mask,
        lam=explainer.lam,
        target=explainer.target,
        loss=explainer.loss,
        reference=explainer.reference,
        **{k: v for k, v in explainer.perturbation_settings().items()},
        steps=s.per_subject_steps,
        lr=s.per_subject_lr,
        coarse=s.per_subject_coarse,
        fixed_noise=s.per_subject_fixed_noise,
        mean_b=mean_b,
        patience=s.per_subject_patience,
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
    strength = getattr(truth, "strength_img", None)
    return GroundTruth(
        mask=mask & study.cohort.mask,
        regions=planted_patterns(truth),
        effect_masks=effect_masks,
        strength=None if strength is None else image_on_grid(strength, *grid) * study.cohort.mask,
        weak_tail=study.settings.weak_tail,
    )


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
    *,
    reliance: dict[str, float] | None = None,
    atlas: Any = None,
    coverage: float = 0.5,
) -> dict[str, Any]:
    """Localisation scores of one (population) map; empty without ground truth.

    Every method's map gets the same scores:

    * ``localisation_auroc``, ``relevance_mass`` and ``localisation_auroc_depth_matched``
      against the binary truth;
    * ``localisation_auroc_core`` and ``relevance_mass_core``: the same with the weak
      smoothing tails left out (planted change below ``truth.weak_tail``);
    * ``rank_correlation``: Spearman correlation with the continuous truth;
    * ``localisation_auroc_by_effect`` (each effect against the unplanted brain) and,
      given the predictor's ``reliance`` shares, ``localisation_auroc_reliance_weighted``;
    * with a region ``table``: ``planted_top``/``planted_ranks`` (the generator's region
      names) and, given the ``atlas``, the coverage-based region truth
      (``planted_regions_coverage``, regions with at least ``coverage`` of their voxels
      planted, hemispheres merged) and ``planted_in_top3``.
    """
    if truth is None:
        return {}
    positives, scored = truth.core()
    core_brain = brain & scored
    scores: dict[str, Any] = {
        "localisation_auroc": localisation_auroc(importance, truth.mask, brain),
        "relevance_mass": relevance_mass(np.clip(importance, 0, None), truth.mask, brain),
        "relevance_mass_uniform": float(truth.mask[brain].mean()),
        "localisation_auroc_depth_matched": depth_matched_auroc(importance, truth.mask, brain),
        "localisation_auroc_core": localisation_auroc(importance, positives, core_brain),
        "relevance_mass_core": relevance_mass(np.clip(importance, 0, None), positives, core_brain),
        "relevance_mass_core_uniform": float(positives[core_brain].mean()),
        "weak_tail_share": float(
            (truth.mask & ~positives)[brain].sum() / max(truth.mask[brain].sum(), 1)
        ),
    }
    if truth.strength is not None:
        scores["rank_correlation"] = rank_correlation(importance, truth.strength, brain)
    if truth.effect_masks:
        # Each effect against the unplanted brain (the other effects' voxels left out).
        by_effect = {
            kind: localisation_auroc(importance, mask, brain & (mask | ~truth.mask))
            for kind, mask in truth.effect_masks.items()
        }
        scores["localisation_auroc_by_effect"] = by_effect
        if reliance:
            shares = {k: max(float(reliance.get(k, 0.0)), 0.0) for k in by_effect}
            total = sum(shares.values())
            if total > 0:
                scores["localisation_auroc_reliance_weighted"] = float(
                    sum(shares[k] * by_effect[k] for k in by_effect) / total
                )
    if table is not None:
        ranks = planted_ranks(table, truth.regions)
        scores.update(
            {
                "planted_top": ranks["top"],
                "planted_precision_at_k": ranks["precision_at_k"],
                "planted_ranks": ranks["ranks"],
            }
        )
    if atlas is not None:
        merged = region_table(importance, atlas, bilateral=True)
        planted = coverage_regions(truth.mask, atlas, share=coverage, bilateral=True)
        top = planted_in_top(merged, list(planted), max(3, len(planted)))
        scores.update(
            {
                "region_coverage": coverage,
                "planted_regions_coverage": planted,
                "planted_in_top3": top["all_in_top"],
                "planted_ranks_merged": top["ranks"],
                "top_regions_merged": list(merged["name"].head(5)),
            }
        )
    return scores


def reliance_shares(study: MapsStudy) -> dict[str, float] | None:
    """The predictor's reliance share per effect from ``metrics.json`` (None if unmeasured)."""
    return study.run.read_metrics().get("reliance", {}).get("share") or None


def ceiling_map(study: MapsStudy) -> np.ndarray:
    """The model-free ceiling map ``|corr(intensity, age)|`` over the training split.

    Computed once from the prepared cohort (no predictor involved), saved as
    ``maps/ceiling_age_correlation.nii.gz`` and read back afterwards. Scored like any
    importance map, it shows how well the data alone localise the age signal.
    """
    path = study.run.maps / CEILING_MAP
    if path.is_file():
        return population_mod.load_map(path)
    train = study.indices("train")
    images = study.cohort.images
    grid = tuple(images.shape[1:])

    class _Rows:  # a lazy view of the training rows of the cohort memmap
        shape = (len(train), *grid)

        def __getitem__(self, sl: slice) -> np.ndarray:
            return np.asarray(images[np.sort(train)[sl]], dtype=np.float32)

    ages = study.ages(np.sort(train))
    corr = age_correlation_map(_Rows(), ages, study.cohort.mask)
    save_nifti(study.cohort.to_image(corr.astype(np.float32)), path)
    return corr


def score_ceiling(study: MapsStudy) -> dict[str, Any]:
    """Score the model-free ceiling map like the other maps; recorded under ``maps.<CEILING>``."""
    truth = load_truth(study)
    if truth is None:
        return {}
    corr = ceiling_map(study)
    scores = score_map(
        corr,
        None,
        truth,
        study.cohort.mask,
        reliance=reliance_shares(study),
        atlas=study.atlas(),
        coverage=study.settings.region_coverage,
    )
    _merge_metrics(study, CEILING, scores)
    return scores


def score_population(study: MapsStudy, result: PopulationResult) -> dict[str, Any]:
    """Score the population map against the planted truth and record it under ``maps.noise``.

    Also computes the deletion curve of the noise maps on the comparison subjects (the
    first ``maps.compare_subjects`` test subjects), toward the noise model's reference
    image, so that ``deletion_auc`` is comparable with :func:`compare_methods`.
    """
    truth = load_truth(study)
    scores = score_map(
        result.population,
        result.table,
        truth,
        study.cohort.mask,
        reliance=reliance_shares(study),
        atlas=study.atlas(),
        coverage=study.settings.region_coverage,
    )
    index = read_subject_maps(study).set_index("participant_id")
    indices = study.indices("test", study.settings.compare_subjects)
    pids = study.participant_ids(indices)
    maps = np.stack([population_mod.load_map(index.loc[p, "path"]) for p in pids])
    images = study.images(indices)
    explainer = load_noise_model(study)
    curve = deletion_curve(
        study.predictor,
        images,
        torch.from_numpy(maps[:, None].astype(np.float32)),
        study.cohort.mask,
        steps=study.settings.deletion_steps,
        reference=_deletion_reference(explainer, images),
    )
    scores["deletion_auc"] = deletion_auc(curve)
    scores["n_subjects"] = len(index)
    _merge_metrics(
        study,
        NOISE,
        {k: v for k, v in scores.items() if k not in ("planted_ranks", "planted_ranks_merged")},
    )
    return scores


def _deletion_reference(explainer: Any, images: torch.Tensor) -> torch.Tensor:
    """What deleted voxels become: the perturbation's reference image.

    For the replacement perturbations it is their reference (the training mean, the
    blurred subject); for the paper's additive noise, which has none, the training-mean
    image when known, else the mean of ``images`` (never 0, the CSF intensity).
    """
    with torch.no_grad():
        if explainer.perturbation != "additive":
            return explainer.reference_image(images.to(explainer.device)).cpu()
        if explainer.reference is not None:
            return explainer.reference.cpu()
        return images.mean(0, keepdim=True)


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


def per_subject_convergence(
    study: MapsStudy,
    explainer: NoiseMapExplainer,
    *,
    steps: tuple[int, ...] = (25, 50, 100, 200),
    n_subjects: int | None = None,
) -> pd.DataFrame:
    """AUROC and objective of the per-subject mode against the number of steps.

    The comparison subjects are explained with the stopping rule switched off, once per
    step budget (each from the same start), and the mean map scored; a last row runs the
    configured stopping rule. Synthetic cohorts only (returns an empty table otherwise).

    Returns
    -------
    pandas.DataFrame
        ``steps`` (the budget; "rule" for the stopping rule), ``steps_run``,
        ``objective`` and ``mean_b`` at the last step, ``localisation_auroc`` and
        ``localisation_auroc_core``.
    """
    truth = load_truth(study)
    columns = ["steps", "steps_run", "objective", "mean_b", "localisation_auroc"]
    columns.append("localisation_auroc_core")
    if truth is None:
        return pd.DataFrame(columns=columns)
    n = study.settings.compare_subjects if n_subjects is None else int(n_subjects)
    images = study.images(study.indices("test", n))
    positives, scored = truth.core()
    rows = []
    budgets: list[Any] = [*(int(k) for k in steps), "rule"]
    for budget in budgets:
        method = _per_subject_explainer(study, explainer, images)
        if budget != "rule":
            method.steps, method.patience = int(budget), None
        maps = method.attribute(images)
        mean = maps.mean(0)[0].numpy()
        last = method.history_.iloc[-1]
        rows.append(
            {
                "steps": str(budget),
                "steps_run": method.steps_run_,
                "objective": float(last["objective"]),
                "mean_b": float(last["mean_b"]),
                "localisation_auroc": localisation_auroc(mean, truth.mask, study.cohort.mask),
                "localisation_auroc_core": localisation_auroc(
                    mean, positives, study.cohort.mask & scored
                ),
            }
        )
    return pd.DataFrame(rows, columns=columns)


# -- 06: comparison with the baselines ----------------------------------------------------
def compare_methods(
    study: MapsStudy,
    explainer: NoiseMapExplainer,
    *,
    n_subjects: int | None = None,
    methods: list[str] | None = None,
    progress: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, np.ndarray]]:
    """Score the noise maps and the captum baselines on the same test subjects.

    For each method, and for the model-free ceiling map ``|corr(intensity, age)|``
    (synthetic data): the mean map over the subjects and its scores (:func:`score_map`:
    binary, core and continuous truth, per effect, reliance-weighted, depth-matched,
    coverage-based regions); deletion and insertion areas toward the perturbation's
    reference image (``deletion_auc``, ``insertion_auc``); the like-for-like faithfulness
    (``budget_shift_learned/permuted/inverted`` and their ratios: the amortised model's
    noise budget of each subject placed by the method's ranking, at random and inverted,
    with the noise model's perturbation, see
    :func:`brainage_core.scoring.budget_faithfulness`); the first version's fixed-noise
    test (``fixed_noise_shift_map/random/inverted``: noise of ``s_max`` on a fixed share of
    the brain, a harsher regime than the maps were trained for); milliseconds per subject.

    Returns
    -------
    scores : pandas.DataFrame
        One row per method (also ``tables/method_comparison.csv``; merged into
        ``metrics.json`` for the methods other than ``noise``, whose population scores
        :func:`score_population` records).
    curves : pandas.DataFrame
        Deletion and insertion curves: ``method``, ``kind``, ``fraction``, ``change``
        (``tables/deletion_curves.csv``).
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
        NOISE_PER_SUBJECT: _per_subject_explainer(study, explainer, images),
    }
    for name in s.baselines if methods is None else methods:
        if name not in candidates:
            candidates[name] = CaptumExplainer(
                study.predictor, name, mask=study.cohort.mask, n_steps=s.ig_steps
            )
    if truth is not None:
        candidates[CEILING] = None  # the model-free map, the same for every subject
    reliance = reliance_shares(study)
    budget = explainer.noise_level(images)  # the learned noise budget of these subjects
    reference = _deletion_reference(explainer, images)
    rows, curves, mean_maps = [], [], {}
    for name, method in tqdm(
        candidates.items(), desc="methods", disable=None if progress else True
    ):
        start = time.perf_counter()
        if method is None:
            ceiling = torch.from_numpy(ceiling_map(study).astype(np.float32))
            maps = ceiling[None, None].expand_as(images).clone()
        else:
            maps = torch.cat([method.attribute(images[i : i + 1]) for i in range(len(indices))])
        ms = 1000.0 * (time.perf_counter() - start) / max(len(indices), 1)
        mean = maps.mean(0)[0].numpy()
        mean_maps[name] = mean
        table = region_table(mean, atlas, min_voxels=s.min_region_voxels)
        row: dict[str, Any] = {"method": name, "ms_per_subject": ms, "n_subjects": len(indices)}
        if name == NOISE_PER_SUBJECT:
            row["per_subject_steps_run"] = method.steps_run_
            row["per_subject_mean_b_target"] = method.mean_b
        scores = score_map(
            mean,
            table,
            truth,
            study.cohort.mask,
            reliance=reliance,
            atlas=atlas,
            coverage=s.region_coverage,
        )
        scores.pop("planted_ranks", None)
        scores.pop("planted_ranks_merged", None)
        by_effect = scores.pop("localisation_auroc_by_effect", {})
        row.update({k: v for k, v in scores.items() if not isinstance(v, (dict, list))})
        row.update({f"auroc_{kind}": value for kind, value in by_effect.items()})
        for kind, insertion in (("deletion", False), ("insertion", True)):
            curve = deletion_curve(
                study.predictor,
                images,
                maps,
                study.cohort.mask,
                steps=s.deletion_steps,
                reference=reference,
                insertion=insertion,
            )
            row[f"{kind}_auc"] = deletion_auc(curve)
            curves.append(curve.assign(method=name, kind=kind))
        like = budget_faithfulness(
            study.predictor,
            images,
            maps,
            budget,
            explainer.perturb,
            study.cohort.mask,
            n_draws=s.faithfulness_draws,
            seed=s.seed or 0,
        )
        row.update({f"budget_shift_{k}": v for k, v in like.items()})
        # the first version's test: noise of s_max on a fixed share of the brain, a harsher
        # regime than the maps were trained for (kept as a column, labelled as such)
        fixed = faithfulness(
            study.predictor,
            images,
            maps,
            study.cohort.mask,
            fraction=s.faithfulness_fraction,
            sigma=explainer.s_max,
            seed=s.seed or 0,
        )
        row.update({f"fixed_noise_shift_{k}": v for k, v in fixed.items()})
        row["top_region"] = table["name"].iloc[0] if len(table) else ""
        rows.append(row)
        if name != NOISE:
            values = {k: v for k, v in row.items() if k != "method" and not k.startswith("auroc_")}
            if by_effect:
                values["localisation_auroc_by_effect"] = by_effect
            _merge_metrics(study, name, values)
        else:
            _merge_metrics(
                study,
                NOISE,
                {
                    k: v
                    for k, v in row.items()
                    if k.startswith(("budget_shift_", "fixed_noise_shift_", "insertion_"))
                },
            )
    scores_df = pd.DataFrame(rows)
    curves_df = pd.concat(curves, ignore_index=True)[["method", "kind", "fraction", "change"]]
    write_table(study.run.tables / "method_comparison.csv", scores_df)
    write_table(study.run.tables / "deletion_curves.csv", curves_df)
    return scores_df, curves_df, mean_maps
