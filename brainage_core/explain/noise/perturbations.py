"""Perturbations of the noise model: how a noise level ``B`` changes an image.

Every perturbation maps an image ``x``, noise levels ``B`` in [0, 1] (one per voxel) and
the brain mask to a perturbed image ``x~``; voxels outside the mask are never changed,
and ``B = 0`` leaves a voxel as it is (up to ``s_min`` for the paper's form).

* ``additive`` (the paper's form, Bintsi et al., 2021; U-Noise, Koker et al., 2021):
  ``x~ = x + eps * (s_min + B * (s_max - s_min))``, ``eps ~ N(0, 1)``. It adds noise but
  removes little information: a brain-age CNN reads noisy brains as younger, so the map
  partly shows where the network is sensitive to noise.
* ``replace_mean``: ``x~ = x + B * (mu - x) + noise_sd * B * eps`` with ``mu`` the
  training-mean image. At ``B = 1`` the voxel holds the population's value: its
  subject-specific (age) information is gone, whatever the network's noise sensitivity.
* ``replace_blur``: the same toward a Gaussian-blurred copy of the subject itself (blurred
  inside the brain mask only), as in meaningful perturbations (Fong and Vedaldi, 2017).

With ``noise_sd = 0`` the replacements are deterministic. A new perturbation is one
function with the signature of :func:`additive` and one line in :data:`PERTURBATIONS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from brainage_core._utils.validation import BrainAgeInputError, check_choice, check_positive


@dataclass(frozen=True)
class PerturbationParams:
    """The numbers a perturbation may use (each perturbation reads the ones it needs).

    Attributes
    ----------
    s_min, s_max : float
        Noise standard deviation at ``B = 0`` and ``B = 1`` (``additive``).
    noise_sd : float
        Standard deviation of the extra noise at ``B = 1`` (replacements; 0: none, the
        perturbation is deterministic).
    blur_sigma : float
        Standard deviation, in voxels, of the Gaussian blur (``replace_blur``).
    """

    s_min: float = 0.0
    s_max: float = 0.3
    noise_sd: float = 0.0
    blur_sigma: float = 2.0


def perturb(
    x: torch.Tensor,
    b: torch.Tensor,
    mask: torch.Tensor,
    s_min: float,
    s_max: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The paper's perturbation with explicit ``s_min``, ``s_max`` (see :func:`additive`)."""
    return additive(x, b, mask, None, PerturbationParams(s_min=s_min, s_max=s_max), generator)


@dataclass(frozen=True)
class BatchShard:
    """A noise generator shared by the processes of a data-parallel job, with the rows of
    each global batch that this process holds.

    Every process draws the noise of the whole global batch from the same generator and
    keeps its own rows, so the noise an image receives does not depend on the number of
    processes: a job on N processes draws what one process would.

    Attributes
    ----------
    generator : torch.Generator
        The generator, seeded identically in every process.
    rank, world_size : int
        This process's rows are ``rank, rank + world_size, ...`` of each global batch (the
        order of :class:`~torch.utils.data.DistributedSampler`-style shards).
    """

    generator: torch.Generator
    rank: int
    world_size: int


