"""Step 04 (average): population maps, region table and their scores."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from brainage_core._utils.io import save_nifti, write_table
from brainage_core.analysis import population as population_mod
from brainage_core.analysis.faithfulness import deletion_auc, deletion_curve
from brainage_core.analysis.localisation import (
    age_correlation_map,
    score_map,
)
from brainage_core.analysis.regions import region_table, top_regions, write_region_table
from brainage_core.study.explain import load_noise_model
from brainage_core.study.maps import (
    CEILING,
    CEILING_MAP,
    NOISE,
    MapsStudy,
    load_truth,
    merge_metrics,
    read_subject_maps,
)


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
    write_region_table(table, study.run.table("regions"))
    study.run.update_metrics("regions", {"top": top_regions(table, s.top_regions)})
    return PopulationResult(population=population, bands=bands, paths=paths, table=table)


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
    merge_metrics(study, CEILING, scores)
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
        reference=deletion_reference(explainer, images),
    )
    scores["deletion_auc"] = deletion_auc(curve)
    scores["n_subjects"] = len(index)
    merge_metrics(
        study,
        NOISE,
        {k: v for k, v in scores.items() if k not in ("planted_ranks", "planted_ranks_merged")},
    )
    return scores


def deletion_reference(explainer: Any, images: torch.Tensor) -> torch.Tensor:
    """What deleted voxels become: the perturbation's reference image.

    For the replacement perturbations it is their reference (the training mean, the
    blurred subject); for the paper's additive noise, which has none, the training-mean
    image when known, else the mean of ``images`` (never 0, the CSF intensity).
    """
    with torch.no_grad():
        if explainer.noise.perturbation != "additive":
            return explainer.reference_image(images.to(explainer.device)).cpu()
        if explainer.reference is not None:
            return explainer.reference.cpu()
        return images.mean(0, keepdim=True)


def model_reliance(study: MapsStudy, *, progress: bool = True) -> pd.DataFrame | None:
    """How much the predictor relies on each planted effect (synthetic cohorts only).

    Re-renders the first ``maps.reliance_subjects`` test subjects with one effect at a
    time aged by ``maps.reliance_delta`` years
    (:func:`brainage_core.analysis.reliance.effect_reliance`),
    writes ``tables/effect_reliance.csv`` and records each effect's share under
    ``reliance`` in ``metrics.json``. Returns None (and writes nothing) for real data or
    when ``maps.reliance_subjects`` is 0.
    """
    s = study.settings
    root = study.cohort.metadata.get("source_root")
    if not s.reliance_subjects or load_truth(study) is None or not root:
        return None
    from brainage_core.analysis.reliance import effect_reliance

    indices = study.indices("test", s.reliance_subjects)
    table = effect_reliance(
        study.predictor,
        root,
        study.cohort.template,
        study.participant_ids(indices),
        delta=s.reliance_delta,
        progress=progress,
    )
    write_table(study.run.table("effect_reliance"), table)
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
