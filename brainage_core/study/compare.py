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
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from brainage_core._utils.io import save_nifti, write_table
from brainage_core._utils.profiling import measure_cost
from brainage_core._utils.torch import model_device
from brainage_core._utils.validation import BrainAgeInputError
from brainage_core.analysis.bootstrap import bootstrap_interval, region_rank_intervals
from brainage_core.analysis.faithfulness import (
    FIXED_NOISE_PLACEMENTS,
    ROAD_FRACTIONS,
    budget_shifts,
    budget_summary,
    deletion_auc,
    deletion_changes,
    fixed_noise_shifts,
    road_changes,
)
from brainage_core.analysis.localisation import localisation_auroc, score_map
from brainage_core.analysis.population import load_map
from brainage_core.analysis.regions import region_table
from brainage_core.analysis.robustness import stability_per_image
from brainage_core.analysis.sanity import (
    cascade_spearman,
    cascade_table,
    sanity_verdict,
    spearman_within,
)
from brainage_core.explain.captum import CaptumExplainer
from brainage_core.explain.noise.amortised import NoiseMapExplainer
from brainage_core.explain.noise.per_subject import PerSubjectNoiseMap
from brainage_core.explain.protocol import attribute_each
from brainage_core.explain.reference import FixedMap, RandomMap
from brainage_core.models.distributed import (
    all_reduce_max,
    all_reduce_sum,
    gather_items,
    process_context,
    shard_positions,
)
from brainage_core.study.average import (
    ceiling_map,
    deletion_reference,
    reliance_shares,
)
from brainage_core.study.explain import mean_noise_levels, per_subject_explainer
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
    rows = []
    budgets: list[Any] = [*(int(k) for k in steps), "rule"]
    for budget in budgets:
        method = per_subject_explainer(study, explainer, images)
        if budget != "rule":
            method.steps, method.patience = int(budget), None
        row = _score_per_subject(study, truth, method, images)
        rows.append({"steps": str(budget), **{k: row[k] for k in columns[1:]}})
    return pd.DataFrame(rows, columns=columns)


#: Settings of the per-subject mode that :func:`per_subject_variants` may change.
PER_SUBJECT_VARIANT_KEYS = ("coarse", "lr", "mean_b", "noise_sd", "fixed_noise", "area_weight")


def per_subject_variants(
    study: MapsStudy,
    explainer: NoiseMapExplainer,
    variants: dict[str, dict[str, Any]],
    *,
    steps: int = 100,
    n_subjects: int | None = None,
) -> pd.DataFrame:
    """The per-subject mode with some of its settings changed, scored side by side.

    Each variant starts from the study's per-subject explainer
    (:func:`~brainage_core.study.explain.per_subject_explainer`: the run's settings, the
    amortised operating point) and changes the settings it names
    (:data:`PER_SUBJECT_VARIANT_KEYS`, validated as :class:`PerSubjectNoiseMap` validates
    them; ``noise_sd`` adds noise to a replacement perturbation, with a new draw every
    step). The comparison subjects are optimised for ``steps`` steps, the stopping rule
    off, and scored. Synthetic cohorts only (returns an empty table otherwise).

    Returns
    -------
    pandas.DataFrame
        One row per variant: ``variant``, ``mean_b_target``, ``steps_run``,
        ``objective_first`` and ``objective`` (the first and the last step, years),
        ``mean_b``, ``localisation_auroc`` (the mean map), ``localisation_auroc_core``,
        ``auroc_per_image`` (mean over the images), ``b_p5`` and ``b_p95`` (the spread of
        B in the brain) and ``seconds``.

    Raises
    ------
    BrainAgeInputError
        If a variant names another setting, or adds noise to the additive perturbation.
    """
    for name, changes in variants.items():
        unknown = sorted(set(changes) - set(PER_SUBJECT_VARIANT_KEYS))
        if unknown:
            raise BrainAgeInputError(
                f"per-subject variant {name!r}: {unknown} cannot be changed; the settings "
                f"are {list(PER_SUBJECT_VARIANT_KEYS)}."
            )
        if "noise_sd" in changes and explainer.noise.perturbation == "additive":
            raise BrainAgeInputError(
                f"per-subject variant {name!r}: noise_sd adds noise to the replacement "
                "perturbations; this run's perturbation is 'additive'."
            )
    truth = load_truth(study)
    if truth is None:
        return pd.DataFrame()
    n = study.settings.compare_subjects if n_subjects is None else int(n_subjects)
    images = study.images(study.indices("test", n))
    rows = []
    base = per_subject_explainer(study, explainer, images)
    for name, changes in variants.items():
        settings = {"steps": int(steps), "patience": None, "lr": base.lr,
                    "coarse": base.coarse, "fixed_noise": base.fixed_noise,
                    "mean_b": base.mean_b, "area_weight": base.area_weight, "tol": base.tol}
        changes = dict(changes)
        noise = base.noise
        if "noise_sd" in changes:
            noise = replace(noise, noise_sd=float(changes.pop("noise_sd")))
            settings["fixed_noise"] = False
        method = PerSubjectNoiseMap(base.predictor, noise, mask=study.cohort.mask,
                                    reference=base.reference, **{**settings, **changes})
        start = time.perf_counter()
        row = _score_per_subject(study, truth, method, images)
        rows.append({"variant": name, "mean_b_target": method.mean_b, **row,
                     "seconds": time.perf_counter() - start})
    return pd.DataFrame(rows)


