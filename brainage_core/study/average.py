"""Step 04 (average): population maps, region table and their scores."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from brainage_core._utils.io import write_table
from brainage_core.analysis import population as population_mod
from brainage_core.analysis.faithfulness import deletion_auc, deletion_curve
from brainage_core.analysis.localisation import (
    score_map,
)
from brainage_core.analysis.regions import region_table, top_regions, write_region_table
from brainage_core.study.maps import (
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
    merge_metrics(study, NOISE, {k: v for k, v in scores.items() if k != "planted_ranks"})
    return scores


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
