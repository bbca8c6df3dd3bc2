"""Scoring importance maps against the model itself: faithfulness and deletion curves."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from brainage_core._utils.torch import frozen, model_device, predict_batch, subject_seed
from brainage_core._utils.validation import BrainAgeInputError, check_fraction, check_positive


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
        Seeds the noise and the random placement (each image's draws from ``seed`` and
        its position, see :func:`fixed_noise_shifts`).
    batch_size : int, default=8
        Images per forward pass.

    Returns
    -------
    dict
        Mean ``|f(x~) - f(x)|`` in years for ``"map"``, ``"random"`` and ``"inverted"``.
    """
    shifts = fixed_noise_shifts(predictor, images, importance, brain, fraction=fraction,
                                sigma=sigma, n_draws=n_draws, seed=seed, batch_size=batch_size)
    return dict(zip(FIXED_NOISE_PLACEMENTS, map(float, shifts.mean(0)), strict=True))


#: The placements of :func:`fixed_noise_shifts`, in the order of its columns.
FIXED_NOISE_PLACEMENTS = ("map", "random", "inverted")


def fixed_noise_shifts(
    predictor: nn.Module,
    images: Any,
    importance: Any,
    brain: Any = None,
    *,
    fraction: float = 0.5,
    sigma: float = 1.0,
    n_draws: int = 2,
    seed: int = 0,
    positions: Any = None,
    batch_size: int = 8,
) -> np.ndarray:
    """Per-image shifts of :func:`faithfulness`, shaped ``(N, 3)`` (map, random, inverted).

    Image ``i``'s noise and random placement are drawn from ``(seed, positions[i])``
    alone (``positions``: the images' places in the whole compared set, default
    ``0..N-1``), so a shard of the images gives the rows of the whole set.
    """
    check_fraction("fraction", fraction, allow_one=True)
    check_positive("sigma", sigma)
    check_positive("n_draws", n_draws, integer=True)
    x, imp, voxels = _prepare(images, importance, brain)
    n = x.shape[0]
    positions = image_positions(positions, n)
    n_noisy = int(round(fraction * voxels.size))
    out = np.zeros((n, len(FIXED_NOISE_PLACEMENTS)))
    if n == 0:
        return out
    flat = x.reshape(n, -1)
    orders = [voxels[np.argsort(imp[i].reshape(-1)[voxels].numpy(), kind="stable")]
              for i in range(n)]
    rngs = [np.random.default_rng([int(seed), int(p)]) for p in positions]
    gens = [torch.Generator().manual_seed(subject_seed(seed, p)) for p in positions]
    with frozen(predictor):
        clean = _predict(predictor, x, batch_size)
        for _ in range(n_draws):
            eps = torch.stack([torch.randn(flat.shape[1], generator=g) for g in gens]) * sigma
            for column, placement in enumerate(FIXED_NOISE_PLACEMENTS):
                select = torch.zeros(flat.shape, dtype=torch.bool)
                for i in range(n):
                    if placement == "map":
                        chosen = orders[i][:n_noisy]
                    elif placement == "inverted":
                        chosen = orders[i][voxels.size - n_noisy :]
                    else:
                        chosen = rngs[i].choice(voxels, size=n_noisy, replace=False)
                    select[i, torch.from_numpy(chosen)] = True
                noisy = (flat + eps * select).reshape(x.shape)
                pred = _predict(predictor, noisy, batch_size)
                out[:, column] += (pred - clean).abs().double().numpy() / n_draws
    return out