def _score_per_subject(study: MapsStudy, truth: Any, method: PerSubjectNoiseMap,
                       images: torch.Tensor) -> dict[str, Any]:
    """Explain ``images`` with a per-subject explainer; score the mean map and each map."""
    maps = method.attribute(images)
    mask = study.cohort.mask
    positives, scored = truth.core()
    history = method.history_
    b = 1.0 - maps[:, 0].numpy()[:, mask]
    mean_map = maps.mean(0)[0].numpy()
    return {
        "steps_run": method.steps_run_,
        "objective_first": float(history["objective"].iloc[0]),
        "objective": float(history["objective"].iloc[-1]),
        "mean_b": float(history["mean_b"].iloc[-1]),
        "localisation_auroc": localisation_auroc(mean_map, truth.mask, mask),
        "localisation_auroc_core": localisation_auroc(mean_map, positives, mask & scored),
        "auroc_per_image": float(np.mean(
            [localisation_auroc(m[0].numpy(), truth.mask, mask) for m in maps])),
        "b_p5": float(np.percentile(b, 5)),
        "b_p95": float(np.percentile(b, 95)),
    }


# -- 06: comparison with every method ------------------------------------------------------
#: Builds a method's explainer around a given predictor (the sanity check's randomised
#: copies): ``factory(predictor) -> explainer``.
Factory = Callable[[torch.nn.Module], Any]


