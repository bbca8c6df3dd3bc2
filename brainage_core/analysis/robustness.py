"""Robustness of an attribution method: does a subject's map survive a small input change?"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from brainage_core._utils.validation import check_fraction
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
    check_fraction("noise_fraction", noise_fraction)
    x = torch.as_tensor(images, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    sd = noise_fraction * float(x.max() - x.min())
    mask = torch.ones(x.shape[2:]) if brain is None else torch.as_tensor(np.asarray(brain))
    noisy = x + sd * torch.randn(x.shape, generator=gen) * mask.float()
    clean_maps = explainer.attribute(x)
    noisy_maps = explainer.attribute(noisy)
    values = [spearman_within(clean_maps[i], noisy_maps[i], brain) for i in range(len(x))]
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
