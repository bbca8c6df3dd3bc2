"""The noise model's objective, shared by the amortised and the per-subject modes."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from brainage_core._utils.docs import fill_doc
from brainage_core._utils.torch import as_mask, model_device, predict_batch
from brainage_core._utils.validation import (
    BrainAgeInputError,
)
from brainage_core.explain.noise.perturbations import (
    PerturbationParams,
    get_perturbation,
    mean_image,
)
from brainage_core.explain.noise.settings import NoiseSettings, resolve_settings


def task_loss(diff: torch.Tensor, loss: str) -> torch.Tensor:
    """``|diff|`` ("l1") or ``diff**2`` ("l2"), element-wise."""
    return diff.abs() if loss == "l1" else diff.square()


def as_dataset(data: Any, name: str = "data") -> Dataset:
    """Accept a dataset of ``(x, age)`` items, a tensor of images or a pair of tensors.

    Parameters
    ----------
    data : Dataset or torch.Tensor or tuple of (torch.Tensor, torch.Tensor)
        A dataset whose items are ``(x, age)`` with ``x`` shaped ``(1, X, Y, Z)``
        (for example :class:`brainage_core.data.datasets.CohortDataset`), images shaped
        ``(N, 1, X, Y, Z)`` (ages then unknown: NaN), or ``(images, ages)``.
    name : str, default="data"
        Parameter name used in error messages.
    """
    if isinstance(data, Dataset):
        return data
    if torch.is_tensor(data) or isinstance(data, np.ndarray):
        x = torch.as_tensor(data, dtype=torch.float32)
        ages = torch.full((x.shape[0],), float("nan"))
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        x = torch.as_tensor(data[0], dtype=torch.float32)
        ages = torch.as_tensor(data[1], dtype=torch.float32).reshape(-1)
    else:
        raise BrainAgeInputError(
            f"'{name}' must be a Dataset of (image, age) items, an image tensor "
            f"(N, 1, X, Y, Z) or a pair (images, ages); {type(data).__name__} was provided."
        )
    if x.ndim != 5 or x.shape[1] != 1:
        raise BrainAgeInputError(
            f"'{name}' images must be shaped (N, 1, X, Y, Z); {tuple(x.shape)} was provided."
        )
    if ages.shape[0] != x.shape[0]:
        raise BrainAgeInputError(f"'{name}' has {x.shape[0]} images but {ages.shape[0]} ages.")
    return TensorDataset(x, ages)


def split_item(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, (tuple, list)):
        x, ages = batch[0], batch[1]
    else:
        x, ages = batch, torch.full((batch.shape[0],), float("nan"))
    return x.float(), torch.as_tensor(ages, dtype=torch.float32).reshape(-1)


def epoch_generator(seed: int, epoch: int, stream: int, device: torch.device) -> torch.Generator:
    """A generator seeded by (seed, epoch, stream): epochs replay exactly after a resume."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(np.random.SeedSequence([seed, epoch, stream]).generate_state(1)[0]))
    return gen


