"""The classical baseline the CNN is judged against: ridge regression on voxels.

Each image is block-averaged by an integer factor (4 mm -> 8 mm by default), the voxels
inside the brain mask become features, and a standardised ridge regression (penalty
chosen by efficient leave-one-out on the training subjects) predicts age. It is fitted on
the same training split as the CNN and evaluated on the same test split. Images are read
from the cache in chunks, so the full cohort is never held in memory at full resolution.

Two solvers compute the same fit (:data:`RIDGE_SOLVERS`):

``"sklearn"``
    :class:`~sklearn.preprocessing.StandardScaler` and :class:`~sklearn.linear_model.RidgeCV`
    in float64 on the CPU (the reference, and the CPU default).
``"torch"``
    :func:`fit_torch_ridge` on the model's device: the features stream to the device in
    float32 blocks of voxels, are standardised there and multiplied in float64 into the
    Gram matrix of the subjects (dual form, when there are fewer subjects than voxels, as
    at 2 mm and 1 mm) or the covariance of the voxels (primal form), whose
    eigendecomposition gives the leave-one-out error of every penalty at once, as
    RidgeCV does. With float32 products the near-tied errors of small penalties (a
    nearly interpolating fit) were off by 1e-5 relative and picked another penalty than
    RidgeCV; in float64 they agree within 1e-6. At 1 mm (~10,000 training subjects,
    ~250,000 voxels at factor 2) the sklearn path holds the features in float64 on the
    CPU (about 20 GB, plus the scaled copy); the torch path holds the 10,000 x 10,000
    Gram matrix (0.8 GB) and one block of voxels on the GPU.

``solver="auto"`` uses torch on a CUDA device and scikit-learn elsewhere: on 2 busy CPU
cores torch took 1.0-1.5x scikit-learn's time (700 x 4,000 and 2,000 x 30,000 features,
``python -m brainage_core.bench.ridge``), so scikit-learn stays the CPU default. Not yet
timed on a GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import RidgeCV
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from brainage_core._utils.validation import BrainAgeInputError, check_choice, check_positive
from brainage_core.data.protocol import Cohort

#: Ridge penalties searched by default.
DEFAULT_ALPHAS = tuple(float(a) for a in np.logspace(-2, 6, 17))

#: Subjects read from the cache at a time.
CHUNK = 64

#: Ridge solvers: "auto" (torch on CUDA, else scikit-learn), "sklearn", "torch".
RIDGE_SOLVERS = ("auto", "sklearn", "torch")

#: Feature values per block streamed to the device by the torch solver (float32: 1 GB).
TORCH_BLOCK_VALUES = 1 << 28


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
    model : sklearn.pipeline.Pipeline or TorchRidge
        ``StandardScaler`` followed by ``RidgeCV`` (solver "sklearn"), or the torch fit.
    """

    factor: int
    feature_mask: np.ndarray
    model: Pipeline | TorchRidge

    @property
    def alpha(self) -> float:
        """The ridge penalty chosen by leave-one-out."""
        if isinstance(self.model, TorchRidge):
            return self.model.alpha_
        return float(self.model[-1].alpha_)

    def features(self, cohort: Cohort, indices: np.ndarray) -> np.ndarray:
        """Feature matrix ``(len(indices), n_features)`` of cohort subjects."""
        return _features(cohort, indices, self.factor, self.feature_mask)

    def predict(self, cohort: Cohort, indices: Any = None) -> np.ndarray:
        """Predicted ages of cohort subjects (all of them, in cache order, by default)."""
        idx = np.arange(len(cohort.table)) if indices is None else np.asarray(indices)
        # In blocks of CHUNK subjects: the features of a whole 1 mm cohort (and their
        # float64 standardised copy) would not fit in memory.
        out = np.empty(len(idx), dtype=np.float64)
        for start in range(0, len(idx), CHUNK):
            block = idx[start:start + CHUNK]
            out[start:start + CHUNK] = self.model.predict(self.features(cohort, block))
        return out