def method_factories(
    study: MapsStudy,
    explainer: NoiseMapExplainer,
    images: torch.Tensor | None = None,
    *,
    methods: list[str] | None = None,
    mean_b: float | None = None,
    progress: bool = False,
) -> dict[str, Factory]:
    """Every compared method, as a function of the predictor it explains.

    The registry of the comparison: the amortised noise maps (``noise``: a noise model
    with the run's settings and reference image fitted around the given predictor for
    ``maps.sanity_epochs`` epochs on ``maps.sanity_train_subjects`` subjects, which is
    what the sanity check needs; the comparison itself uses the run's trained noise
    model), the per-subject noise maps (held at the amortised model's mean noise level
    ``mean_b``, or its mean on ``images``), each captum method of ``methods`` (default
    ``maps.baselines``) with the reference image (the training mean,
    :func:`comparison_reference`) as the baseline of path and occlusion methods, and the
    two references: the random map (drawn from torch's generator, which the comparison
    seeds per subject) and, on synthetic data, the model-free ceiling
    ``|corr(intensity, age)|``. Each explainer returns template-space maps shaped like the
    images.

    Under ``torchrun`` the ``noise`` factory is collective: every process must call it
    (the refit is trained with DistributedDataParallel).
    """
    s = study.settings
    reference = comparison_reference(study, explainer)
    window = max(1, int(round(s.occlusion_mm / float(study.cohort.resolution))))

    def noise(predictor: torch.nn.Module) -> Any:
        return _refit_noise_model(study, explainer, predictor, progress=progress)

    factories: dict[str, Factory] = {
        NOISE: noise,
        NOISE_PER_SUBJECT: lambda p: per_subject_explainer(study, explainer, images,
                                                           predictor=p, mean_b=mean_b),
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
    factories[RANDOM] = lambda p: RandomMap(study.cohort.mask, seed=None)
    if load_truth(study) is not None:
        ceiling = ceiling_map(study).astype(np.float32)
        factories[CEILING] = lambda p: FixedMap(ceiling, study.cohort.mask)
    return factories


def comparison_reference(study: MapsStudy, explainer: NoiseMapExplainer) -> torch.Tensor:
    """The reference image of the comparison: the training-mean image, ``(1, 1, X, Y, Z)``.

    The run's noise model holds it (computed when it was fitted, from its whole training
    set; under DistributedDataParallel every process computes it identically from that
    whole set, not from its shard, and the checkpoint keeps it). A noise model without one
    gets it here, from the whole training split, the same in every process. It is the
    baseline of the path and occlusion methods and what deletion moves voxels toward
    under the additive perturbation.
    """
    if explainer.reference is None:
        explainer.set_reference(study.dataset("train"))
    return explainer.reference.detach().cpu()


def _refit_noise_model(
    study: MapsStudy, explainer: NoiseMapExplainer, predictor: torch.nn.Module, *,
    progress: bool,
) -> NoiseMapExplainer:
    """A noise model with the run's settings, trained briefly around ``predictor``."""
    s = study.settings
    refit = NoiseMapExplainer(
        predictor, explainer.noise, mask=study.cohort.mask,
        reference=comparison_reference(study, explainer), **s.network_kwargs()
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
) -> Comparison | None:
    """Score every method (:func:`method_factories`) on the same test subjects.

    For each method, on the first ``maps.compare_subjects`` test subjects:

    * **cost**: milliseconds per subject (one subject at a time; under ``torchrun`` the
      processes' seconds summed, per subject) and peak memory (``peak_rss_mb``: resident
      memory above its level at the start; ``peak_python_mb``: Python allocations; the
      largest process's), measured while the maps are made;
    * **localisation** of the mean map (:func:`score_map`: AUROC, relevance mass and
      rank, core and continuous truth, per effect, depth-matched, regions) with a
      bootstrap interval over subjects of the AUROC (``localisation_auroc_lo/hi``) and of
      the ten top regions' ranks;
    * **faithfulness**: deletion and insertion areas toward the reference image; ROAD
      (noisy linear imputation, Rong et al. 2022) areas with the most
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

    **One process or many.** Under ``torchrun`` (``python -m brainage_core.study.launch
    compare RUN``, or ``brainage-study run --nproc N``) every process explains and scores
    its share of the subjects (positions ``rank, rank + N, ...``), the noise model's
    sanity refits are trained by all processes together, and the main process gathers the
    per-subject results, scores the mean maps and writes every table, map and metric.
    Every random draw of a subject (SmoothGrad's and GradientShap's noise, the random map,
    the faithfulness tests' noise and permutations, ROAD's imputation noise, the
    robustness noise) is seeded from ``maps.seed`` and the subject's position, and the
    noise scales use the whole set's intensity range, so the tables do not depend on the
    number of processes (up to floating-point rounding, and to the DDP refits' rounding
    for the noise model's sanity columns).

    Every method's row is merged into ``metrics.json`` under ``maps.<method>`` (for
    ``noise``, the population scores of step 04 and the timing of step 03 are kept and
    the comparison's localisation and cost columns get the prefix ``compare_``).

    Returns
    -------
    Comparison or None
        The comparison, in the main process; None in the other processes of a
        ``torchrun`` job.
    """
    s = study.settings
    ctx = process_context(model_device(study.predictor))
    n = s.compare_subjects if n_subjects is None else int(n_subjects)
    indices = study.indices("test", n)
    n = len(indices)
    mine = np.asarray(shard_positions(n, ctx), dtype=np.int64)
    grid = tuple(study.cohort.mask.shape)
    images = (study.images(indices[mine]) if len(mine)
              else torch.zeros((0, 1, *grid), dtype=torch.float32))
    brain = study.cohort.mask
    n_sanity = min(s.sanity_subjects, n)
    n_road = min(s.road_subjects, n)
    # quantities of the whole compared set, the same in every process
    low, high = all_reduce_max(
        [-float(images.min()) if len(mine) else -math.inf,
         float(images.max()) if len(mine) else -math.inf], ctx)
    intensity_range = high + low
    budget = explainer.noise_level(images).cpu() if len(mine) else images
    levels = mean_noise_levels(study, budget)
    total, count = all_reduce_sum([float(levels.sum()), float(levels.size)], ctx)
    factories = method_factories(study, explainer, methods=methods,
                                 mean_b=total / max(count, 1.0), progress=False)
    reference = deletion_reference(explainer, images) if len(mine) else images
    sanity_rows = np.flatnonzero(mine < n_sanity)
    road_rows = np.flatnonzero(mine < n_road)
    seed = s.noise.seed
    main = (_MainProcessScoring(study, n=n, n_sanity=n_sanity, n_road=n_road)
            if ctx.is_main else None)
    for name, factory in tqdm(
        factories.items(), desc="methods", disable=None if progress and ctx.is_main else True
    ):
        method = explainer if name == NOISE else factory(study.predictor)
        if len(mine):
            method.attribute(images[:1])  # warm-up (allocations, lazy initialisation)
        steps_run = []
        with measure_cost() as cost:
            maps_list = []
            for i, position in enumerate(mine):
                maps_list.append(attribute_each(method, images[i : i + 1], [position], seed))
                if name == NOISE_PER_SUBJECT:
                    steps_run.append(method.steps_run_)
        maps = torch.cat(maps_list) if maps_list else images
        records = [
            {"map": maps[i, 0].numpy(), "steps_run": steps_run[i] if steps_run else None,
             "mean_b_target": getattr(method, "mean_b", None)}
            for i in range(len(mine))
        ]
        for kind, insertion in (("deletion", False), ("insertion", True)):
            changes = deletion_changes(
                study.predictor, images, maps, brain, steps=s.deletion_steps,
                reference=reference, insertion=insertion,
            )
            for record, row in zip(records, changes, strict=True):
                record[kind] = row
        for kind, first in (("road_morf", True), ("road_lerf", False)):
            changes = road_changes(
                study.predictor, images[road_rows], maps[road_rows], brain,
                most_relevant_first=first, seed=seed, positions=mine[road_rows],
                intensity_range=intensity_range,
            )
            for i, row in zip(road_rows, changes, strict=True):
                records[i][kind] = row
        # like for like: the noise levels a noise mode learned (its own B) are kept and
        # moved; methods without a budget of their own place the amortised model's
        own_budget = 1.0 - maps if name == NOISE_PER_SUBJECT else budget
        like = budget_shifts(
            study.predictor, images, maps, own_budget, explainer.perturb, brain,
            n_draws=s.faithfulness_draws, seed=seed, positions=mine,
        )
        if name == NOISE_PER_SUBJECT:  # its ranks placing the amortised budget (a column)
            other = budget_shifts(
                study.predictor, images, maps, budget, explainer.perturb, brain,
                n_draws=s.faithfulness_draws, seed=seed, positions=mine,
            )
            for i, record in enumerate(records):
                record["amortised_budget"] = other[i]
        # the first version's test: noise of s_max on a fixed share of the brain, a harsher
        # regime than the maps were trained for (kept as a column, labelled as such)
        fixed = fixed_noise_shifts(
            study.predictor, images, maps, brain, fraction=s.faithfulness_fraction,
            sigma=explainer.noise.s_max, seed=seed, positions=mine,
        )
        for i, record in enumerate(records):
            record["budget"], record["fixed"] = like[i], fixed[i]
        layers: list[str] = []
        if n_sanity:
            sub, positions = images[sanity_rows], mine[sanity_rows]
            original = maps[sanity_rows]
            if name == NOISE:  # the cascade compares refits with a refit of the same budget
                original = attribute_each(factory(study.predictor), sub, positions, seed, 0)
                for j, i in enumerate(sanity_rows):
                    records[i]["refit_spearman"] = spearman_within(original[j], maps[i], brain)
            layers, values = cascade_spearman(
                study.predictor, factory, sub, brain, seed=seed, original=original,
                positions=positions,
            )
            robust = stability_per_image(
                method, sub, brain, noise_fraction=s.robustness_noise, seed=seed,
                positions=positions, intensity_range=intensity_range,
            )
            for j, i in enumerate(sanity_rows):
                records[i]["cascade"], records[i]["robustness"] = values[j], robust[j]
        gathered = gather_items(records, n, ctx)
        costs = gather_items([(cost.seconds, cost.peak_rss_mb, cost.peak_python_mb)],
                             ctx.world_size, ctx)
        if main is not None and gathered is not None and costs is not None:
            main.add(name, gathered, costs, layers)
    return None if main is None else main.finish()


class _MainProcessScoring:
    """The main process's half of :func:`compare_methods`: score the gathered subjects of
    each method and write the tables, maps and metrics."""

    def __init__(self, study: MapsStudy, *, n: int, n_sanity: int, n_road: int) -> None:
        s = study.settings
        self.study, self.n, self.n_sanity, self.n_road = study, n, n_sanity, n_road
        self.truth = load_truth(study)
        self.atlas = study.atlas()
        self.reliance = reliance_shares(study)
        self.fractions = np.linspace(0.0, 1.0, s.deletion_steps + 1)
        self.road_fractions = np.asarray([0.0, *ROAD_FRACTIONS])
        self.rows: list[dict[str, Any]] = []
        self.curves: list[pd.DataFrame] = []
        self.sanity: list[pd.DataFrame] = []
        self.ranks: list[pd.DataFrame] = []
        self.mean_maps: dict[str, np.ndarray] = {}
        self.subject_maps: dict[str, np.ndarray] = {}

    def add(self, name: str, records: list[dict[str, Any]], costs: list[tuple],
            layers: list[str]) -> None:
        study, s, n = self.study, self.study.settings, self.n
        brain, atlas, truth = study.cohort.mask, self.atlas, self.truth
        maps = np.stack([r["map"] for r in records])
        row: dict[str, Any] = {"method": name, "n_subjects": n}
        row["ms_per_subject"] = 1000.0 * sum(c[0] for c in costs) / max(n, 1)
        row["peak_rss_mb"] = max(c[1] for c in costs)
        row["peak_python_mb"] = max(c[2] for c in costs)
        if name == NOISE_PER_SUBJECT:
            row["per_subject_steps_run"] = float(np.mean([r["steps_run"] for r in records]))
            row["per_subject_mean_b_target"] = records[0]["mean_b_target"]
        mean = maps.mean(0)
        self.mean_maps[name] = mean
        self.subject_maps[name] = maps[0]
        save_nifti(study.cohort.to_image(mean.astype(np.float32)), study.run.method_map(name))
        save_nifti(study.cohort.to_image(maps[0].astype(np.float32)),
                   study.run.method_subject_map(name))
        table = region_table(mean, atlas, min_voxels=s.min_region_voxels)
        scores = score_map(
            mean, table, truth, brain, reliance=self.reliance, atlas=atlas,
            coverage=s.region_coverage,
        )
        scores.pop("planted_ranks", None)
        scores.pop("planted_ranks_merged", None)
        by_effect = scores.pop("localisation_auroc_by_effect", {})
        row.update({k: v for k, v in scores.items() if not isinstance(v, (dict, list))})
        row.update({f"auroc_{kind}": value for kind, value in by_effect.items()})
        if s.bootstrap and n > 1:
            if truth is not None:
                ci = bootstrap_interval(
                    maps, lambda m: localisation_auroc(m, truth.mask, brain),
                    n_boot=s.bootstrap, seed=s.noise.seed,
                )
                row["localisation_auroc_lo"], row["localisation_auroc_hi"] = ci["lo"], ci["hi"]
            ranks = region_rank_intervals(
                maps, lambda m: region_table(m, atlas, min_voxels=s.min_region_voxels),
                n_boot=max(s.bootstrap // 4, 10), seed=s.noise.seed, top=10,
            )
            self.ranks.append(ranks.assign(method=name))
        for kind in ("deletion", "insertion"):
            curve = pd.DataFrame({"fraction": self.fractions,
                                  "change": np.mean([r[kind] for r in records], axis=0)})
            row[f"{kind}_auc"] = deletion_auc(curve)
            self.curves.append(curve.assign(method=name, kind=kind))
        if self.n_road:
            for kind in ("road_morf", "road_lerf"):
                change = np.mean([r[kind] for r in records[: self.n_road]], axis=0)
                curve = pd.DataFrame({"fraction": self.road_fractions,
                                      "change": np.concatenate([[0.0], change])})
                row[f"{kind}_auc"] = deletion_auc(curve)
                self.curves.append(curve.assign(method=name, kind=kind))
        like = budget_summary(np.stack([r["budget"] for r in records]))
        row.update({f"budget_shift_{k}": v for k, v in like.items()})
        if name == NOISE_PER_SUBJECT:  # its ranks placing the amortised budget (a column)
            other = budget_summary(np.stack([r["amortised_budget"] for r in records]))
            row.update({f"amortised_budget_shift_{k}": v for k, v in other.items()})
        fixed = np.stack([r["fixed"] for r in records]).mean(0)
        row.update({f"fixed_noise_shift_{k}": float(v)
                    for k, v in zip(FIXED_NOISE_PLACEMENTS, fixed, strict=True)})
        if self.n_sanity:
            sanity = records[: self.n_sanity]
            if name == NOISE:
                row["sanity_refit_spearman"] = float(np.mean([r["refit_spearman"]
                                                              for r in sanity]))
            cascade = cascade_table(layers, np.stack([r["cascade"] for r in sanity]))
            self.sanity.append(cascade.assign(method=name))
            row.update(sanity_verdict(cascade, s.sanity_threshold))
            if name in REFERENCES:
                row["sanity_result"] = "reference"
            else:
                row["sanity_result"] = "pass" if row["sanity_pass"] else "FAIL"
            robust = np.asarray([r["robustness"] for r in sanity], dtype=np.float64)
            row["robustness_spearman"] = (float(np.nanmean(robust)) if np.isfinite(robust).any()
                                          else float("nan"))
        row["top_region"] = table["name"].iloc[0] if len(table) else ""
        self.rows.append(row)
        _record(study, name, row, by_effect)

    def finish(self) -> Comparison:
        study = self.study
        result = Comparison(
            scores=pd.DataFrame(self.rows),
            curves=pd.concat(self.curves, ignore_index=True)[
                ["method", "kind", "fraction", "change"]],
            sanity=(pd.concat(self.sanity, ignore_index=True) if self.sanity
                    else pd.DataFrame()),
            region_ranks=(pd.concat(self.ranks, ignore_index=True) if self.ranks
                          else pd.DataFrame()),
            mean_maps=self.mean_maps,
            subject_maps=self.subject_maps,
        )
        merge_metrics(study, NOISE, {"goal": noise_goal(result.scores)})
        write_table(study.run.table("method_comparison"), result.scores)
        write_table(study.run.table("deletion_curves"), result.curves)
        for name, table in (("sanity_checks", result.sanity),
                            ("region_rank_intervals", result.region_ranks)):
            if not table.empty:
                write_table(study.run.table(name), table)
            else:  # not computed this time: an earlier run's table must not be read back
                study.run.table(name).unlink(missing_ok=True)
        return result


def load_comparison(study: MapsStudy) -> Comparison:
    """Read back the comparison that :func:`compare_methods` wrote into the run folder.

    What a notebook shows after the step ran under ``torchrun``: the tables
    (``tables/method_comparison.csv``, ``deletion_curves.csv``, ``sanity_checks.csv``,
    ``region_rank_intervals.csv``) and each method's mean map and map of the first
    compared subject (``maps/method-<method>_mean.nii.gz``, ``..._subject.nii.gz``).

    Raises
    ------
    BrainAgeInputError
        Naming the missing file, if the comparison was not written.
    """
    run = study.run

    def table(name: str, required: bool = True) -> pd.DataFrame:
        path = run.table(name)
        if not path.is_file():
            if required:
                raise BrainAgeInputError("no method comparison: run step 06 first", path)
            return pd.DataFrame()
        return pd.read_csv(path)

    scores = table("method_comparison")
    mean_maps, subject_maps = {}, {}
    for name in scores["method"]:
        for store, path in ((mean_maps, run.method_map(name)),
                            (subject_maps, run.method_subject_map(name))):
            if not path.is_file():
                raise BrainAgeInputError("the method comparison is incomplete", path)
            store[name] = load_map(path)
    return Comparison(
        scores=scores,
        curves=table("deletion_curves"),
        sanity=table("sanity_checks", required=False),
        region_ranks=table("region_rank_intervals", required=False),
        mean_maps=mean_maps,
        subject_maps=subject_maps,
    )


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
