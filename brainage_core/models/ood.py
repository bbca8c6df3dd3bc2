"""Out-of-distribution score: how unlike the training images a new image looks to the model.

The predictor's penultimate features (the input of its output layer) of the training
subjects are the reference. A new image's score is its mean Euclidean distance to its
:data:`K_NEIGHBOURS` nearest training subjects in those features (each feature
standardised on the training subjects), divided by the median score of the validation
subjects. So a score of 1 is a typical held-out subject of the training cohort.

The threshold is calibrated on the validation split: its 99th percentile times
:data:`OOD_MARGIN` (documented default 1.5). A score above it means the model has not seen
anything like the image, whatever the image QC measures say.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from brainage_core._utils.validation import BrainAgeInputError

#: Neighbours averaged in the kNN distance.
K_NEIGHBOURS = 5

#: The threshold is the validation split's 99th percentile of the score times this margin.
OOD_MARGIN = 1.5

#: Percentile of the validation scores the threshold starts from.
OOD_PERCENTILE = 99.0


@torch.no_grad()
def predict_with_features(model: nn.Module, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Predicted ages and penultimate features (the output layer's input) of a batch.

    Parameters
    ----------
    model : torch.nn.Module
        A predictor with an ``output`` layer (every architecture of the registry has one).
    x : torch.Tensor of shape (N, 1, X, Y, Z)
        Input images.

    Returns
    -------
    ages : numpy.ndarray of shape (N,)
    features : numpy.ndarray of shape (N, F)
    """
    layer = getattr(model, "output", None)
    if not isinstance(layer, nn.Module):
        raise BrainAgeInputError(
            f"the predictor {type(model).__name__} has no 'output' layer to read features from"
        )
    seen: list[torch.Tensor] = []
    handle = layer.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    was_training = model.training
    model.eval()
    try:
        ages = model(x).float().cpu().numpy().astype(np.float64)
    finally:
        handle.remove()
        model.train(was_training)
    return ages, torch.flatten(seen[-1], 1).float().cpu().numpy()


@dataclass
class FeatureOOD:
    """kNN distance in standardised penultimate features (see the module docstring).

    Attributes
    ----------
    train : numpy.ndarray of shape (n_train, F)
        Standardised training features.
    mean, std : numpy.ndarray of shape (F,)
        The standardisation.
    scale : float
        Median raw kNN distance of the validation subjects (scores are divided by it).
    threshold : float
        Calibrated limit of the score.
    """

    train: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    scale: float
    threshold: float

    @classmethod
    def fit(cls, train: np.ndarray, val: np.ndarray) -> FeatureOOD:
        """Calibrate on training features (the reference) and validation features."""
        train = np.asarray(train, dtype=np.float64)
        val = np.asarray(val, dtype=np.float64)
        if len(train) < 2 or len(val) < 1:
            raise BrainAgeInputError(
                f"the OOD score needs at least 2 training and 1 validation subjects; "
                f"{len(train)} and {len(val)} were provided."
            )
        mean = train.mean(axis=0)
        std = train.std(axis=0)
        std = np.where(std > 1e-8, std, 1.0)
        z = (train - mean) / std
        model = cls(train=z, mean=mean, std=std, scale=1.0, threshold=np.inf)
        raw = model.score(val)
        model.scale = float(np.median(raw)) if np.median(raw) > 0 else 1.0
        scores = raw / model.scale
        model.threshold = float(np.percentile(scores, OOD_PERCENTILE) * OOD_MARGIN)
        return model

    def score(self, features: np.ndarray) -> np.ndarray:
        """Scores of new subjects (1 = a typical validation subject)."""
        z = (np.atleast_2d(np.asarray(features, dtype=np.float64)) - self.mean) / self.std
        d = np.sqrt(((z[:, None, :] - self.train[None, :, :]) ** 2).sum(-1))
        k = min(K_NEIGHBOURS, self.train.shape[0])
        nearest = np.sort(d, axis=1)[:, :k]
        return nearest.mean(axis=1) / self.scale

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Arrays to store (``np.savez``)."""
        return {"ood_train": self.train, "ood_mean": self.mean, "ood_std": self.std,
                "ood_scale": np.float64(self.scale), "ood_threshold": np.float64(self.threshold)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> FeatureOOD:
        """Rebuild from :meth:`to_arrays`."""
        return cls(train=np.asarray(arrays["ood_train"]), mean=np.asarray(arrays["ood_mean"]),
                   std=np.asarray(arrays["ood_std"]), scale=float(arrays["ood_scale"]),
                   threshold=float(arrays["ood_threshold"]))
