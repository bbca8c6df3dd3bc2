"""The classical baseline the CNN is judged against: ridge regression on voxels.

Each image is block-averaged by an integer factor (4 mm -> 8 mm by default), the voxels
inside the brain mask become features, and a standardised ridge regression
(:class:`sklearn.linear_model.RidgeCV`, penalty chosen by efficient leave-one-out on the
training subjects) predicts age. It is fitted on the same training split as the CNN and
evaluated on the same test split. Images are read from the cache in chunks, so the full
cohort is never held in memory at full resolution.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.linear_model import RidgeCV
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from brainage_core._utils.validation import BrainAgeInputError, check_positive
from brainage_core.data.protocol import Cohort

#: Ridge penalties searched by default.
DEFAULT_ALPHAS = tuple(float(a) for a in np.logspace(-2, 6, 17))

#: Subjects read from the cache at a time.
CHUNK = 64


def downsample(volumes: np.ndarray, factor: int) -> np.ndarray:
    """Block-average volumes ``(..., X, Y, Z)`` by ``factor`` along each grid axis.

    The grid is zero-padded up to a multiple of ``factor``.

    Parameters
    ----------
    volumes : numpy.ndarray
        One volume ``(X, Y, Z)`` or a stack ``(N, X, Y, Z)``.
    factor : int
        Block size in voxels (1 returns a float32 copy).

    Returns
    -------
    numpy.ndarray of float32
        Shape ``(..., ceil(X / factor), ceil(Y / factor), ceil(Z / factor))``.
    """
    check_positive("downsample", factor, integer=True)
    v = np.asarray(volumes, dtype=np.float32)
    lead, grid = v.shape[:-3], v.shape[-3:]
    padded = [-(-s // factor) * factor for s in grid]
    if list(grid) != padded:
        pad = [(0, 0)] * len(lead) + [(0, p - s) for s, p in zip(grid, padded, strict=True)]
        v = np.pad(v, pad)
    shape = [*lead]
    for p in padded:
        shape += [p // factor, factor]
    v = v.reshape(shape)
    k = len(lead)
    return v.mean(axis=(k + 1, k + 3, k + 5))


@dataclass
class RidgeBaseline:
    """A fitted ridge baseline.

    Attributes
    ----------
    factor : int
        Downsampling factor of the features.
    feature_mask : numpy.ndarray of bool
        Voxels of the downsampled grid used as features.
    model : sklearn.pipeline.Pipeline
        ``StandardScaler`` followed by ``RidgeCV``.
    """

    factor: int
    feature_mask: np.ndarray
    model: Pipeline

    @property
    def alpha(self) -> float:
        """The ridge penalty chosen by leave-one-out."""
        return float(self.model[-1].alpha_)

    def features(self, cohort: Cohort, indices: np.ndarray) -> np.ndarray:
        """Feature matrix ``(len(indices), n_features)`` of cohort subjects."""
        return _features(cohort, indices, self.factor, self.feature_mask)

    def predict(self, cohort: Cohort, indices: Any = None) -> np.ndarray:
        """Predicted ages of cohort subjects (all of them, in cache order, by default)."""
        idx = np.arange(len(cohort.table)) if indices is None else np.asarray(indices)
        return self.model.predict(self.features(cohort, idx)).astype(np.float64)


def fit_ridge_baseline(
    cohort: Cohort,
    *,
    factor: int = 2,
    alphas: Any = DEFAULT_ALPHAS,
    split: str = "train",
) -> RidgeBaseline:
    """Fit the ridge baseline on one split of a cohort.

    Parameters
    ----------
    cohort : PreparedCohort
        The cohort (``images``, ``mask``, ``table`` with ``age`` and ``split``).
    factor : int, default=2
        Downsampling factor of the voxels.
    alphas : sequence of float, default=DEFAULT_ALPHAS
        Ridge penalties tried by leave-one-out cross-validation.
    split : str, default="train"
        Split to fit on.

    Returns
    -------
    RidgeBaseline
    """
    check_positive("factor", factor, integer=True)
    idx = np.flatnonzero(cohort.table["split"].to_numpy() == split)
    if idx.size < 3:
        raise BrainAgeInputError(
            f"the ridge baseline needs at least 3 subjects in split {split!r}; "
            f"{idx.size} were provided."
        )
    mask = getattr(cohort, "mask", None)
    if mask is None:
        mask = np.ones(cohort.images.shape[1:], dtype=bool)
    feature_mask = downsample(np.asarray(mask, dtype=np.float32), factor) > 0
    x = _features(cohort, idx, factor, feature_mask)
    y = cohort.table["age"].to_numpy(dtype=float)[idx]
    model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.asarray(alphas, dtype=float)))
    model.fit(x, y)
    return RidgeBaseline(factor=factor, feature_mask=feature_mask, model=model)


def _features(cohort: Cohort, indices: np.ndarray, factor: int, feature_mask: np.ndarray
              ) -> np.ndarray:
    out = np.empty((len(indices), int(feature_mask.sum())), dtype=np.float32)
    order = np.argsort(indices)  # read the memmap front to back
    sorted_idx = np.asarray(indices)[order]
    for start in range(0, len(sorted_idx), CHUNK):
        chunk = sorted_idx[start:start + CHUNK]
        small = downsample(np.asarray(cohort.images[chunk], dtype=np.float32), factor)
        out[order[start:start + CHUNK]] = small[:, feature_mask]
    return out