def _noise(x: torch.Tensor, generator: torch.Generator | BatchShard | None) -> torch.Tensor:
    if isinstance(generator, BatchShard):
        rows = x.shape[0] * generator.world_size
        full = torch.randn((rows, *x.shape[1:]), generator=generator.generator,
                           device=x.device, dtype=x.dtype)
        return full[generator.rank :: generator.world_size]
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def additive(
    x: torch.Tensor,
    b: torch.Tensor,
    mask: torch.Tensor,
    reference: torch.Tensor | None,
    params: PerturbationParams,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The paper's perturbation: ``x + eps * (s_min + b * (s_max - s_min))`` inside ``mask``.

    Parameters
    ----------
    x, b : torch.Tensor of shape (N, 1, X, Y, Z)
        Images and noise levels in [0, 1].
    mask : torch.Tensor of shape (1, 1, X, Y, Z)
        1 inside the brain, 0 outside (nothing changes there).
    reference : torch.Tensor or None
        Unused (the replacement perturbations take their reference image here).
    params : PerturbationParams
        ``s_min`` and ``s_max``.
    generator : torch.Generator or None, default=None
        Source of ``eps``.
    """
    sigma = params.s_min + b * (params.s_max - params.s_min)
    return x + _noise(x, generator) * sigma * mask


def _replace(
    x: torch.Tensor,
    b: torch.Tensor,
    mask: torch.Tensor,
    reference: torch.Tensor,
    params: PerturbationParams,
    generator: torch.Generator | None,
) -> torch.Tensor:
    out = x + b * (reference - x) * mask
    if params.noise_sd > 0:
        out = out + _noise(x, generator) * (params.noise_sd * b) * mask
    return out


def replace_mean(
    x: torch.Tensor,
    b: torch.Tensor,
    mask: torch.Tensor,
    reference: torch.Tensor | None,
    params: PerturbationParams,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Move each voxel toward the training-mean image: ``x + b * (mu - x)`` (+ small noise).

    ``reference`` is the mean image ``mu``, shaped ``(1, 1, X, Y, Z)`` or like ``x``.
    """
    if reference is None:
        raise BrainAgeInputError(
            "perturbation 'replace_mean' needs the training-mean image as its reference."
        )
    return _replace(x, b, mask, reference, params, generator)


def replace_blur(
    x: torch.Tensor,
    b: torch.Tensor,
    mask: torch.Tensor,
    reference: torch.Tensor | None,
    params: PerturbationParams,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Move each voxel toward a blurred copy of the subject (``reference`` is ignored)."""
    return _replace(x, b, mask, blur_in_mask(x, mask, params.blur_sigma), params, generator)


#: name -> perturbation function ``(x, b, mask, reference, params, generator) -> x~``.
PERTURBATIONS: dict[str, Callable[..., torch.Tensor]] = {
    "additive": additive,
    "replace_mean": replace_mean,
    "replace_blur": replace_blur,
}

#: Perturbations whose reference image is the training mean (it must be computed first).
NEEDS_MEAN_IMAGE = frozenset({"replace_mean"})


def get_perturbation(name: str) -> Callable[..., torch.Tensor]:
    """The registered perturbation ``name`` (a clear error naming the choices otherwise)."""
    return PERTURBATIONS[check_choice("perturbation", name, tuple(PERTURBATIONS))]


def blur_in_mask(x: torch.Tensor, mask: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of ``x`` restricted to ``mask`` (normalised convolution).

    Background voxels do not leak into the brain: the result is ``G * (x m) / G * m``
    inside the mask and 0 outside.

    Parameters
    ----------
    x : torch.Tensor of shape (N, 1, X, Y, Z)
    mask : torch.Tensor of shape (1, 1, X, Y, Z)
    sigma : float
        Standard deviation of the Gaussian, in voxels.
    """
    check_positive("blur_sigma", sigma)
    radius = max(1, int(round(3 * sigma)))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()

    def smooth(v: torch.Tensor) -> torch.Tensor:
        for axis in range(3):
            shape = [1, 1, 1, 1, 1]
            shape[2 + axis] = kernel.numel()
            pad = [0, 0, 0, 0, 0, 0]
            pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
            v = F.conv3d(F.pad(v, pad), kernel.reshape(shape))
        return v

    m = mask.to(x.dtype).expand(x.shape[0], 1, *x.shape[2:])
    num = smooth(x * m)
    den = smooth(m)
    return torch.where(m > 0, num / den.clamp_min(1e-6), torch.zeros_like(x))


def mean_image(dataset: torch.utils.data.Dataset, *, batch_size: int = 16) -> torch.Tensor:
    """Voxel-wise mean of a dataset's images, shaped ``(1, 1, X, Y, Z)``.

    Parameters
    ----------
    dataset : Dataset
        Items ``(x, age)`` with ``x`` shaped ``(1, X, Y, Z)`` (or bare images).
    batch_size : int, default=16
        Images read at a time.
    """
    total: torch.Tensor | None = None
    count = 0
    for batch in torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False):
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        x = x.float()
        total = x.sum(0, keepdim=True) if total is None else total + x.sum(0, keepdim=True)
        count += x.shape[0]
    if total is None:
        raise BrainAgeInputError("the mean image needs at least one image; the dataset is empty.")
    return total / count
