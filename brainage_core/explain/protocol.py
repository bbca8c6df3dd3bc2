"""What every explainer offers: an importance map shaped like its inputs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Explainer(Protocol):
    """The importance-map surface shared by captum's methods and the noise maps.

    Built around a trained predictor (captum's convention), an explainer returns for
    images shaped ``(N, 1, X, Y, Z)`` a detached importance tensor of the same shape,
    zero outside the brain mask. A larger value means a more important voxel.
    """

    def attribute(self, inputs: torch.Tensor, *, batch_size: int = 4) -> torch.Tensor:
        """Importance maps shaped like ``inputs``."""
        ...


def attribute_each(explainer: Explainer, images: torch.Tensor, positions: Sequence[int],
                   *key: int) -> torch.Tensor:
    """Each image's map made alone, with torch's generators seeded from ``(*key, position)``.

    ``positions`` are the images' places in the whole set being explained. Random methods
    (SmoothGrad, GradientShap, an unseeded random map) then give an image the same map
    whichever process of a sharded job explains it, and whatever it explained before.
    Returns maps shaped like ``images`` (on the CPU; an empty batch for no images).
    """
    from brainage_core._utils.torch import seeded

    maps = []
    for i, position in enumerate(positions):
        with seeded(*key, int(position)):
            maps.append(explainer.attribute(images[i : i + 1]).detach().cpu())
    return torch.cat(maps) if maps else torch.zeros_like(images, device="cpu")