@fill_doc
class NoiseObjective:
    """The U-Noise objective shared by the amortised and the per-subject explainers.

    Parameters
    ----------
    %(predictor)s
    settings : NoiseSettings or None, default=None
        The objective (lambda, noise scale, target, seed). None builds it from the keyword
        arguments ``**noise`` (``lam=``, ``s_min=``, ``s_max=``, ``target=``, ``seed=``),
        or takes the defaults.
    %(mask)s
    reference : array-like or None, default=None
        The training-mean image (shaped like one image). "replace_mean" moves voxels
        toward it; the other perturbations keep it as the reference of deletion and
        insertion curves. None: computed from the training data by
        :meth:`set_reference` (the amortised model's ``fit`` does it).
    """

    def __init__(
        self,
        predictor: nn.Module,
        settings: NoiseSettings | None = None,
        *,
        mask: Any = None,
        reference: Any = None,
        **noise: Any,
    ) -> None:
        if not isinstance(predictor, nn.Module):
            raise BrainAgeInputError(
                f"'predictor' must be a torch.nn.Module; {type(predictor).__name__} was provided."
            )
        self.predictor = predictor
        self.noise = resolve_settings(settings, noise)
        self._perturb = get_perturbation(self.noise.perturbation)
        self.params = PerturbationParams(
            s_min=self.noise.s_min,
            s_max=self.noise.s_max,
            noise_sd=self.noise.noise_sd,
            blur_sigma=self.noise.blur_sigma,
        )
        self.device = model_device(predictor)
        self._mask_input = mask
        self._mask: torch.Tensor | None = None
        self.reference: torch.Tensor | None = (
            None
            if reference is None
            else torch.as_tensor(reference, dtype=torch.float32)
            .reshape(1, 1, *np.shape(reference)[-3:])
            .to(self.device)
        )

    def set_reference(self, data: Any) -> None:
        """Compute the training-mean image from ``data`` (unless one is set)."""
        if self.reference is None:
            self.reference = mean_image(as_dataset(data)).to(self.device)

    def perturb(
        self, x: torch.Tensor, b: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Apply the settings' perturbation with noise levels ``b`` inside the brain."""
        mask = self._brain_mask(tuple(x.shape[2:]))
        return self._perturb(x, b, mask, self.reference, self.params, generator)

    def reference_image(self, x: torch.Tensor) -> torch.Tensor:
        """What ``B = 1`` moves ``x`` toward (noise-free; ``x`` itself for additive noise).

        Deletion and insertion curves replace voxels by this image.
        """
        mask = self._brain_mask(tuple(x.shape[2:]))
        if self.noise.perturbation == "additive":
            return x
        params = PerturbationParams(noise_sd=0.0, blur_sigma=self.noise.blur_sigma)
        return self._perturb(x, torch.ones_like(x), mask, self.reference, params, None)

    def _brain_mask(self, shape: tuple[int, ...]) -> torch.Tensor:
        if self._mask is None or tuple(self._mask.shape[2:]) != tuple(shape):
            self._mask = as_mask(self._mask_input, shape, self.device)
        return self._mask

    def _targets(self, x: torch.Tensor, ages: torch.Tensor) -> torch.Tensor:
        if self.noise.target == "prediction":
            with torch.no_grad():
                return predict_batch(self.predictor, x)
        if torch.isnan(ages).any():
            raise BrainAgeInputError(
                "target='age' needs the true age of every image; some ages are missing "
                "(pass (images, ages) or a dataset of (image, age) items)."
            )
        return ages.to(x.device)

    def _loss(
        self,
        x: torch.Tensor,
        logits: torch.Tensor,
        targets: torch.Tensor,
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-image task loss, per-image regulariser and B; summed by the caller."""
        mask = self._brain_mask(tuple(x.shape[2:]))
        b = torch.sigmoid(logits)
        x_noisy = self.perturb(x, b, generator)
        task = task_loss(predict_batch(self.predictor, x_noisy) - targets, self.noise.loss)
        log_b = F.logsigmoid(logits)
        reg = -(log_b * mask).flatten(1).sum(1) / mask.sum()
        return task, reg, b

    def _importance(self, b: torch.Tensor) -> torch.Tensor:
        return (1.0 - b) * self._brain_mask(tuple(b.shape[2:]))


def check_inputs(inputs: torch.Tensor) -> torch.Tensor:
    """Return ``inputs`` as a float tensor shaped ``(N, 1, X, Y, Z)``."""
    x = torch.as_tensor(inputs)
    if x.ndim == 4:
        x = x[None]
    if x.ndim != 5 or x.shape[1] != 1:
        raise BrainAgeInputError(
            f"'inputs' must be shaped (N, 1, X, Y, Z); {tuple(x.shape)} was provided."
        )
    return x.float()
