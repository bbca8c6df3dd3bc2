"""Step 06 (compare methods): the noise maps against every standard attribution method.

Every method (the noise maps, amortised and per subject; captum's gradient, path, CAM,
LRP and occlusion methods; the random floor and the model-free ceiling) is built by
:func:`method_explainers` behind one surface (``attribute(images)`` returns template-space
maps shaped like the images) and scored by :func:`compare_methods` with the same code:
localisation against the planted truth with bootstrap intervals, faithfulness (deletion,
insertion, ROAD, the like-for-like noise test), the sanity check, robustness and cost.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from brainage_core._utils.io import save_nifti, write_table
from brainage_core._utils.profiling import measure_cost
from brainage_core.analysis.bootstrap import bootstrap_interval, region_rank_intervals
from brainage_core.analysis.faithfulness import (
    budget_faithfulness,
    deletion_auc,
    deletion_curve,
    faithfulness,
    road_curve,
)
from brainage_core.analysis.localisation import localisation_auroc, score_map
from brainage_core.analysis.regions import region_table
from brainage_core.analysis.robustness import map_stability
from brainage_core.analysis.sanity import (
    cascading_randomisation,
    sanity_verdict,
    spearman_within,
)
from brainage_core.explain.captum import CaptumExplainer
from brainage_core.explain.noise.amortised import NoiseMapExplainer
from brainage_core.explain.reference import FixedMap, RandomMap
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
    RANDOM,
    REFERENCES,
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


# -- 06: comparison with every method ------------------------------------------------------
#: Builds a method's explainer around a given predictor (the sanity check's randomised
#: copies): ``factory(predictor) -> explainer``.
Factory = Callable[[torch.nn.Module], Any]


def method_factories(
    study: MapsStudy,
    explainer: NoiseMapExplainer,
    images: torch.Tensor,
    *,
    methods: list[str] | None = None,
    progress: bool = False,
) -> dict[str, Factory]:
    """Every compared method, as a function of the predictor it explains.

    The registry of the comparison: the amortised noise maps (``noise``: a noise model
    with the run's settings fitted around the given predictor for ``maps.sanity_epochs``
    epochs on ``maps.sanity_train_subjects`` subjects, which is what the sanity check
    needs; the comparison itself uses the run's trained noise model), the per-subject
    noise maps, each captum method of ``methods`` (default ``maps.baselines``) with the
    perturbation's reference image as the baseline of path and occlusion methods, and
    the two references: the random map and, on synthetic data, the model-free ceiling
    ``|corr(intensity, age)|``. Each explainer returns template-space maps shaped like the images.
    """
    s = study.settings
    reference = deletion_reference(explainer, images)[:1]
    window = max(1, int(round(s.occlusion_mm / float(study.cohort.resolution))))

    def noise(predictor: torch.nn.Module) -> Any:
        return _refit_noise_model(study, explainer, predictor, progress=progress)

    factories: dict[str, Factory] = {
        NOISE: noise,
        NOISE_PER_SUBJECT: lambda p: per_subject_explainer(study, explainer, images, predictor=p),
    }
    for name in s.baselines if methods is None else methods:
        factories.setdefault(
            name,
            lambda p, name=name: CaptumExplainer(
                p,
                name,
                mask=study.cohort.mask,
                n_steps=s.ig_steps,
                baseline=reference,
                window=window,
                n_samples=s.shap_samples,
            ),
        )
    factories[RANDOM] = lambda p: RandomMap(study.cohort.mask, seed=s.noise.seed)
    if load_truth(study) is not None:
        ceiling = ceiling_map(study).astype(np.float32)
        factories[CEILING] = lambda p: FixedMap(ceiling, study.cohort.mask)
    return factories


def _refit_noise_model(
    study: MapsStudy, explainer: NoiseMapExplainer, predictor: torch.nn.Module, *,
    progress: bool,
) -> NoiseMapExplainer:
    """A noise model with the run's settings, trained briefly around ``predictor``."""
    s = study.settings
    refit = NoiseMapExplainer(
        predictor, explainer.noise, mask=study.cohort.mask, **s.network_kwargs()
    )
    refit.fit(
        study.subset("train", s.sanity_train_subjects),
        epochs=s.sanity_epochs,
        batch_size=s.batch_size,
        lr=s.lr,
        progress=progress,
    )
    return refit


@dataclass
class Comparison:
    """Outcome of :func:`compare_methods`.

    Attributes
    ----------
    scores : pandas.DataFrame
        One row per method (``tables/method_comparison.csv``).
    curves : pandas.DataFrame
        ``method``, ``kind`` (deletion, insertion, road_morf, road_lerf), ``fraction``,
        ``change`` (``tables/deletion_curves.csv``).
    sanity : pandas.DataFrame
        The cascading randomisation of each method: ``method``, ``level``, ``layer``,
        ``spearman`` (``tables/sanity_checks.csv``).
    region_ranks : pandas.DataFrame
        Bootstrap intervals of the ten top regions' ranks of each method
        (``tables/region_rank_intervals.csv``).
    mean_maps : dict
        The mean map of each method over the compared subjects.
    subject_maps : dict
        Each method's map of the first compared subject.
    """

    scores: pd.DataFrame
    curves: pd.DataFrame
    sanity: pd.DataFrame = field(default_factory=pd.DataFrame)
    region_ranks: pd.DataFrame = field(default_factory=pd.DataFrame)
    mean_maps: dict[str, np.ndarray] = field(default_factory=dict)
    subject_maps: dict[str, np.ndarray] = field(default_factory=dict)


def compare_methods(
    study: MapsStudy,
    explainer: NoiseMapExplainer,
    *,
    n_subjects: int | None = None,
    methods: list[str] | None = None,
    progress: bool = True,
) -> Comparison:
    """Score every method (:func:`method_factories`) on the same test subjects.

    For each method, on the first ``maps.compare_subjects`` test subjects:

    * **cost**: milliseconds per subject (one subject at a time) and peak memory
      (``peak_rss_mb``: resident memory above its level at the start;
      ``peak_python_mb``: Python allocations), measured while the maps are made;
    * **localisation** of the mean map (:func:`score_map`: AUROC, relevance mass and
      rank, core and continuous truth, per effect, depth-matched, regions) with a
      bootstrap interval over subjects of the AUROC (``localisation_auroc_lo/hi``) and of
      the ten top regions' ranks;
    * **faithfulness**: deletion and insertion areas toward the perturbation's reference
      image; ROAD (noisy linear imputation, Rong et al. 2022) areas with the most
      (``road_morf_auc``, higher is better) or least (``road_lerf_auc``, lower is better)
      relevant voxels removed first, on ``maps.road_subjects`` subjects; the like-for-like
      noise test (``budget_shift_*``: each noise mode's own learned ``B`` kept and moved,
      the amortised model's ``B`` for the other methods; the per-subject mode's ranks
      placing the amortised ``B`` are kept as ``amortised_budget_shift_*``) and the
      fixed-noise test (``fixed_noise_shift_*``);
    * **sanity check** (Adebayo et al. 2018) on ``maps.sanity_subjects`` subjects (the
      amortised noise model is refitted around each randomised predictor and compared
      with a refit around the trained one; ``sanity_refit_spearman`` says how close that
      refit's maps are to the run's noise model's):
      ``sanity_spearman_top`` / ``sanity_spearman_all`` after the output layer / every
      layer is randomised, ``sanity_pass``; and ``sanity_result`` ("pass", "FAIL", or
      "reference" for the model-free maps, which are not meant to depend on the model);
    * **robustness**: ``robustness_spearman``, the rank correlation of a subject's map
      with its map under input noise of ``maps.robustness_noise``.

    Every method's row is merged into ``metrics.json`` under ``maps.<method>`` (for
    ``noise``, the population scores of step 04 and the timing of step 03 are kept and
    the comparison's localisation and cost columns get the prefix ``compare_``).
    """
    s = study.settings
    n = s.compare_subjects if n_subjects is None else int(n_subjects)
    indices = study.indices("test", n)
    images = study.images(indices)
    truth = load_truth(study)
    atlas = study.atlas()
    brain = study.cohort.mask
    factories = method_factories(study, explainer, images, methods=methods, progress=False)
    reliance = reliance_shares(study)
    budget = explainer.noise_level(images)  # the learned noise budget of these subjects
    reference = deletion_reference(explainer, images)
    n_sanity = min(s.sanity_subjects, len(indices))
    n_road = min(s.road_subjects, len(indices))
    rows, curves, sanity_tables, rank_tables = [], [], [], []
    mean_maps, subject_maps = {}, {}
    for name, factory in tqdm(
        factories.items(), desc="methods", disable=None if progress else True
    ):
        method = explainer if name == NOISE else factory(study.predictor)
        row: dict[str, Any] = {"method": name, "n_subjects": len(indices)}
        method.attribute(images[:1])  # warm-up (allocations, lazy initialisation)
        with measure_cost() as cost:
            maps = torch.cat([method.attribute(images[i : i + 1]) for i in range(len(indices))])
        row["ms_per_subject"] = 1000.0 * cost.seconds / max(len(indices), 1)
        row["peak_rss_mb"] = cost.peak_rss_mb
        row["peak_python_mb"] = cost.peak_python_mb
        if name == NOISE_PER_SUBJECT:
            row["per_subject_steps_run"] = method.steps_run_
            row["per_subject_mean_b_target"] = method.mean_b
        mean = maps.mean(0)[0].numpy()
        mean_maps[name] = mean
        subject_maps[name] = maps[0, 0].numpy()
        save_nifti(study.cohort.to_image(mean.astype(np.float32)), study.run.method_map(name))
        table = region_table(mean, atlas, min_voxels=s.min_region_voxels)
        scores = score_map(
            mean, table, truth, brain, reliance=reliance, atlas=atlas,
            coverage=s.region_coverage,
        )
        scores.pop("planted_ranks", None)
        scores.pop("planted_ranks_merged", None)
        by_effect = scores.pop("localisation_auroc_by_effect", {})
        row.update({k: v for k, v in scores.items() if not isinstance(v, (dict, list))})
        row.update({f"auroc_{kind}": value for kind, value in by_effect.items()})
        if s.bootstrap and len(indices) > 1:
            if truth is not None:
                ci = bootstrap_interval(
                    maps[:, 0].numpy(),
                    lambda m: localisation_auroc(m, truth.mask, brain),
                    n_boot=s.bootstrap,
                    seed=s.noise.seed,
                )
                row["localisation_auroc_lo"], row["localisation_auroc_hi"] = ci["lo"], ci["hi"]
            ranks = region_rank_intervals(
                maps[:, 0].numpy(),
                lambda m: region_table(m, atlas, min_voxels=s.min_region_voxels),
                n_boot=max(s.bootstrap // 4, 10),
                seed=s.noise.seed,
                top=10,
            )
            rank_tables.append(ranks.assign(method=name))
        for kind, insertion in (("deletion", False), ("insertion", True)):
            curve = deletion_curve(
                study.predictor, images, maps, brain, steps=s.deletion_steps,
                reference=reference, insertion=insertion,
            )
            row[f"{kind}_auc"] = deletion_auc(curve)
            curves.append(curve.assign(method=name, kind=kind))
        if n_road:
            for kind, first in (("road_morf", True), ("road_lerf", False)):
                curve = road_curve(
                    study.predictor, images[:n_road], maps[:n_road], brain,
                    most_relevant_first=first, seed=s.noise.seed,
                )
                row[f"{kind}_auc"] = deletion_auc(curve)
                curves.append(curve.assign(method=name, kind=kind))
        # like for like: the noise levels a noise mode learned (its own B) are kept and
        # moved; methods without a budget of their own place the amortised model's
        own_budget = 1.0 - maps if name == NOISE_PER_SUBJECT else budget
        like = budget_faithfulness(
            study.predictor, images, maps, own_budget, explainer.perturb, brain,
            n_draws=s.faithfulness_draws, seed=s.noise.seed,
        )
        row.update({f"budget_shift_{k}": v for k, v in like.items()})
        if name == NOISE_PER_SUBJECT:
            # its ranks placing the amortised budget (a column, not the test)
            other = budget_faithfulness(
                study.predictor, images, maps, budget, explainer.perturb, brain,
                n_draws=s.faithfulness_draws, seed=s.noise.seed,
            )
            row.update({f"amortised_budget_shift_{k}": v for k, v in other.items()})
        # the first version's test: noise of s_max on a fixed share of the brain, a harsher
        # regime than the maps were trained for (kept as a column, labelled as such)
        fixed = faithfulness(
            study.predictor, images, maps, brain, fraction=s.faithfulness_fraction,
            sigma=explainer.noise.s_max, seed=s.noise.seed,
        )
        row.update({f"fixed_noise_shift_{k}": v for k, v in fixed.items()})
        if n_sanity:
            sub = images[:n_sanity]
            original = maps[:n_sanity]
            if name == NOISE:  # the cascade compares refits with a refit of the same budget
                original = factory(study.predictor).attribute(sub)
                row["sanity_refit_spearman"] = float(np.mean([
                    spearman_within(original[i], maps[i], brain) for i in range(n_sanity)
                ]))
            cascade = cascading_randomisation(
                study.predictor, factory, sub, brain, seed=s.noise.seed, original=original
            )
            sanity_tables.append(cascade.assign(method=name))
            row.update(sanity_verdict(cascade, s.sanity_threshold))
            if name in REFERENCES:
                row["sanity_result"] = "reference"
            else:
                row["sanity_result"] = "pass" if row["sanity_pass"] else "FAIL"
            row["robustness_spearman"] = map_stability(
                method, sub, brain, noise_fraction=s.robustness_noise, seed=s.noise.seed
            )
        row["top_region"] = table["name"].iloc[0] if len(table) else ""
        rows.append(row)
        _record(study, name, row, by_effect)
    result = Comparison(
        scores=pd.DataFrame(rows),
        curves=pd.concat(curves, ignore_index=True)[["method", "kind", "fraction", "change"]],
        sanity=pd.concat(sanity_tables, ignore_index=True) if sanity_tables else pd.DataFrame(),
        region_ranks=(
            pd.concat(rank_tables, ignore_index=True) if rank_tables else pd.DataFrame()
        ),
        mean_maps=mean_maps,
        subject_maps=subject_maps,
    )
    merge_metrics(study, NOISE, {"goal": noise_goal(result.scores)})
    write_table(study.run.table("method_comparison"), result.scores)
    write_table(study.run.table("deletion_curves"), result.curves)
    if not result.sanity.empty:
        write_table(study.run.table("sanity_checks"), result.sanity)
    if not result.region_ranks.empty:
        write_table(study.run.table("region_rank_intervals"), result.region_ranks)
    return result


#: Localisation columns of the comparison that step 04 records for ``noise`` on every test
#: subject: the comparison's own values (on the compared subjects) get a prefix instead.
_POPULATION_KEYS = ("localisation_", "relevance_", "rank_correlation", "planted_", "auroc_",
                    "region_coverage", "weak_tail_share", "n_subjects", "top_region",
                    "ms_per_subject", "peak_")


def _record(study: MapsStudy, name: str, row: dict[str, Any], by_effect: dict) -> None:
    values = {
        k: (None if isinstance(v, float) and math.isnan(v) else v)
        for k, v in row.items()
        if k != "method" and not k.startswith("auroc_")
    }
    if name == NOISE:
        values = {
            (f"compare_{k}" if k.startswith(_POPULATION_KEYS) else k): v
            for k, v in values.items()
        }
    elif by_effect:
        values["localisation_auroc_by_effect"] = by_effect
    merge_metrics(study, name, values)


#: The columns of the summary table (:func:`summary_table`), in order.
SUMMARY_COLUMNS = (
    "method",
    "localisation_auroc",
    "localisation_auroc_lo",
    "localisation_auroc_hi",
    "localisation_auroc_depth_matched",
    "relevance_mass",
    "relevance_rank",
    "rank_correlation",
    "deletion_auc",
    "insertion_auc",
    "road_morf_auc",
    "road_lerf_auc",
    "budget_shift_learned_ratio",
    "sanity_spearman_all",
    "sanity_result",
    "robustness_spearman",
    "ms_per_subject",
    "peak_rss_mb",
)


def summary_table(scores: pd.DataFrame) -> pd.DataFrame:
    """The comparison's headline columns (those present), one row per method.

    AUROC with its bootstrap interval, depth-matched AUROC, relevance mass and rank,
    rank correlation with the continuous truth, deletion / insertion / ROAD areas
    (deletion and ROAD-MoRF: higher is better; insertion and ROAD-LeRF: lower is better),
    the like-for-like ratio (lower is better), the sanity check, robustness and cost.
    """
    return scores[[c for c in SUMMARY_COLUMNS if c in scores]].reset_index(drop=True)


def noise_goal(scores: pd.DataFrame, *, reference_method: str = "integrated_gradients",
               cost_ratio: float = 20.0) -> dict[str, Any]:
    """Where the amortised noise maps stand against the issue's goal.

    Against the best *model-based* method other than the noise maps (the references
    are left out): localisation AUROC at least as high; each faithfulness area at least
    as good (deletion and ROAD-MoRF higher, insertion and ROAD-LeRF lower, the
    like-for-like ratio lower); the sanity check passed; and a cost per subject at least
    ``cost_ratio`` times below ``reference_method``.

    Returns
    -------
    dict
        One entry per criterion: ``{"noise": value, "best": value, "best_method": name,
        "met": bool}`` (``sanity`` and ``cost`` have their own fields); ``met`` is None
        when a figure is missing.
    """
    rows = scores.set_index("method")
    if NOISE not in rows.index:
        return {}
    others = rows.drop(index=[m for m in (NOISE, *REFERENCES) if m in rows.index])
    out: dict[str, Any] = {}
    criteria = {
        "localisation_auroc": True,
        "deletion_auc": True,
        "insertion_auc": False,
        "road_morf_auc": True,
        "road_lerf_auc": False,
        "budget_shift_learned_ratio": False,
    }
    for column, higher in criteria.items():
        if column not in rows or others.empty or others[column].isna().all():
            continue
        best = others[column].idxmax() if higher else others[column].idxmin()
        value, top = float(rows.loc[NOISE, column]), float(others.loc[best, column])
        out[column] = {
            "noise": value,
            "best": top,
            "best_method": str(best),
            "met": bool(value >= top if higher else value <= top),
        }
    if "sanity_result" in rows:
        out["sanity"] = {"noise": str(rows.loc[NOISE, "sanity_result"]),
                         "met": rows.loc[NOISE, "sanity_result"] == "pass"}
    if reference_method in rows.index and "ms_per_subject" in rows:
        ratio = float(rows.loc[reference_method, "ms_per_subject"]) / float(
            rows.loc[NOISE, "ms_per_subject"]
        )
        out["cost"] = {"reference": reference_method, "times_cheaper": ratio,
                       "target": cost_ratio, "met": bool(ratio >= cost_ratio)}
    return out