def fit_ridge_baseline(
    cohort: Cohort,
    *,
    factor: int = 2,
    alphas: Any = DEFAULT_ALPHAS,
    split: str = "train",
    solver: str = "auto",
    device: str | torch.device | None = None,
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
    solver : {"auto", "sklearn", "torch"}, default="auto"
        See the module docstring; "auto" is "torch" when ``device`` is a CUDA device.
    device : str or torch.device or None, default=None
        Where the torch solver computes (None: the CPU); pass the predictor's device.

    Returns
    -------
    RidgeBaseline
    """
    check_positive("factor", factor, integer=True)
    check_choice("solver", solver, RIDGE_SOLVERS)
    device = torch.device("cpu" if device is None else device)
    if solver == "auto":
        solver = "torch" if device.type == "cuda" else "sklearn"
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
    if solver == "torch":
        return RidgeBaseline(factor=factor, feature_mask=feature_mask,
                             model=fit_torch_ridge(x, y, alphas, device=device))
    model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.asarray(alphas, dtype=float)))
    model.fit(x, y)
    return RidgeBaseline(factor=factor, feature_mask=feature_mask, model=model)


@dataclass
class TorchRidge:
    """A standardised ridge regression fitted by :func:`fit_torch_ridge`.

    Attributes
    ----------
    mean, scale : numpy.ndarray of float64, shape (n_features,)
        Standardisation of the features (``scale`` 1 for constant features, as
        :class:`~sklearn.preprocessing.StandardScaler`).
    coef : numpy.ndarray of float64, shape (n_features,)
        Weights of the standardised features.
    intercept : float
        The mean training age.
    alpha_ : float
        The penalty chosen by leave-one-out.
    form : {"dual", "primal"}
        Which matrix was decomposed: the subjects' Gram matrix or the voxels' covariance.
    loo_mse : numpy.ndarray of float64
        Mean squared leave-one-out error of each penalty tried, in their order.
    """

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float
    alpha_: float
    form: str
    loo_mse: np.ndarray

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Predicted ages of a feature matrix ``(n, n_features)``."""
        z = (np.asarray(x, dtype=np.float64) - self.mean) / self.scale
        return z @ self.coef + self.intercept


def fit_torch_ridge(
    x: np.ndarray,
    y: np.ndarray,
    alphas: Any = DEFAULT_ALPHAS,
    *,
    device: str | torch.device = "cpu",
) -> TorchRidge:
    """Standardised ridge regression with the penalty chosen by exact leave-one-out.

    What :class:`~sklearn.preprocessing.StandardScaler` + :class:`~sklearn.linear_model.RidgeCV`
    compute, in torch on ``device``. With ``H`` the hat matrix (the intercept is not
    penalised), the leave-one-out residual of subject ``i`` is
    ``(y_i - yhat_i) / (1 - H_ii)``; one eigendecomposition gives ``yhat`` and
    ``diag(H)`` for every penalty. The dual form decomposes the subjects' Gram matrix
    ``Z Z^T`` (n x n), the primal form the voxels' covariance ``Z^T Z``
    (p x p), whichever is smaller. The features travel in float32 blocks of
    :data:`TORCH_BLOCK_VALUES` values; the products, the decomposition and what follows
    run in float64. The penalty with the smallest mean squared leave-one-out error wins
    (the first one on a tie), as in RidgeCV.

    Parameters
    ----------
    x : numpy.ndarray of shape (n, p)
        Features of the training subjects.
    y : numpy.ndarray of shape (n,)
        Their ages.
    alphas : sequence of float, default=DEFAULT_ALPHAS
        Penalties tried.
    device : str or torch.device, default="cpu"
        Where to compute.

    Returns
    -------
    TorchRidge
    """
    x = np.asarray(x, dtype=np.float32)
    n, p = x.shape
    dev = torch.device(device)
    f64 = torch.float64
    alphas = [float(a) for a in np.asarray(alphas, dtype=float).reshape(-1)]
    for a in alphas:
        check_positive("alphas", a)
    y_mean = float(np.mean(y))
    yc = torch.as_tensor(np.asarray(y, dtype=np.float64) - y_mean, device=dev)
    width = max(1, TORCH_BLOCK_VALUES // max(n, 1))
    blocks = [slice(start, min(start + width, p)) for start in range(0, p, width)]
    mean = np.empty(p)
    scale = np.empty(p)

    def standardised(cols: slice) -> torch.Tensor:
        """Standardised block in float64, centred again after the float32 arithmetic."""
        block = torch.from_numpy(np.ascontiguousarray(x[:, cols])).to(dev)
        z = ((block - torch.from_numpy(mean[cols]).to(dev, torch.float32))
             / torch.from_numpy(scale[cols]).to(dev, torch.float32)).to(f64)
        return z - z.mean(0, keepdim=True)

    for cols in blocks:  # the scaler's statistics, accumulated in float64
        block = torch.from_numpy(np.ascontiguousarray(x[:, cols])).to(dev, f64)
        m = block.mean(0)
        var = ((block - m) ** 2).mean(0)
        eps = float(np.finfo(np.float64).eps)
        constant = var <= n * eps * var + (n * m * eps) ** 2
        mean[cols] = m.cpu().numpy()
        scale[cols] = torch.where(constant, torch.ones_like(var), var.sqrt()).cpu().numpy()
    dual = n <= p
    if dual:
        gram = torch.zeros((n, n), dtype=f64, device=dev)
        for cols in blocks:
            z = standardised(cols)
            gram += z @ z.T
        # The constant vector is an eigenvector (centred features): the unpenalised
        # intercept's direction, already in the 1/n of the leverage, so it is dropped
        # below. Adding 1 to every entry moves its eigenvalue from 0 to n, as RidgeCV does;
        # left at 0 it made LAPACK's eigh 4-100x slower on the CPU (denormal numbers).
        gram += 1.0
        w, q = torch.linalg.eigh(gram)
        del gram
        intercept_dim = int(torch.argmax((q.sum(0) / math.sqrt(n)).abs()))
        proj = q.T @ yc  # the centred ages in the eigenbasis
        proj[intercept_dim] = 0.0
        q2 = q**2
    else:
        z = standardised(slice(None))
        w, v = torch.linalg.eigh(z.T @ z)
        a = z @ v  # n x p: Z in the eigenbasis of its covariance
        proj = a.T @ yc
        a2 = a**2
    w = w.clamp(min=0.0)
    errors = []
    for alpha in alphas:
        if dual:
            shrink = w / (w + alpha)
            shrink[intercept_dim] = 0.0
            fitted = q @ (shrink * proj)
            leverage = q2 @ shrink
        else:
            inverse = 1.0 / (w + alpha)
            fitted = a @ (inverse * proj)
            leverage = a2 @ inverse
        loo = (yc - fitted) / (1.0 - 1.0 / n - leverage)
        errors.append(float((loo**2).mean()))
    alpha = alphas[int(np.argmin(errors))]  # the first of equal errors, as RidgeCV
    coef = torch.zeros(p, dtype=f64, device=dev)
    if dual:  # coef = Z^T (K + alpha I)^-1 yc, block by block
        dual_coef = q @ (proj / (w + alpha))
        for cols in blocks:
            coef[cols] = standardised(cols).T @ dual_coef
    else:
        coef = v @ (proj / (w + alpha))
    return TorchRidge(mean=mean, scale=scale, coef=coef.cpu().numpy(), intercept=y_mean,
                      alpha_=alpha, form="dual" if dual else "primal",
                      loo_mse=np.asarray(errors))


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
