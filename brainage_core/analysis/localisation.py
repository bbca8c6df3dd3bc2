"""Scoring importance maps: against planted ground truth, and against the model itself.

Two kinds of score:

* **Localisation** (synthetic cohorts, where the voxels that carry age are known):
  :func:`localisation_auroc` (do map values separate planted from other brain voxels?),
  :func:`relevance_mass` (the share of importance inside the planted mask; Arras et al.,
  2022) and :func:`planted_ranks` (are the planted regions at the top of the region
  table?).
* **Faithfulness** (any cohort): :func:`faithfulness` compares the predictor's error when
  noise is placed where the map says voxels do not matter, at random, or where the map
  says they matter most; :func:`deletion_curve` removes the most important voxels first
  and tracks ``|f(x_deleted) - f(x)|`` (the regression form of the deletion metric), and
  :func:`deletion_auc` gives its area.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
from nilearn.image import resample_img
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from brainage_core._utils.validation import BrainAgeInputError, check_fraction, check_positive
from brainage_core.analysis.regions import _SIDE, region_table


# -- localisation ---------------------------------------------------------------------------
def _brain_values(importance: Any, truth: Any, brain: Any) -> tuple[np.ndarray, np.ndarray]:
    imp = np.asarray(importance, dtype=np.float64)
    imp = imp.reshape(imp.shape[-3:]) if imp.ndim > 3 else imp
    truth = np.asarray(truth).astype(bool)
    brain = np.ones(truth.shape, bool) if brain is None else np.asarray(brain).astype(bool)
    if not (imp.shape == truth.shape == brain.shape):
        raise BrainAgeInputError(
            f"'importance', 'truth' and 'brain' must share one grid; got {imp.shape}, "
            f"{truth.shape} and {brain.shape}."
        )
    return imp[brain], truth[brain]


def localisation_auroc(importance: Any, truth: Any, brain: Any = None) -> float:
    """Area under the ROC curve of the map's voxels against the planted mask.

    Parameters
    ----------
    importance : array-like
        Importance map (higher = more important).
    truth : array-like of bool
        Voxels that carry planted age signal.
    brain : array-like of bool or None, default=None
        Only voxels inside this mask are scored (None = all voxels).

    Returns
    -------
    float
        1 for a map that ranks every planted voxel above every other, 0.5 for chance;
        NaN if the brain holds only planted or only unplanted voxels.
    """
    values, labels = _brain_values(importance, truth, brain)
    if labels.all() or not labels.any():
        return float("nan")
    return float(roc_auc_score(labels, values))


def relevance_mass(importance: Any, truth: Any, brain: Any = None) -> float:
    """Share of the brain's total importance that falls inside the planted mask.

    The map must be non-negative. For reference, a uniform map scores the planted
    mask's share of brain voxels.
    """
    values, labels = _brain_values(importance, truth, brain)
    if values.min(initial=0.0) < 0:
        raise BrainAgeInputError("'importance' must be non-negative for the relevance mass.")
    total = values.sum()
    return float(values[labels].sum() / total) if total > 0 else float("nan")


def relevance_rank_accuracy(importance: Any, truth: Any, brain: Any = None) -> float:
    """Share of the ``K`` most important brain voxels that are planted, ``K`` = planted count.

    The relevance rank accuracy of Arras et al. (2022): 1 when the top ``K`` voxels are
    exactly the planted ones; a random map scores the planted share of the brain.
    """
    values, labels = _brain_values(importance, truth, brain)
    k = int(labels.sum())
    if k == 0:
        return float("nan")
    top = np.argsort(-values, kind="stable")[:k]
    return float(labels[top].mean())


def planted_ranks(table: pd.DataFrame, planted: Sequence[str]) -> dict[str, Any]:
    """Where the planted regions sit in a region table.

    Parameters
    ----------
    table : pandas.DataFrame
        A :func:`brainage_core.analysis.regions.region_table` (columns ``rank``, ``name``).
    planted : sequence of str
        Region names or name patterns (case-insensitive substrings, as in the atlas and
        in :class:`brainage_core.data.synth.config.AgeEffect`) of the planted regions.

    Returns
    -------
    dict
        ``ranks`` ({region name: rank} of the matching regions), ``k`` (their number),
        ``precision_at_k`` (share of the top ``k`` regions that are planted) and
        ``top`` (True when the top ``k`` regions are exactly the planted ones).
    """
    patterns = [re.escape(p.lower()) for p in planted]
    if not patterns:
        raise BrainAgeInputError("'planted' must name at least one region; [] was provided.")
    ordered = table.sort_values("rank")
    is_planted = ordered["name"].str.lower().str.contains("|".join(patterns), regex=True)
    k = int(is_planted.sum())
    ranks = {
        str(n): int(r)
        for n, r in zip(ordered["name"][is_planted], ordered["rank"][is_planted], strict=True)
    }
    precision = float(is_planted.iloc[:k].mean()) if k else float("nan")
    return {"ranks": ranks, "k": k, "precision_at_k": precision, "top": bool(k and precision == 1)}


def truth_on_grid(
    mask_img: nib.Nifti1Image, affine: np.ndarray, shape: Sequence[int]
) -> np.ndarray:
    """Resample a binary ground-truth mask onto a grid (voxels at least half inside).

    Parameters
    ----------
    mask_img : nibabel.Nifti1Image
        Binary mask, for example ``load_ground_truth(root).mask_img``.
    affine, shape
        The target grid (a cohort's ``affine`` and ``mask.shape``).
    """
    img = nib.Nifti1Image(np.asarray(mask_img.get_fdata(), dtype=np.float32), mask_img.affine)
    with warnings.catch_warnings():
        # linear interpolation of a binary mask is intended: it gives each coarse voxel
        # the share of it that lies inside the mask
        warnings.filterwarnings("ignore", message="Resampling binary images")
        out = resample_img(
            img,
            target_affine=np.asarray(affine),
            target_shape=tuple(shape),
            interpolation="continuous",
            force_resample=True,
            copy_header=True,
        )
    return np.asarray(out.get_fdata()) >= 0.5


def image_on_grid(img: nib.Nifti1Image, affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Resample a continuous image (for example the planted strength) onto a grid.

    Linear interpolation; used for the continuous truth ``strength_img``.
    """
    src = nib.Nifti1Image(np.asarray(img.get_fdata(), dtype=np.float32), img.affine)
    out = resample_img(
        src,
        target_affine=np.asarray(affine),
        target_shape=tuple(shape),
        interpolation="continuous",
        force_resample=True,
        copy_header=True,
    )
    return np.nan_to_num(np.asarray(out.get_fdata(), dtype=np.float64))


def depth_profile(importance: Any, truth: Any, brain: Any, *, max_depth: int = 6) -> pd.DataFrame:
    """Importance by distance to the brain's edge, and localisation within each depth.

    Importance maps of CNNs often rise towards the centre of the brain whatever the data,
    and planted effects differ in depth (the cortex is a thin outer shell). This table
    separates the two: ``auroc_within`` scores planted against unplanted voxels at the
    same depth only, so a depth gradient cannot help or hurt it.

    Parameters
    ----------
    importance : array-like
        Importance map.
    truth : array-like of bool
        Planted voxels.
    brain : array-like of bool
        Brain mask (depth is measured inside it, in voxels, from its edge).
    max_depth : int, default=6
        Voxels deeper than this share the last row.

    Returns
    -------
    pandas.DataFrame
        One row per depth (1 = the outermost layer): ``depth``, ``n_voxels``,
        ``mean_importance``, ``planted_fraction`` and ``auroc_within`` (NaN where a
        depth holds only planted or only unplanted voxels).
    """
    check_positive("max_depth", max_depth, integer=True)
    brain = np.asarray(brain).astype(bool)
    values, labels = _brain_values(importance, truth, brain)
    depth = np.minimum(np.rint(ndimage.distance_transform_edt(brain)[brain]), max_depth)
    rows = []
    for d in range(1, max_depth + 1):
        at = depth == d
        if not at.any():
            continue
        rows.append(
            {
                "depth": d,
                "n_voxels": int(at.sum()),
                "mean_importance": float(values[at].mean()),
                "planted_fraction": float(labels[at].mean()),
                "auroc_within": localisation_auroc(values[at], labels[at]),
            }
        )
    return pd.DataFrame(
        rows, columns=["depth", "n_voxels", "mean_importance", "planted_fraction", "auroc_within"]
    )


def depth_matched_auroc(importance: Any, truth: Any, brain: Any, *, max_depth: int = 6) -> float:
    """Localisation AUROC with planted and unplanted voxels compared at equal depth only.

    The mean of :func:`depth_profile`'s ``auroc_within``, weighted by the number of planted
    voxels at each depth (a stratified AUROC). 0.5 for a map that only encodes depth.
    """
    table = depth_profile(importance, truth, brain, max_depth=max_depth).dropna()
    weights = table["n_voxels"] * table["planted_fraction"]
    if table.empty or weights.sum() == 0:
        return float("nan")
    return float((table["auroc_within"] * weights).sum() / weights.sum())


def core_truth(truth: Any, strength: Any, weak_tail: float) -> tuple[np.ndarray, np.ndarray]:
    """Binary truth without its weak smoothing tails.

    Parameters
    ----------
    truth : array-like of bool
        Planted voxels.
    strength : array-like
        Continuous truth: the planted intensity change of each voxel.
    weak_tail : float
        Planted voxels whose change is below this are left out.

    Returns
    -------
    positives : numpy.ndarray of bool
        Planted voxels with a change of at least ``weak_tail``.
    scored : numpy.ndarray of bool
        Voxels that take part in the scores: everything but the weak tails.
    """
    check_positive("weak_tail", weak_tail, allow_zero=True)
    truth = np.asarray(truth).astype(bool)
    strength = np.asarray(strength, dtype=np.float64)
    if strength.shape != truth.shape:
        raise BrainAgeInputError(
            f"'strength' must be on the truth's grid {truth.shape}; {strength.shape} was provided."
        )
    positives = truth & (strength >= weak_tail)
    return positives, ~(truth & ~positives)


def rank_correlation(importance: Any, strength: Any, brain: Any = None) -> float:
    """Spearman correlation of a map with the continuous truth over the brain's voxels."""
    from scipy.stats import spearmanr

    values, _ = _brain_values(importance, np.zeros(np.shape(strength), bool), brain)
    s = np.asarray(strength, dtype=np.float64)
    s = s[np.ones(s.shape, bool) if brain is None else np.asarray(brain).astype(bool)]
    if np.ptp(values) == 0 or np.ptp(s) == 0:
        return float("nan")
    return float(spearmanr(values, s).statistic)


def age_correlation_map(
    images: Any, ages: Any, brain: Any = None, *, chunk: int = 64
) -> np.ndarray:
    """The model-free ceiling map: ``|corr(intensity, age)|`` of every voxel.

    No predictor is involved: the map marks the voxels whose intensity follows age
    across subjects. Scored like an importance map, it shows how far a map can localise
    from the data alone; on the synthetic cohort it is a reference for every method.

    Parameters
    ----------
    images : array-like of shape (N, X, Y, Z) or (N, 1, X, Y, Z)
        Images of one split (a memmap is read in chunks).
    ages : array-like of shape (N,)
        Their ages.
    brain : array-like of bool or None, default=None
        Voxels outside it get 0.
    chunk : int, default=64
        Images read at a time.

    Returns
    -------
    numpy.ndarray
        The map on the image grid, in [0, 1].
    """
    ages = np.asarray(ages, dtype=np.float64).reshape(-1)
    n = len(ages)
    if n < 3 or np.shape(images)[0] != n:
        raise BrainAgeInputError(
            f"'images' and 'ages' must hold the same number (>= 3) of subjects; got "
            f"{np.shape(images)[0]} images and {n} ages."
        )
    grid = tuple(np.shape(images)[-3:])
    a = ages - ages.mean()
    sx = np.zeros(grid)
    sxx = np.zeros(grid)
    sxa = np.zeros(grid)
    for start in range(0, n, chunk):
        x = np.asarray(images[start : start + chunk], dtype=np.float64).reshape(-1, *grid)
        sx += x.sum(0)
        sxx += np.square(x).sum(0)
        sxa += np.tensordot(a[start : start + chunk], x, axes=1)
    var_x = sxx - sx**2 / n
    denom = np.sqrt(np.clip(var_x, 0, None) * np.square(a).sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.where(denom > 0, np.abs(sxa) / denom, 0.0)
    if brain is not None:
        corr = corr * np.asarray(brain).astype(bool)
    return np.clip(corr, 0.0, 1.0)


def coverage_regions(
    truth: Any, atlas: Any, *, share: float = 0.5, bilateral: bool = True
) -> dict[str, float]:
    """Coverage-based region truth: regions with at least ``share`` of voxels planted.

    Smoothed effects spill into neighbouring regions (a planted putamen changes the
    caudate's edge), so naming the planted regions by the generator's region list is
    too strict a truth. Here a region counts as planted when at least ``share`` of its
    voxels on the grid are in the truth.

    Parameters
    ----------
    truth : array-like of bool
        Planted voxels, on the atlas grid.
    atlas : Atlas
        ``labels`` and ``names`` (see :func:`brainage_core.regions.region_table`).
    share : float, default=0.5
        Minimum planted share of a region's voxels.
    bilateral : bool, default=True
        Merge left and right regions of the same name (as the region table can).

    Returns
    -------
    dict
        ``{region name: planted share}`` of the planted regions, largest share first.
    """
    check_fraction("share", share, allow_one=True)
    truth = np.asarray(truth).astype(bool)
    labels = np.asarray(atlas.labels)
    if truth.shape != labels.shape:
        raise BrainAgeInputError(
            f"'truth' must be on the atlas grid {labels.shape}; {truth.shape} was provided."
        )
    groups: dict[str, list[int]] = {}
    for label in np.unique(labels[labels > 0]):
        name = atlas.names[int(label)]
        groups.setdefault(_SIDE.sub("", name) if bilateral else name, []).append(int(label))
    out = {}
    for name, members in groups.items():
        inside = np.isin(labels, members)
        cover = float(truth[inside].mean())
        if cover >= share:
            out[name] = cover
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def planted_in_top(table: pd.DataFrame, planted: Sequence[str], top: int = 3) -> dict[str, Any]:
    """Whether every planted region (exact names) is among the ``top`` regions of a table.

    Returns
    -------
    dict
        ``ranks`` ({planted region: rank or None if absent}), ``top`` (the ``top``), and
        ``all_in_top`` (True when each planted region ranks at most ``top``).
    """
    check_positive("top", top, integer=True)
    rank_of = dict(zip(table["name"], table["rank"], strict=True))
    ranks = {str(p): (int(rank_of[p]) if p in rank_of else None) for p in planted}
    ok = bool(planted) and all(r is not None and r <= top for r in ranks.values())
    return {"ranks": ranks, "top": int(top), "all_in_top": ok}


def score_map(
    importance: np.ndarray,
    table: pd.DataFrame | None,
    truth: Any,
    brain: np.ndarray,
    *,
    reliance: dict[str, float] | None = None,
    atlas: Any = None,
    coverage: float = 0.5,
) -> dict[str, Any]:
    """All localisation scores of one (population) map; empty without ground truth.

    ``truth`` is a :class:`brainage_core.analysis.truth.GridTruth` (or None), ``table`` the
    map's region table (:func:`brainage_core.analysis.regions.region_table`; None skips the
    planted ranks), ``brain`` the brain mask. Every method's map gets the same scores:

    * ``localisation_auroc``, ``relevance_mass``, ``relevance_rank``
      (:func:`relevance_rank_accuracy`) and ``localisation_auroc_depth_matched`` against
      the binary truth;
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
        "relevance_rank": relevance_rank_accuracy(importance, truth.mask, brain),
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
