"""Reference maps scored like attribution methods: the floor and the model-free ceiling.

* :class:`RandomMap`: uniform random importance inside the brain, new values at every
  call (the floor every method must beat);
* :class:`FixedMap`: the same given map for every image, for example the model-free
  ``|corr(intensity, age)|`` map (the ceiling that needs no model, see
  :func:`brainage_core.analysis.localisation.age_correlation_map`).

Both have the :class:`~brainage_core.explain.protocol.Explainer` surface, so every
metric treats them like the methods; neither looks at a model.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from brainage_core._utils.torch import as_mask
from brainage_core._utils.validation import BrainAgeInputError


def _batch(inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = torch.as_tensor(inputs)
    x = inputs[None] if inputs.ndim == 4 else inputs
    if x.ndim != 5 or x.shape[1] != 1:
        raise BrainAgeInputError(
            f"'inputs' must be shaped (N, 1, X, Y, Z); {tuple(inputs.shape)} was provided."
        )
    return inputs, x


class RandomMap:
    """Uniform random importance in [0, 1) inside the mask; fresh values at every call.

    Parameters
    ----------
    mask : array-like of bool or None, default=None
        Brain mask (None: everywhere).
    seed : int or None, default=0
        Seeds the sequence of maps. None draws from torch's global generator, so that the
        caller decides each map's draw (:func:`~brainage_core._utils.torch.seeded`: the
        comparison gives every subject its own, whichever process explains it).
    """

    def __init__(self, mask: Any = None, *, seed: int | None = 0) -> None:
        self.mask = mask
        self.generator = None if seed is None else torch.Generator().manual_seed(int(seed))

    def attribute(self, inputs: torch.Tensor, *, batch_size: int = 4) -> torch.Tensor:
        """Random maps shaped like ``inputs`` (zero outside the mask)."""
        inputs, x = _batch(inputs)
        out = torch.rand(x.shape, generator=self.generator)
        out = out * as_mask(self.mask, tuple(x.shape[2:]), out.device)
        return out.to(inputs.device).reshape(inputs.shape)


class FixedMap:
    """The same map for every image (a model-free reference).

    Parameters
    ----------
    importance : array-like of shape (X, Y, Z)
        The map.
    mask : array-like of bool or None, default=None
        Brain mask (None: everywhere).
    """

    def __init__(self, importance: Any, mask: Any = None) -> None:
        arr = np.asarray(importance, dtype=np.float32)
        if arr.ndim != 3 or not np.isfinite(arr).all():
            raise BrainAgeInputError(
                f"'importance' must be a finite 3-D map; shape {arr.shape} was provided."
            )
        self.importance = torch.from_numpy(arr.copy())
        self.mask = mask

    def attribute(self, inputs: torch.Tensor, *, batch_size: int = 4) -> torch.Tensor:
        """The map, repeated for each image of ``inputs`` (zero outside the mask)."""
        inputs, x = _batch(inputs)
        if tuple(x.shape[2:]) != tuple(self.importance.shape):
            raise BrainAgeInputError(
                f"'inputs' must be on the map's grid {tuple(self.importance.shape)}; "
                f"{tuple(x.shape[2:])} was provided."
            )
        out = self.importance[None, None].expand(x.shape).clone()
        out = out * as_mask(self.mask, tuple(x.shape[2:]), out.device)
        return out.to(inputs.device).reshape(inputs.shape)
