"""Step 06 (compare methods): the noise maps against captum's baselines."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from brainage_core._utils.io import save_nifti, write_table
from brainage_core.analysis.faithfulness import deletion_auc, deletion_curve, faithfulness
from brainage_core.analysis.localisation import score_map
from brainage_core.analysis.regions import region_table
from brainage_core.explain.captum import CaptumExplainer
from brainage_core.explain.noise.amortised import NoiseMapExplainer
from brainage_core.study.explain import per_subject_explainer
from brainage_core.study.maps import (
    NOISE,
    NOISE_PER_SUBJECT,
    MapsStudy,
    load_truth,
    merge_metrics,
)


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
        NOISE_PER_SUBJECT: per_subject_explainer(study, explainer),
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
                   study.run.method_map(name))
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
            sigma=explainer.noise.s_max,
            seed=s.noise.seed,
        )
        row.update({f"shift_{k}": v for k, v in faith.items()})
        row["top_region"] = table["name"].iloc[0] if len(table) else ""
        rows.append(row)
        if name != NOISE:
            values = {k: v for k, v in row.items() if k != "method" and not k.startswith("auroc_")}
            if by_effect:
                values["localisation_auroc_by_effect"] = by_effect
            merge_metrics(study, name, values)
    scores_df = pd.DataFrame(rows)
    curves_df = pd.concat(curves, ignore_index=True)[["method", "fraction", "change"]]
    write_table(study.run.table("method_comparison"), scores_df)
    write_table(study.run.table("deletion_curves"), curves_df)
    return scores_df, curves_df, mean_maps
