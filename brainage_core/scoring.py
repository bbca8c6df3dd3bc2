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
import torch
from nilearn.image import resample_img
from scipy import ndimage
from sklearn.metrics import roc_auc_score
from torch import nn

from ._validation import BrainAgeInputError, check_fraction, check_positive
from .noise_maps import frozen, model_device, predict_batch


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
        A :func:`brainage_core.regions.region_table` (columns ``rank``, ``name``).
    planted : sequence of str
        Region names or name patterns (case-insensitive substrings, as in the atlas and
        in :class:`brainage_core.synth.AgeEffect`) of the planted regions.

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


# -- faithfulness ---------------------------------------------------------------------------
def _prepare(
    images: Any, importance: Any, brain: Any
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    x = torch.as_tensor(images, dtype=torch.float32)
    imp = torch.as_tensor(importance, dtype=torch.float32)
    if x.ndim == 4:
        x, imp = x[None], imp.reshape(1, *imp.shape[-4:])
    if x.ndim != 5 or x.shape[1] != 1 or imp.shape != x.shape:
        raise BrainAgeInputError(
            f"'images' must be shaped (N, 1, X, Y, Z) and 'importance' like them; got "
            f"{tuple(x.shape)} and {tuple(imp.shape)}."
        )
    grid = tuple(x.shape[2:])
    brain = np.ones(grid, bool) if brain is None else np.asarray(brain).astype(bool)
    if brain.shape != grid:
        raise BrainAgeInputError(f"'brain' must have shape {grid}; {brain.shape} was provided.")
    return x, imp, np.flatnonzero(brain.ravel())


@torch.no_grad()
def _predict(predictor: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    device = model_device(predictor)
    return torch.cat(
        [predict_batch(predictor, c.to(device)).cpu() for c in torch.split(x, batch_size)]
    )


def faithfulness(
    predictor: nn.Module,
    images: Any,
    importance: Any,
    brain: Any = None,
    *,
    fraction: float = 0.5,
    sigma: float = 1.0,
    n_draws: int = 2,
    seed: int = 0,
    batch_size: int = 8,
) -> dict[str, float]:
    """Prediction shift under noise placed by the map, at random, and by the inverted map.

    For each image, Gaussian noise of standard deviation ``sigma`` is added to a
    ``fraction`` of its brain voxels: the *least* important ones according to the map
    (``"map"``), a random set of the same size (``"random"``) or the *most* important ones
    (``"inverted"``). The total amount of noise is the same in all three. A faithful map
    protects the prediction: ``map < random < inverted``.

    Parameters
    ----------
    predictor : torch.nn.Module
        Model mapping ``(N, 1, X, Y, Z)`` to ``(N,)`` (frozen here).
    images : array-like of shape (N, 1, X, Y, Z)
        Images that were explained.
    importance : array-like shaped like ``images``
        Their importance maps.
    brain : array-like of bool or None, default=None
        Brain mask; noise goes only inside it.
    fraction : float, default=0.5
        Share of brain voxels that receive noise.
    sigma : float, default=1.0
        Noise standard deviation, in image intensity units.
    n_draws : int, default=2
        Noise draws per image (averaged).
    seed : int, default=0
        Seeds the noise and the random placement.
    batch_size : int, default=8
        Images per forward pass.

    Returns
    -------
    dict
        Mean ``|f(x~) - f(x)|`` in years for ``"map"``, ``"random"`` and ``"inverted"``.
    """
    check_fraction("fraction", fraction, allow_one=True)
    check_positive("sigma", sigma)
    check_positive("n_draws", n_draws, integer=True)
    x, imp, voxels = _prepare(images, importance, brain)
    n_noisy = int(round(fraction * voxels.size))
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    flat = x.reshape(n, -1)
    with frozen(predictor):
        clean = _predict(predictor, x, batch_size)
        shifts = {"map": 0.0, "random": 0.0, "inverted": 0.0}
        for _ in range(n_draws):
            eps = torch.randn(flat.shape, generator=gen) * sigma
            for placement in shifts:
                select = torch.zeros(flat.shape, dtype=torch.bool)
                for i in range(n):
                    order = voxels[np.argsort(imp[i].reshape(-1)[voxels].numpy(), kind="stable")]
                    if placement == "map":
                        chosen = order[:n_noisy]
                    elif placement == "inverted":
                        chosen = order[voxels.size - n_noisy :]
                    else:
                        chosen = rng.choice(voxels, size=n_noisy, replace=False)
                    select[i, torch.from_numpy(chosen)] = True
                noisy = (flat + eps * select).reshape(x.shape)
                pred = _predict(predictor, noisy, batch_size)
                shifts[placement] += float((pred - clean).abs().mean()) / n_draws
    return shifts


def deletion_curve(
    predictor: nn.Module,
    images: Any,
    importance: Any,
    brain: Any = None,
    *,
    steps: int = 10,
    baseline: float = 0.0,
    batch_size: int = 8,
) -> pd.DataFrame:
    """Regression deletion curve: remove the most important voxels first.

    At each of ``steps + 1`` fractions from 0 to 1, the top fraction of each image's brain
    voxels (by importance) is set to ``baseline`` and ``|f(x_deleted) - f(x)|`` recorded.

    Returns
    -------
    pandas.DataFrame
        Columns ``fraction`` and ``change`` (mean absolute prediction change in years
        over the images).
    """
    check_positive("steps", steps, integer=True)
    x, imp, voxels = _prepare(images, importance, brain)
    n = x.shape[0]
    flat = x.reshape(n, -1)
    orders = [
        voxels[np.argsort(-imp[i].reshape(-1)[voxels].numpy(), kind="stable")] for i in range(n)
    ]
    fractions = np.linspace(0.0, 1.0, steps + 1)
    rows = []
    with frozen(predictor):
        clean = _predict(predictor, x, batch_size)
        for frac in fractions:
            k = int(round(frac * voxels.size))
            deleted = flat.clone()
            for i in range(n):
                deleted[i, torch.from_numpy(orders[i][:k])] = baseline
            pred = _predict(predictor, deleted.reshape(x.shape), batch_size)
            rows.append({"fraction": float(frac), "change": float((pred - clean).abs().mean())})
    return pd.DataFrame(rows)


def deletion_auc(curve: pd.DataFrame) -> float:
    """Area under a :func:`deletion_curve` (trapezoid rule, in years).

    Higher is better: a faithful map makes the prediction move as soon as its top voxels
    are removed. Compare areas only between maps of the same images and predictor.
    """
    frac = curve["fraction"].to_numpy(dtype=float)
    change = curve["change"].to_numpy(dtype=float)
    return float(np.sum((change[1:] + change[:-1]) * np.diff(frac)) / 2.0)
