"""How the noise model perturbs an image, given its noise map B."""

from __future__ import annotations

import torch


def perturb(
    x: torch.Tensor,
    b: torch.Tensor,
    mask: torch.Tensor,
    s_min: float,
    s_max: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Return ``x + eps * (s_min + b * (s_max - s_min))`` inside ``mask``.

    Parameters
    ----------
    x, b : torch.Tensor of shape (N, 1, X, Y, Z)
        Images and noise levels in [0, 1].
    mask : torch.Tensor of shape (1, 1, X, Y, Z)
        1 inside the brain, 0 outside (no noise there).
    s_min, s_max : float
        Noise standard deviation at ``b = 0`` and ``b = 1``, in image intensity units.
    generator : torch.Generator or None, default=None
        Source of ``eps`` (seeded for reproducible noise).
    """
    eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x + eps * (s_min + b * (s_max - s_min)) * mask
