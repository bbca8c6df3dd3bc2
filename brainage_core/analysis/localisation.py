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

from brainage_core._utils.validation import BrainAgeInputError, check_positive


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


def depth_profile(
    importance: Any, truth: Any, brain: Any, *, max_depth: int = 6
) -> pd.DataFrame:
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


def score_map(
    importance: np.ndarray,
    table: pd.DataFrame | None,
    truth: Any,
    brain: np.ndarray,
) -> dict[str, Any]:
    """All localisation scores of one (population) map; empty without ground truth.

    Parameters
    ----------
    importance : numpy.ndarray
        The map, on the truth's grid.
    table : pandas.DataFrame or None
        Its region table (:func:`brainage_core.analysis.regions.region_table`), for the
        ranks of the planted regions; None skips them.
    truth : GridTruth or None
        :class:`brainage_core.analysis.truth.GridTruth` (``mask``, ``regions``,
        ``effect_masks``); None returns ``{}``.
    brain : numpy.ndarray of bool
        The brain mask.
    """
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
