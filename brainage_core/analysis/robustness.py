"""Robustness of an attribution method: does a subject's map survive a small input change?"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from brainage_core._utils.torch import seeded, subject_seed
from brainage_core._utils.validation import check_fraction
from brainage_core.analysis.faithfulness import image_positions
from brainage_core.analysis.sanity import spearman_within


def map_stability(
    explainer: Any,
    images: Any,
    brain: Any = None,
    *,
    noise_fraction: float = 0.02,
    seed: int = 0,
) -> float:
    """Robustness: Spearman correlation of each image's map with its map under small noise.

    Gaussian noise of standard deviation ``noise_fraction`` times the images' intensity
    range is added inside ``brain``; the mean correlation over the images is returned
    (1 = the map does not move).
    """
    values = stability_per_image(explainer, images, brain, noise_fraction=noise_fraction,
                                 seed=seed)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def stability_per_image(
    explainer: Any,
    images: Any,
    brain: Any = None,
    *,
    noise_fraction: float = 0.02,
    intensity_range: float | None = None,
    seed: int = 0,
    positions: Any = None,
) -> np.ndarray:
    """Per-image correlations of :func:`map_stability`, shaped ``(N,)``.

    Image ``i``'s input noise is drawn from ``(seed, positions[i])`` alone, and its clean
    and noisy maps are made under :func:`~brainage_core._utils.torch.seeded`
    ``(seed, position, 0)`` and ``(seed, position, 1)`` (``positions``: the images' places
    in the whole compared set, default ``0..N-1``), so a shard of the images gives the
    values of the whole set. ``intensity_range`` (default: the range of ``images``) sets
    the noise's scale; give the whole set's when ``images`` is a shard of it.
    """
    check_fraction("noise_fraction", noise_fraction)
    x = torch.as_tensor(images, dtype=torch.float32)
    n = x.shape[0]
    positions = image_positions(positions, n)
    if n == 0:
        return np.zeros(0)
    if intensity_range is None:
        intensity_range = float(x.max() - x.min())
    sd = noise_fraction * float(intensity_range)
    mask = torch.ones(x.shape[2:]) if brain is None else torch.as_tensor(np.asarray(brain))
    values = []
    for i, p in enumerate(positions):
        gen = torch.Generator().manual_seed(subject_seed(seed, p))
        noisy = x[i : i + 1] + sd * torch.randn(x[i : i + 1].shape, generator=gen) * mask.float()
        with seeded(seed, p, 0):
            clean_map = explainer.attribute(x[i : i + 1])
        with seeded(seed, p, 1):
            noisy_map = explainer.attribute(noisy)
        values.append(spearman_within(clean_map[0], noisy_map[0], brain))
    return np.asarray(values, dtype=np.float64)
