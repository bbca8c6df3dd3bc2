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
    from .regions import _SIDE

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


def budget_faithfulness(
    predictor: nn.Module,
    images: Any,
    importance: Any,
    budget: Any,
    perturb: Any,
    brain: Any = None,
    *,
    n_draws: int = 4,
    seed: int = 0,
    batch_size: int = 8,
) -> dict[str, float]:
    """Like-for-like faithfulness: the learned noise budget, kept and moved around.

    The noise levels ``budget`` (for example the noise model's ``B`` of each image) are
    kept as a set of values and placed three ways inside the brain: by the map (the most
    important voxel gets the lowest ``B``, the least important the highest: for the noise
    model's own map ``1 - B`` this is ``B`` itself), randomly permuted, and rank-inverted
    (the most important voxel gets the highest ``B``). The same perturbation the maps were
    trained with is applied, so the test runs in the regime of the objective. A faithful
    map protects the prediction: ``learned < permuted < inverted``.

    Parameters
    ----------
    predictor : torch.nn.Module
        Model mapping ``(N, 1, X, Y, Z)`` to ``(N,)`` (frozen here).
    images : array-like of shape (N, 1, X, Y, Z)
        Images that were explained.
    importance : array-like shaped like ``images``
        Their importance maps (any method).
    budget : array-like shaped like ``images``
        Noise levels in [0, 1] whose values are placed (per image).
    perturb : callable
        ``perturb(x, b, generator) -> x~``, for example
        :meth:`brainage_core.noise_maps.NoiseMapExplainer.perturb`.
    brain : array-like of bool or None, default=None
        Brain mask; values are moved only within it.
    n_draws : int, default=4
        Noise draws (and random permutations) averaged.
    seed : int, default=0
        Seeds the draws and the permutations.
    batch_size : int, default=8
        Images per forward pass.

    Returns
    -------
    dict
        Mean ``|f(x~) - f(x)|`` in years for ``"learned"``, ``"permuted"`` and
        ``"inverted"``, and the ratios ``"learned_ratio"`` and ``"inverted_ratio"``
        (each over ``"permuted"``).
    """
    check_positive("n_draws", n_draws, integer=True)
    x, imp, voxels = _prepare(images, importance, brain)
    bud = torch.as_tensor(budget, dtype=torch.float32).reshape(x.shape)
    n = x.shape[0]
    rng = np.random.default_rng(seed)
    placed = {"learned": [], "inverted": []}
    for i in range(n):
        values = np.sort(bud[i].reshape(-1)[voxels].numpy())  # ascending B
        by_importance = voxels[np.argsort(-imp[i].reshape(-1)[voxels].numpy(), kind="stable")]
        for name, vals in (("learned", values), ("inverted", values[::-1])):
            b = torch.zeros(x[i].numel())
            b[torch.from_numpy(by_importance)] = torch.from_numpy(vals.copy())
            placed[name].append(b.reshape(x.shape[1:]))
    maps = {k: torch.stack(v) for k, v in placed.items()}
    device = model_device(predictor)
    shifts = {"learned": 0.0, "permuted": 0.0, "inverted": 0.0}
    with frozen(predictor):
        clean = _predict(predictor, x, batch_size)
        for draw in range(n_draws):
            permuted = torch.zeros_like(bud)
            for i in range(n):
                flat = permuted[i].reshape(-1)
                values = bud[i].reshape(-1)[voxels]
                flat[torch.from_numpy(voxels)] = values[
                    torch.from_numpy(rng.permutation(voxels.size))
                ]
            for name, b in (*maps.items(), ("permuted", permuted)):
                gen = torch.Generator(device=device).manual_seed(seed * 1000 + draw)
                preds = []
                for xs, bs in zip(
                    torch.split(x, batch_size), torch.split(b, batch_size), strict=True
                ):
                    with torch.no_grad():
                        xt = perturb(xs.to(device), bs.to(device), gen)
                        preds.append(predict_batch(predictor, xt).cpu())
                shifts[name] += float((torch.cat(preds) - clean).abs().mean()) / n_draws
    shifts["learned_ratio"] = (
        shifts["learned"] / shifts["permuted"] if shifts["permuted"] else float("nan")
    )
    shifts["inverted_ratio"] = (
        shifts["inverted"] / shifts["permuted"] if shifts["permuted"] else float("nan")
    )
    return shifts


def deletion_curve(
    predictor: nn.Module,
    images: Any,
    importance: Any,
    brain: Any = None,
    *,
    steps: int = 10,
    reference: Any = 0.0,
    insertion: bool = False,
    batch_size: int = 8,
) -> pd.DataFrame:
    """Regression deletion (or insertion) curve, most important voxels first.

    Deletion: at each of ``steps + 1`` fractions from 0 to 1, the top fraction of each
    image's brain voxels (by importance) is replaced by ``reference`` and
    ``|f(x_deleted) - f(x)|`` recorded (a faithful map makes it rise early).
    Insertion: the image starts as ``reference`` inside the brain and the top fraction of
    voxels gets its own values back (a faithful map makes the change fall early).

    Parameters
    ----------
    reference : float or array-like shaped like ``images`` (or one image), default=0.0
        What a deleted voxel becomes: use the reference image of the perturbation (the
        training mean, a blurred copy). 0 is the CSF intensity of the study's images, so
        deleting CSF toward 0 deletes nothing; 0 is kept only as the first version's column.
    insertion : bool, default=False
        Compute the insertion curve instead.

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
    ref = torch.as_tensor(reference, dtype=torch.float32)
    ref = (ref * torch.ones_like(x) if ref.ndim == 0 else ref.expand_as(x)).reshape(n, -1)
    orders = [
        voxels[np.argsort(-imp[i].reshape(-1)[voxels].numpy(), kind="stable")] for i in range(n)
    ]
    fractions = np.linspace(0.0, 1.0, steps + 1)
    rows = []
    with frozen(predictor):
        clean = _predict(predictor, x, batch_size)
        for frac in fractions:
            k = int(round(frac * voxels.size))
            if insertion:
                changed = flat.clone()
                changed[:, torch.from_numpy(voxels)] = ref[:, torch.from_numpy(voxels)]
                source = flat
            else:
                changed, source = flat.clone(), ref
            for i in range(n):
                idx = torch.from_numpy(orders[i][:k])
                changed[i, idx] = source[i, idx]
            pred = _predict(predictor, changed.reshape(x.shape), batch_size)
            rows.append({"fraction": float(frac), "change": float((pred - clean).abs().mean())})
    return pd.DataFrame(rows)


def deletion_auc(curve: pd.DataFrame) -> float:
    """Area under a :func:`deletion_curve` (trapezoid rule, in years).

    For deletion, higher is better: a faithful map makes the prediction move as soon as
    its top voxels are removed; for insertion, lower is better. Compare areas only
    between maps of the same images and predictor.
    """
    frac = curve["fraction"].to_numpy(dtype=float)
    change = curve["change"].to_numpy(dtype=float)
    return float(np.sum((change[1:] + change[:-1]) * np.diff(frac)) / 2.0)
