"""Step 06 (compare methods): the noise maps against captum's baselines."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from brainage_core._utils.io import save_nifti, write_table
from brainage_core.analysis.faithfulness import (
    budget_faithfulness,
    deletion_auc,
    deletion_curve,
    faithfulness,
)
from brainage_core.analysis.localisation import localisation_auroc, score_map
from brainage_core.analysis.regions import region_table
from brainage_core.explain.captum import CaptumExplainer
from brainage_core.explain.noise.amortised import NoiseMapExplainer
from brainage_core.study.average import (
    ceiling_map,
    deletion_reference,
    reliance_shares,
)
from brainage_core.study.explain import per_subject_explainer
from brainage_core.study.maps import (
    CEILING,
    NOISE,
    NOISE_PER_SUBJECT,
    MapsStudy,
    load_truth,
    merge_metrics,
)


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
        method = per_subject_explainer(study, explainer, images)
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
    :func:`brainage_core.analysis.faithfulness.budget_faithfulness`); the first version's
    fixed-noise test (``fixed_noise_shift_map/random/inverted``: noise of ``s_max`` on a
    fixed share of the brain, a harsher regime than the maps were trained for);
    milliseconds per subject.

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
        NOISE_PER_SUBJECT: per_subject_explainer(study, explainer, images),
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
    reference = deletion_reference(explainer, images)
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
        save_nifti(study.cohort.to_image(mean.astype(np.float32)),
                   study.run.method_map(name))
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
            seed=s.noise.seed,
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
            sigma=explainer.noise.s_max,
            seed=s.noise.seed,
        )
        row.update({f"fixed_noise_shift_{k}": v for k, v in fixed.items()})
        row["top_region"] = table["name"].iloc[0] if len(table) else ""
        rows.append(row)
        if name != NOISE:
            values = {k: v for k, v in row.items() if k != "method" and not k.startswith("auroc_")}
            if by_effect:
                values["localisation_auroc_by_effect"] = by_effect
            merge_metrics(study, name, values)
        else:
            merge_metrics(
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
    write_table(study.run.table("method_comparison"), scores_df)
    write_table(study.run.table("deletion_curves"), curves_df)
    return scores_df, curves_df, mean_maps
