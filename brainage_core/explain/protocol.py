"""What every explainer offers: an importance map shaped like its inputs."""

from __future__ import annotations

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