def image_positions(positions: Any, n: int) -> np.ndarray:
    """The images' places in the whole set (``0..n-1`` for None), checked: one per image."""
    if positions is None:
        return np.arange(n)
    positions = np.asarray(positions, dtype=np.int64).reshape(-1)
    if positions.size != n:
        raise BrainAgeInputError(f"'positions' must hold one value per image ({n}); "
                                 f"{positions.size} were provided.")
    return positions


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
        :meth:`brainage_core.explain.noise.objective.NoiseObjective.perturb`.
    brain : array-like of bool or None, default=None
        Brain mask; values are moved only within it.
    n_draws : int, default=4
        Noise draws (and random permutations) averaged.
    seed : int, default=0
        Seeds the draws and the permutations (each image's from ``seed`` and its
        position, see :func:`budget_shifts`).
    batch_size : int, default=8
        Images per forward pass.

    Returns
    -------
    dict
        Mean ``|f(x~) - f(x)|`` in years for ``"learned"``, ``"permuted"`` and
        ``"inverted"``, and the ratios ``"learned_ratio"`` and ``"inverted_ratio"``
        (each over ``"permuted"``).
    """
    return budget_summary(budget_shifts(
        predictor, images, importance, budget, perturb, brain, n_draws=n_draws, seed=seed,
        batch_size=batch_size))


#: The placements of :func:`budget_shifts`, in the order of its columns.
BUDGET_PLACEMENTS = ("learned", "permuted", "inverted")


def budget_summary(shifts: np.ndarray) -> dict[str, float]:
    """The mean shifts of :func:`budget_shifts` rows and their ratios to ``"permuted"``."""
    out = dict(zip(BUDGET_PLACEMENTS, map(float, np.asarray(shifts).mean(0)), strict=True))
    for name in ("learned", "inverted"):
        out[f"{name}_ratio"] = out[name] / out["permuted"] if out["permuted"] else float("nan")
    return out


def budget_shifts(
    predictor: nn.Module,
    images: Any,
    importance: Any,
    budget: Any,
    perturb: Any,
    brain: Any = None,
    *,
    n_draws: int = 4,
    seed: int = 0,
    positions: Any = None,
    batch_size: int = 8,
) -> np.ndarray:
    """Per-image shifts of :func:`budget_faithfulness`, shaped ``(N, 3)``.

    Columns: learned, permuted, inverted. Image ``i``'s permutations and noise are drawn
    from ``(seed, positions[i])`` alone (``positions``: the images' places in the whole
    compared set, default ``0..N-1``), so a shard of the images gives the rows of the
    whole set.
    """
    check_positive("n_draws", n_draws, integer=True)
    x, imp, voxels = _prepare(images, importance, brain)
    bud = torch.as_tensor(budget, dtype=torch.float32).reshape(x.shape)
    n = x.shape[0]
    positions = image_positions(positions, n)
    out = np.zeros((n, len(BUDGET_PLACEMENTS)))
    if n == 0:
        return out
    placed: dict[str, list[torch.Tensor]] = {"learned": [], "inverted": []}
    for i in range(n):
        values = np.sort(bud[i].reshape(-1)[voxels].numpy())  # ascending B
        by_importance = voxels[np.argsort(-imp[i].reshape(-1)[voxels].numpy(), kind="stable")]
        for name, vals in (("learned", values), ("inverted", values[::-1])):
            b = torch.zeros(x[i].numel())
            b[torch.from_numpy(by_importance)] = torch.from_numpy(vals.copy())
            placed[name].append(b.reshape(x.shape[1:]))
    maps = {k: torch.stack(v) for k, v in placed.items()}
    device = model_device(predictor)
    rngs = [np.random.default_rng([int(seed), int(p)]) for p in positions]
    with frozen(predictor):
        clean = _predict(predictor, x, batch_size)
        for draw in range(n_draws):
            permuted = torch.zeros_like(bud)
            for i in range(n):
                flat = permuted[i].reshape(-1)
                values = bud[i].reshape(-1)[voxels]
                flat[torch.from_numpy(voxels)] = values[
                    torch.from_numpy(rngs[i].permutation(voxels.size))
                ]
            for name, b in (*maps.items(), ("permuted", permuted)):
                with torch.no_grad():
                    noisy = torch.cat([
                        perturb(x[i : i + 1].to(device), b[i : i + 1].to(device),
                                torch.Generator(device=device).manual_seed(
                                    subject_seed(seed, positions[i], draw)))
                        for i in range(n)
                    ]).cpu()
                pred = _predict(predictor, noisy, batch_size)
                out[:, BUDGET_PLACEMENTS.index(name)] += (
                    (pred - clean).abs().double().numpy() / n_draws
                )
    return out


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
    changes = deletion_changes(predictor, images, importance, brain, steps=steps,
                               reference=reference, insertion=insertion, batch_size=batch_size)
    return pd.DataFrame({"fraction": np.linspace(0.0, 1.0, steps + 1),
                         "change": changes.mean(0)})


def deletion_changes(
    predictor: nn.Module,
    images: Any,
    importance: Any,
    brain: Any = None,
    *,
    steps: int = 10,
    reference: Any = 0.0,
    insertion: bool = False,
    batch_size: int = 8,
) -> np.ndarray:
    """Per-image points of :func:`deletion_curve`, shaped ``(N, steps + 1)``.

    Row ``i`` holds ``|f(x_i changed) - f(x_i)|`` at the fractions
    ``linspace(0, 1, steps + 1)``; the curve is the mean of the rows.
    """
    check_positive("steps", steps, integer=True)
    x, imp, voxels = _prepare(images, importance, brain)
    n = x.shape[0]
    fractions = np.linspace(0.0, 1.0, steps + 1)
    out = np.zeros((n, fractions.size))
    if n == 0:
        return out
    flat = x.reshape(n, -1)
    ref = torch.as_tensor(reference, dtype=torch.float32)
    ref = (ref * torch.ones_like(x) if ref.ndim == 0 else ref.expand_as(x)).reshape(n, -1)
    orders = [
        voxels[np.argsort(-imp[i].reshape(-1)[voxels].numpy(), kind="stable")] for i in range(n)
    ]
    with frozen(predictor):
        clean = _predict(predictor, x, batch_size)
        for column, frac in enumerate(fractions):
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
            out[:, column] = (pred - clean).abs().double().numpy()
    return out


def deletion_auc(curve: pd.DataFrame) -> float:
    """Area under a :func:`deletion_curve` (trapezoid rule, in years).

    For deletion, higher is better: a faithful map makes the prediction move as soon as
    its top voxels are removed; for insertion, lower is better. Compare areas only
    between maps of the same images and predictor.
    """
    frac = curve["fraction"].to_numpy(dtype=float)
    change = curve["change"].to_numpy(dtype=float)
    return float(np.sum((change[1:] + change[:-1]) * np.diff(frac)) / 2.0)


# -- ROAD: remove and debias (Rong et al., 2022) -------------------------------------------
#: The shares of brain voxels ROAD removes, by default.
ROAD_FRACTIONS = (0.1, 0.3, 0.5, 0.7, 0.9)


def noisy_linear_imputation(
    image: np.ndarray, removed: np.ndarray, *, noise_sd: float = 0.0, rng: Any = None
) -> np.ndarray:
    """Fill removed voxels from their neighbours (ROAD's noisy linear imputation).

    Each removed voxel becomes the mean of its 6 face neighbours (removed neighbours are
    themselves unknowns): a sparse linear system whose known values are the kept voxels.
    Gaussian noise of ``noise_sd`` is added to the imputed values. Unlike a constant
    reference, the imputed image does not reveal the removed set by its shape, which is
    the bias of plain deletion that ROAD removes.

    Parameters
    ----------
    image : numpy.ndarray of shape (X, Y, Z)
        The image.
    removed : numpy.ndarray of bool, same shape
        Voxels to impute.
    noise_sd : float, default=0.0
        Standard deviation of the added noise.
    rng : numpy.random.Generator or None
        Draws the noise.
    """
    from scipy import sparse
    from scipy.sparse.linalg import cg

    x = np.asarray(image, dtype=np.float64)
    removed = np.asarray(removed, dtype=bool)
    out = x.copy()
    idx = np.flatnonzero(removed)
    if idx.size == 0:
        return out
    position = np.full(x.size, -1, dtype=np.int64)
    position[idx] = np.arange(idx.size)
    coords = np.stack(np.unravel_index(idx, x.shape), axis=1)
    degree = np.zeros(idx.size)
    rhs = np.zeros(idx.size)
    rows, cols = [], []
    flat = x.ravel()
    for axis in range(3):
        for step in (-1, 1):
            nb = coords.copy()
            nb[:, axis] += step
            inside = (nb[:, axis] >= 0) & (nb[:, axis] < x.shape[axis])
            nb_flat = np.ravel_multi_index(tuple(nb[inside].T), x.shape)
            degree[inside] += 1
            unknown = position[nb_flat] >= 0
            here = np.flatnonzero(inside)
            rows.append(here[unknown])
            cols.append(position[nb_flat[unknown]])
            np.add.at(rhs, here[~unknown], flat[nb_flat[~unknown]])
    r, c = np.concatenate(rows), np.concatenate(cols)
    a = sparse.csr_matrix(
        (np.concatenate([degree, -np.ones(r.size)]),
         (np.concatenate([np.arange(idx.size), r]), np.concatenate([np.arange(idx.size), c]))),
        shape=(idx.size, idx.size),
    )
    known = flat[~removed.ravel()]
    start = np.full(idx.size, known.mean() if known.size else 0.0)
    values, _ = cg(a, rhs, x0=start, rtol=1e-3, maxiter=300)
    if noise_sd > 0:
        rng = np.random.default_rng(0) if rng is None else rng
        values = values + rng.normal(0.0, noise_sd, size=idx.size)
    out.ravel()[idx] = values
    return out


def road_curve(
    predictor: nn.Module,
    images: Any,
    importance: Any,
    brain: Any = None,
    *,
    fractions: Any = ROAD_FRACTIONS,
    most_relevant_first: bool = True,
    noise_fraction: float = 0.02,
    seed: int = 0,
    batch_size: int = 8,
) -> pd.DataFrame:
    """ROAD curve in regression form: remove voxels by the map, impute, track the shift.

    At each fraction, that share of each image's brain voxels is removed in the order of
    the map (most relevant first, "MoRF", or least relevant first, "LeRF") and filled by
    :func:`noisy_linear_imputation`; ``|f(x_imputed) - f(x)|`` is recorded. A faithful
    map moves the prediction early under MoRF (large area) and late under LeRF (small
    area).

    Parameters
    ----------
    fractions : sequence of float, default=(0.1, 0.3, 0.5, 0.7, 0.9)
        Shares of brain voxels removed.
    most_relevant_first : bool, default=True
        MoRF (True) or LeRF (False).
    noise_fraction : float, default=0.02
        Imputation noise, as a share of the images' intensity range.
    seed : int, default=0
        Seeds the imputation noise (each image's from ``seed`` and its position).

    Returns
    -------
    pandas.DataFrame
        Columns ``fraction`` and ``change`` (mean absolute change in years), with the
        point (0, 0) first.
    """
    changes = road_changes(predictor, images, importance, brain, fractions=fractions,
                           most_relevant_first=most_relevant_first,
                           noise_fraction=noise_fraction, seed=seed, batch_size=batch_size)
    fracs = [0.0, *(float(f) for f in fractions)]
    return pd.DataFrame({"fraction": fracs, "change": [0.0, *changes.mean(0)]})


def road_changes(
    predictor: nn.Module,
    images: Any,
    importance: Any,
    brain: Any = None,
    *,
    fractions: Any = ROAD_FRACTIONS,
    most_relevant_first: bool = True,
    noise_fraction: float = 0.02,
    intensity_range: float | None = None,
    seed: int = 0,
    positions: Any = None,
    batch_size: int = 8,
) -> np.ndarray:
    """Per-image points of :func:`road_curve` (without the origin), ``(N, len(fractions))``.

    Image ``i``'s imputation noise is drawn from ``(seed, positions[i])`` alone
    (``positions``: the images' places in the whole compared set, default ``0..N-1``), and
    its standard deviation is ``noise_fraction`` times ``intensity_range`` (default: the
    range of ``images``; give the whole set's range when ``images`` is a shard of it).
    """
    check_fraction("noise_fraction", noise_fraction)
    fracs = [float(check_fraction("fractions", f, allow_one=True)) for f in fractions]
    x, imp, voxels = _prepare(images, importance, brain)
    n = x.shape[0]
    positions = image_positions(positions, n)
    out = np.zeros((n, len(fracs)))
    if n == 0:
        return out
    grid = tuple(x.shape[2:])
    if intensity_range is None:
        intensity_range = float(x.max() - x.min())
    sd = noise_fraction * float(intensity_range)
    orders = []
    for i in range(n):
        order = voxels[np.argsort(-imp[i].reshape(-1)[voxels].numpy(), kind="stable")]
        orders.append(order if most_relevant_first else order[::-1])
    rngs = [np.random.default_rng([int(seed), int(p)]) for p in positions]
    with frozen(predictor):
        clean = _predict(predictor, x, batch_size)
        for column, frac in enumerate(fracs):
            k = int(round(frac * voxels.size))
            changed = np.empty(x.shape, dtype=np.float32)
            for i in range(n):
                removed = np.zeros(int(np.prod(grid)), bool)
                removed[orders[i][:k]] = True
                changed[i, 0] = noisy_linear_imputation(
                    x[i, 0].numpy(), removed.reshape(grid), noise_sd=sd, rng=rngs[i]
                )
            pred = _predict(predictor, torch.from_numpy(changed), batch_size)
            out[:, column] = (pred - clean).abs().double().numpy()
    return out
