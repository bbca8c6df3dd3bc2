"""Noise-model importance maps: U-Noise adapted to brain-age regression.

The trained predictor ``f`` is frozen. A 3D U-Net ``g`` looks at an image ``x`` and
outputs ``B = sigmoid(g(x))`` in (0, 1), one value per voxel. Inside the brain mask the
image is perturbed as

    x~ = x + eps * (s_min + B * (s_max - s_min)),   eps ~ N(0, 1),

and ``g`` minimises ``|f(x~) - target| - lambda * mean_brain(log B)``. The second term
pushes the noise up everywhere; the first keeps the prediction intact, so noise stays
low only where ``f`` needs the voxels. The importance map is ``1 - B`` (zero outside the
brain mask, where no noise is applied and ``B`` is unconstrained).

Two ways to obtain maps share this objective:

* :class:`NoiseMapExplainer` trains ``g`` once on a training set (amortised); a map then
  costs one forward pass of ``g``.
* :class:`PerSubjectNoiseMap` optimises the logits of ``B`` directly for each image, the
  way meaningful perturbations (Fong and Vedaldi, 2017) do: slower, no training set.

**The target.** ``target="prediction"`` (the default) uses ``f``'s own prediction on the
clean image: the map then explains what *the model* uses, and noise that happens to
move a wrong prediction towards the true age is not rewarded. ``target="age"`` uses the
chronological age as the paper did (Bintsi et al., 2021); it mixes model error into the
map and needs ages for every image.

Both classes follow captum's surface: built around the model, ``attribute(inputs)``
returns a tensor shaped like ``inputs``.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm.auto import tqdm

from ._io import atomic_path
from ._validation import BrainAgeInputError, check_choice, check_fraction, check_positive
from .perturbations import (
    PERTURBATIONS,
    PerturbationParams,
    additive,
    get_perturbation,
    mean_image,
)
from .unet import UNet3D

#: Accepted values of the ``target`` parameter ("age" is the paper's).
TARGETS = ("prediction", "age")

#: Accepted values of the ``loss`` parameter: the task loss ``|f(x~) - t|`` ("l1", the
#: default) or ``(f(x~) - t)**2`` ("l2").
LOSSES = ("l1", "l2")

#: Version of the checkpoint layout written by :meth:`NoiseMapExplainer.save`.
CHECKPOINT_VERSION = 1


# -- helpers shared by the explainers, calibration and scoring ------------------------------
@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode with ``requires_grad=False``; restore both afterwards.

    Gradients still flow through the model to its *input*, but none reach its weights.
    """
    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
        model.train(was_training)


def predict_batch(predictor: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Call ``predictor`` on ``x`` and return predictions shaped ``(N,)``."""
    out = predictor(x)
    if out.ndim == 2 and out.shape[1] == 1:
        out = out[:, 0]
    if out.ndim != 1 or out.shape[0] != x.shape[0]:
        raise BrainAgeInputError(
            f"the predictor must return one value per image, shaped (N,); it returned "
            f"{tuple(out.shape)} for an input of {tuple(x.shape)}."
        )
    return out


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (CPU for a model without any)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def as_mask(mask: Any, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Turn a brain mask (array, tensor or None = everywhere) into a float tensor.

    Returns a tensor shaped ``(1, 1, X, Y, Z)`` holding 0 and 1.
    """
    if mask is None:
        return torch.ones((1, 1, *shape), device=device)
    m = torch.as_tensor(np.asarray(mask) if not torch.is_tensor(mask) else mask)
    m = m.reshape(m.shape[-3:]) if m.ndim > 3 else m
    if tuple(m.shape) != tuple(shape):
        raise BrainAgeInputError(
            f"'mask' must have the images' grid shape {tuple(shape)}; "
            f"{tuple(m.shape)} was provided."
        )
    return (m != 0).to(device=device, dtype=torch.float32)[None, None]


def perturb(
    x: torch.Tensor,
    b: torch.Tensor,
    mask: torch.Tensor,
    s_min: float,
    s_max: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The paper's additive perturbation (see :func:`brainage_core.perturbations.additive`)."""
    return additive(x, b, mask, None, PerturbationParams(s_min=s_min, s_max=s_max), generator)


def as_dataset(data: Any, name: str = "data") -> Dataset:
    """Accept a dataset of ``(x, age)`` items, a tensor of images or a pair of tensors.

    Parameters
    ----------
    data : Dataset or torch.Tensor or tuple of (torch.Tensor, torch.Tensor)
        A dataset whose items are ``(x, age)`` with ``x`` shaped ``(1, X, Y, Z)``
        (for example :class:`brainage_core.datasets.CohortDataset`), images shaped
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


def _split_item(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, (tuple, list)):
        x, ages = batch[0], batch[1]
    else:
        x, ages = batch, torch.full((batch.shape[0],), float("nan"))
    return x.float(), torch.as_tensor(ages, dtype=torch.float32).reshape(-1)


def _epoch_generator(seed: int, epoch: int, stream: int, device: torch.device) -> torch.Generator:
    """A generator seeded by (seed, epoch, stream): epochs replay exactly after a resume."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(np.random.SeedSequence([seed, epoch, stream]).generate_state(1)[0]))
    return gen


class _NoiseObjective:
    """The U-Noise objective shared by the amortised and the per-subject explainers."""

    def __init__(
        self,
        predictor: nn.Module,
        *,
        mask: Any = None,
        lam: float = 1.0,
        s_min: float = 0.0,
        s_max: float = 1.0,
        target: str = "prediction",
        perturbation: str = "additive",
        noise_sd: float = 0.0,
        blur_sigma: float = 2.0,
        loss: str = "l1",
        reference: Any = None,
        seed: int = 0,
    ) -> None:
        if not isinstance(predictor, nn.Module):
            raise BrainAgeInputError(
                f"'predictor' must be a torch.nn.Module; {type(predictor).__name__} was provided."
            )
        self.predictor = predictor
        self.lam = float(check_positive("lam", lam, allow_zero=True))
        self.s_min = float(check_positive("s_min", s_min, allow_zero=True))
        self.s_max = float(check_positive("s_max", s_max))
        if self.s_max < self.s_min:
            raise BrainAgeInputError(
                f"'s_max' must be at least 's_min' ({self.s_min}); {s_max!r} was provided."
            )
        self.target = check_choice("target", target, TARGETS)
        self.perturbation = perturbation
        self._perturb = get_perturbation(perturbation)
        self.noise_sd = float(check_positive("noise_sd", noise_sd, allow_zero=True))
        self.blur_sigma = float(check_positive("blur_sigma", blur_sigma))
        self.loss = check_choice("loss", loss, LOSSES)
        self.params = PerturbationParams(
            s_min=self.s_min, s_max=self.s_max, noise_sd=self.noise_sd, blur_sigma=self.blur_sigma
        )
        self.seed = int(seed)
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

    def perturbation_settings(self) -> dict[str, Any]:
        """The settings of the perturbation (the keyword arguments that rebuild it)."""
        return {
            "perturbation": self.perturbation,
            "s_min": self.s_min,
            "s_max": self.s_max,
            "noise_sd": self.noise_sd,
            "blur_sigma": self.blur_sigma,
        }

    def set_reference(self, data: Any) -> None:
        """Compute the training-mean image from ``data`` (unless one is set).

        "replace_mean" moves voxels toward it; for the other perturbations it is kept as
        the reference of deletion and insertion curves.
        """
        if self.reference is None:
            self.reference = mean_image(as_dataset(data)).to(self.device)

    def perturb(
        self, x: torch.Tensor, b: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Apply this objective's perturbation with noise levels ``b`` inside the brain."""
        mask = self._brain_mask(tuple(x.shape[2:]))
        return self._perturb(x, b, mask, self.reference, self.params, generator)

    def reference_image(self, x: torch.Tensor) -> torch.Tensor:
        """What ``B = 1`` moves ``x`` toward (the noise-free replacement; ``x`` for additive).

        Deletion and insertion curves replace voxels by this image.
        """
        mask = self._brain_mask(tuple(x.shape[2:]))
        if self.perturbation == "additive":
            return x
        params = PerturbationParams(noise_sd=0.0, blur_sigma=self.blur_sigma)
        return self._perturb(x, torch.ones_like(x), mask, self.reference, params, None)

    def _brain_mask(self, shape: tuple[int, ...]) -> torch.Tensor:
        if self._mask is None or tuple(self._mask.shape[2:]) != tuple(shape):
            self._mask = as_mask(self._mask_input, shape, self.device)
        return self._mask

    def _targets(self, x: torch.Tensor, ages: torch.Tensor) -> torch.Tensor:
        if self.target == "prediction":
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
        task = _task_loss(predict_batch(self.predictor, x_noisy) - targets, self.loss)
        log_b = F.logsigmoid(logits)
        reg = -(log_b * mask).flatten(1).sum(1) / mask.sum()
        return task, reg, b

    def _importance(self, b: torch.Tensor) -> torch.Tensor:
        return (1.0 - b) * self._brain_mask(tuple(b.shape[2:]))


def _task_loss(diff: torch.Tensor, loss: str) -> torch.Tensor:
    return diff.abs() if loss == "l1" else diff.square()


# -- the amortised explainer -----------------------------------------------------------------
class NoiseMapExplainer(_NoiseObjective):
    """Amortised noise-model importance maps (U-Noise for regression).

    Parameters
    ----------
    predictor : torch.nn.Module
        Trained model mapping images ``(N, 1, X, Y, Z)`` to predictions ``(N,)``. It is
        frozen (eval mode, no weight gradients) while the noise model trains or explains,
        and restored afterwards; its weights are never changed.
    mask : array-like of bool or None, default=None
        Brain mask on the image grid; noise is applied, and the regulariser averaged,
        only inside it. None means every voxel.
    lam : float, default=1.0
        Weight lambda of ``-mean_brain(log B)``: larger means more noise and sparser maps.
        Pick it with :func:`brainage_core.calibration.calibrate_lambda`.
    s_min, s_max : float, default=0.0, 1.0
        Noise standard deviation at ``B = 0`` and ``B = 1`` in image intensity units.
    target : {"prediction", "age"}, default="prediction"
        What the noisy prediction is compared with (see the module docstring; "age" is
        the paper's).
    perturbation : str, default="additive"
        A name in :data:`brainage_core.perturbations.PERTURBATIONS`: "additive" is the
        paper's noise, "replace_mean" and "replace_blur" move voxels toward a reference
        image (they remove information instead of adding noise).
    noise_sd : float, default=0.0
        Extra Gaussian noise at ``B = 1`` of the replacement perturbations (0: none).
    blur_sigma : float, default=2.0
        Blur of "replace_blur", in voxels.
    loss : {"l1", "l2"}, default="l1"
        Task loss: ``|f(x~) - t|`` or ``(f(x~) - t)**2``.
    reference : array-like or None, default=None
        The training-mean image of "replace_mean" (None: computed in :meth:`fit` from the
        training data).
    channels, depth : int, default=8, 2
        Width and depth of the :class:`~brainage_core.unet.UNet3D` noise model.
    downsample : int, default=1
        Run the U-Net on the image average-pooled by this factor and upsample its logits
        (trilinear) to the full grid: about ``downsample ** 3`` times cheaper, with maps
        smoother at the scale of ``downsample`` voxels.
    init_bias : float, default=0.0
        Initial logit of B (0 gives B = 0.5 everywhere).
    seed : int, default=0
        Seeds the noise model's initial weights, the data order and the noise.

    Attributes
    ----------
    noise_model : UNet3D
        The network ``g``.
    history_ : pandas.DataFrame
        One row per training epoch (losses, mean B, validation figures, seconds).

    Examples
    --------
    >>> explainer = NoiseMapExplainer(model, mask=cohort.mask, lam=1.0)  # doctest: +SKIP
    >>> explainer.fit(train_dataset, checkpoint_path="run/checkpoints/noise_model.pt")
    >>> importance = explainer.attribute(images)   # shaped like images
    """

    def __init__(
        self,
        predictor: nn.Module,
        *,
        mask: Any = None,
        lam: float = 1.0,
        s_min: float = 0.0,
        s_max: float = 1.0,
        target: str = "prediction",
        perturbation: str = "additive",
        noise_sd: float = 0.0,
        blur_sigma: float = 2.0,
        loss: str = "l1",
        reference: Any = None,
        channels: int = 8,
        depth: int = 2,
        downsample: int = 1,
        init_bias: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__(
            predictor,
            mask=mask,
            lam=lam,
            s_min=s_min,
            s_max=s_max,
            target=target,
            perturbation=perturbation,
            noise_sd=noise_sd,
            blur_sigma=blur_sigma,
            loss=loss,
            reference=reference,
            seed=seed,
        )
        self.channels = int(channels)
        self.depth = int(depth)
        self.downsample = int(check_positive("downsample", downsample, integer=True))
        self.init_bias = float(init_bias)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.noise_model = UNet3D(
                channels=self.channels, depth=self.depth, init_bias=self.init_bias
            )
        self.noise_model.to(self.device)
        self._history: list[dict[str, float]] = []
        self.epochs_trained = 0
        #: Epoch (1-based) whose weights are kept: the best validation objective.
        self.best_epoch: int | None = None
        self._best: tuple[float, int, dict[str, torch.Tensor]] | None = None

    # -- settings -------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """The hyper-parameters that define this explainer (stored in checkpoints)."""
        return {
            "lam": self.lam,
            **self.perturbation_settings(),
            "target": self.target,
            "loss": self.loss,
            "channels": self.channels,
            "depth": self.depth,
            "downsample": self.downsample,
            "init_bias": self.init_bias,
            "seed": self.seed,
        }

    @property
    def history_(self) -> pd.DataFrame:
        return pd.DataFrame(self._history)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of B on the grid of ``x`` (the U-Net may run on a coarser grid)."""
        if self.downsample == 1:
            return self.noise_model(x)
        k = self.downsample
        coarse = self.noise_model(F.avg_pool3d(x, kernel_size=k, stride=k, ceil_mode=True))
        return F.interpolate(coarse, size=tuple(x.shape[2:]), mode="trilinear", align_corners=False)

    # -- training -------------------------------------------------------------------------
    def fit(
        self,
        train_data: Any,
        val_data: Any = None,
        *,
        epochs: int = 10,
        batch_size: int = 4,
        lr: float = 1e-3,
        checkpoint_path: str | os.PathLike | None = None,
        resume: bool = True,
        progress: bool = True,
    ) -> NoiseMapExplainer:
        """Train the noise model with the predictor frozen.

        Parameters
        ----------
        train_data : Dataset or torch.Tensor or tuple
            Training images (see :func:`as_dataset`).
        val_data : Dataset or torch.Tensor or tuple or None, default=None
            Validation images, evaluated after each epoch with seeded noise.
        epochs : int, default=10
            Total number of epochs (including those already in a resumed checkpoint).
        batch_size : int, default=4
            Images per optimisation step.
        lr : float, default=1e-3
            Adam learning rate.
        checkpoint_path : str or os.PathLike or None, default=None
            Written atomically after every epoch. If it exists and ``resume`` is true,
            training continues from it (an exact replay: data order and noise are seeded
            per epoch); a finished checkpoint is simply loaded.
        resume : bool, default=True
            Continue from ``checkpoint_path`` if it exists; otherwise start afresh and
            overwrite it.
        progress : bool, default=True
            Show a tqdm progress bar over epochs.

        Returns
        -------
        NoiseMapExplainer
            ``self``, trained.
        """
        check_positive("epochs", epochs, integer=True)
        check_positive("batch_size", batch_size, integer=True)
        check_positive("lr", lr)
        train_set = as_dataset(train_data, "train_data")
        val_set = None if val_data is None else as_dataset(val_data, "val_data")
        optimiser = torch.optim.Adam(self.noise_model.parameters(), lr=lr)
        if checkpoint_path is not None and resume and Path(checkpoint_path).is_file():
            self._load_checkpoint(checkpoint_path, optimiser)
        self.set_reference(train_set)
        bar = tqdm(
            range(self.epochs_trained, epochs),
            total=epochs,
            initial=self.epochs_trained,
            desc="noise model",
            unit="epoch",
            disable=None if progress else True,
        )
        with frozen(self.predictor):
            for epoch in bar:
                start = time.perf_counter()
                row = self._train_epoch(train_set, optimiser, epoch, batch_size)
                if val_set is not None:
                    val = self.evaluate(val_set, batch_size=batch_size, seed_offset=epoch)
                    row.update({f"val_{k}": v for k, v in val.items()})
                    row["val_objective"] = val["task"] + self.lam * val["reg"]
                    if self._best is None or row["val_objective"] <= self._best[0]:
                        self._best = (row["val_objective"], epoch + 1, self._state())
                row["seconds"] = time.perf_counter() - start
                row["epoch"] = epoch + 1
                self._history.append(row)
                self.epochs_trained = epoch + 1
                bar.set_postfix(loss=f"{row['loss']:.3f}", mean_b=f"{row['mean_b']:.2f}")
                if checkpoint_path is not None:
                    self.save(checkpoint_path, optimiser=optimiser)
        bar.close()
        if self._best is not None:
            # keep the epoch with the best validation objective, not the last one
            self.noise_model.load_state_dict(self._best[2])
            self.best_epoch = self._best[1]
            if checkpoint_path is not None:
                self.save(checkpoint_path, optimiser=optimiser)
        self.noise_model.eval()
        return self

    def _state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.noise_model.state_dict().items()}

    def _train_epoch(
        self, dataset: Dataset, optimiser: torch.optim.Optimizer, epoch: int, batch_size: int
    ) -> dict[str, float]:
        self.noise_model.train()
        order = torch.Generator().manual_seed(
            int(np.random.SeedSequence([self.seed, epoch, 0]).generate_state(1)[0])
        )
        noise = _epoch_generator(self.seed, epoch, 1, self.device)
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=order)
        totals = {"loss": 0.0, "task": 0.0, "reg": 0.0, "mean_b": 0.0}
        count = 0
        for batch in loader:
            x, ages = _split_item(batch)
            x = x.to(self.device)
            targets = self._targets(x, ages)
            logits = self._logits(x)
            task, reg, b = self._loss(x, logits, targets, noise)
            loss = task.mean() + self.lam * reg.mean()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            n = x.shape[0]
            mask = self._brain_mask(tuple(x.shape[2:]))
            totals["loss"] += float(loss.detach()) * n
            totals["task"] += float(task.detach().sum())
            totals["reg"] += float(reg.detach().sum())
            totals["mean_b"] += float(((b.detach() * mask).flatten(1).sum(1) / mask.sum()).sum())
            count += n
        return {k: v / max(count, 1) for k, v in totals.items()}

    # -- inference ------------------------------------------------------------------------
    @torch.no_grad()
    def noise_level(self, inputs: torch.Tensor, *, batch_size: int = 8) -> torch.Tensor:
        """Return ``B = sigmoid(g(x))`` shaped like ``inputs`` (on ``inputs``' device)."""
        x = _check_inputs(inputs)
        was_training = self.noise_model.training
        self.noise_model.eval()
        try:
            parts = [
                torch.sigmoid(self._logits(chunk.to(self.device))).to(x.device)
                for chunk in torch.split(x, batch_size)
            ]
        finally:
            self.noise_model.train(was_training)
        return torch.cat(parts).reshape(torch.as_tensor(inputs).shape)

    def attribute(self, inputs: torch.Tensor, *, batch_size: int = 8) -> torch.Tensor:
        """Importance ``1 - B`` for each image, shaped like ``inputs``.

        Parameters
        ----------
        inputs : torch.Tensor of shape (N, 1, X, Y, Z) or (1, X, Y, Z)
            Images on the grid the noise model was trained on.
        batch_size : int, default=8
            Images per forward pass.

        Returns
        -------
        torch.Tensor
            Importance in [0, 1], zero outside the brain mask; no gradient attached.
        """
        inputs = torch.as_tensor(inputs)
        b = _check_inputs(self.noise_level(inputs, batch_size=batch_size))
        return self._importance(b.to(self.device)).to(inputs.device).reshape(inputs.shape)

    @torch.no_grad()
    def evaluate(
        self, data: Any, *, batch_size: int = 8, n_draws: int = 1, seed_offset: int = 0
    ) -> dict[str, float]:
        """Predictor error on clean and noised images of ``data``.

        Returns
        -------
        dict
            ``task``: mean ``|f(x~) - target|``; ``shift``: mean ``|f(x~) - f(x)|``;
            ``clean_mae`` and ``noisy_mae`` against the true age (NaN without ages);
            ``mean_b``, ``mean_sigma`` (mean noise standard deviation in the brain, for
            the additive perturbation) and ``reg`` (the regulariser ``-mean log B``).
        """
        dataset = as_dataset(data)
        was_training = self.noise_model.training
        self.noise_model.eval()
        sums = dict.fromkeys(
            ["task", "shift", "clean_mae", "noisy_mae", "mean_b", "mean_sigma", "reg"], 0.0
        )
        count = 0
        gen = _epoch_generator(self.seed, 10_000 + seed_offset, 2, self.device)
        with frozen(self.predictor):
            for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
                x, ages = _split_item(batch)
                x, ages = x.to(self.device), ages.to(self.device)
                clean = predict_batch(self.predictor, x)
                targets = clean if self.target == "prediction" else self._targets(x, ages)
                logits = self._logits(x)
                b = torch.sigmoid(logits)
                mask = self._brain_mask(tuple(x.shape[2:]))
                for _ in range(n_draws):
                    noisy = predict_batch(self.predictor, self.perturb(x, b, gen))
                    task = _task_loss(noisy - targets, self.loss)
                    sums["task"] += float(task.sum()) / n_draws
                    sums["shift"] += float((noisy - clean).abs().sum()) / n_draws
                    sums["noisy_mae"] += float((noisy - ages).abs().sum()) / n_draws
                sums["clean_mae"] += float((clean - ages).abs().sum())
                mean_b = (b * mask).flatten(1).sum(1) / mask.sum()
                sums["mean_b"] += float(mean_b.sum())
                reg = -(F.logsigmoid(logits) * mask).flatten(1).sum(1) / mask.sum()
                sums["reg"] += float(reg.sum())
                sums["mean_sigma"] += float((self.s_min + mean_b * (self.s_max - self.s_min)).sum())
                count += x.shape[0]
        self.noise_model.train(was_training)
        return {k: v / max(count, 1) for k, v in sums.items()}

    # -- persistence ----------------------------------------------------------------------
    def save(
        self, path: str | os.PathLike, *, optimiser: torch.optim.Optimizer | None = None
    ) -> Path:
        """Write a checkpoint atomically (weights, settings, history, optimiser state)."""
        state = {
            "kind": "noise_model",
            "version": CHECKPOINT_VERSION,
            "settings": self.settings(),
            "state_dict": {k: v.detach().cpu() for k, v in self.noise_model.state_dict().items()},
            "optimizer": None if optimiser is None else optimiser.state_dict(),
            "epochs_trained": self.epochs_trained,
            "best_epoch": self.best_epoch,
            "best": (
                None
                if self._best is None
                else {
                    "objective": self._best[0],
                    "epoch": self._best[1],
                    "state_dict": self._best[2],
                }
            ),
            "history": self._history,
            "reference": None if self.reference is None else self.reference.detach().cpu(),
        }
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
        return Path(path)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        predictor: nn.Module,
        *,
        mask: Any = None,
    ) -> NoiseMapExplainer:
        """Rebuild a trained explainer from a checkpoint written by :meth:`save` or :meth:`fit`.

        Parameters
        ----------
        path : str or os.PathLike
            The checkpoint.
        predictor : torch.nn.Module
            The predictor the noise model was trained for.
        mask : array-like of bool or None, default=None
            The brain mask used in training.
        """
        state = _read_checkpoint(path)
        explainer = cls(predictor, mask=mask, reference=state.get("reference"), **state["settings"])
        explainer.noise_model.load_state_dict(state["state_dict"])
        explainer.noise_model.eval()
        explainer.epochs_trained = int(state["epochs_trained"])
        explainer.best_epoch = state.get("best_epoch")
        explainer._history = list(state["history"])
        return explainer

    def _load_checkpoint(self, path: str | os.PathLike, optimiser: torch.optim.Optimizer) -> None:
        state = _read_checkpoint(path)
        if state["settings"] != self.settings():
            raise BrainAgeInputError(
                f"checkpoint was trained with settings {state['settings']}, which differ from "
                f"this explainer's {self.settings()}; delete it or pass resume=False.",
                path,
            )
        self.noise_model.load_state_dict(state["state_dict"])
        if state["optimizer"] is not None:
            optimiser.load_state_dict(state["optimizer"])
        self.epochs_trained = int(state["epochs_trained"])
        self._history = list(state["history"])
        if state.get("reference") is not None:
            self.reference = state["reference"].to(self.device)
        self.best_epoch = state.get("best_epoch")
        best = state.get("best")
        if best is not None:
            self._best = (float(best["objective"]), int(best["epoch"]), best["state_dict"])


def _read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise BrainAgeInputError("noise-model checkpoint not found", path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same input error
        raise BrainAgeInputError(f"not a readable noise-model checkpoint ({err})", path) from err
    if not isinstance(state, dict) or state.get("kind") != "noise_model":
        raise BrainAgeInputError("not a noise-model checkpoint", path)
    return state


def _check_inputs(inputs: torch.Tensor) -> torch.Tensor:
    """Return ``inputs`` as a float tensor shaped ``(N, 1, X, Y, Z)``."""
    x = torch.as_tensor(inputs)
    if x.ndim == 4:
        x = x[None]
    if x.ndim != 5 or x.shape[1] != 1:
        raise BrainAgeInputError(
            f"'inputs' must be shaped (N, 1, X, Y, Z); {tuple(x.shape)} was provided."
        )
    return x.float()


# -- the per-subject explainer ----------------------------------------------------------------
class PerSubjectNoiseMap(_NoiseObjective):
    """Noise maps optimised directly for each image (meaningful-perturbation style).

    The logits of ``B`` are free parameters per image, optimised with Adam on the same
    objective as :class:`NoiseMapExplainer`. No training set is needed, but every map
    costs up to ``steps`` forward and backward passes of the predictor.

    Free per-voxel logits with one noise draw per step converge slowly and give noisy
    maps; three options make the optimisation converge (Fong et al., 2019, extremal
    perturbations):

    * ``coarse``: the logits live on a grid ``coarse`` times coarser and are upsampled
      (trilinear), so neighbouring voxels share their noise level;
    * ``fixed_noise``: the same noise draw at every step (the objective is then
      deterministic; the replacement perturbations without ``noise_sd`` are anyway);
    * ``mean_b``: the operating point. The regulariser ``-lambda mean log B`` is replaced
      by ``area_weight * (mean_brain(B) - mean_b)**2``, so the map spends the same noise
      budget as the amortised model it is compared with.

    Optimisation stops after ``steps`` steps, or earlier when the objective has not
    improved by more than ``tol`` (years) over the last ``patience`` steps;
    :attr:`history_` holds the objective, the task loss and mean B of every step.

    Parameters
    ----------
    predictor : torch.nn.Module
        Model mapping ``(N, 1, X, Y, Z)`` to ``(N,)``; frozen while explaining.
    mask, lam, s_min, s_max, target, perturbation, noise_sd, blur_sigma, loss, reference, seed
        As for :class:`NoiseMapExplainer` (``reference`` is required by "replace_mean").
    steps : int, default=100
        Most optimisation steps per image.
    lr : float, default=0.1
        Adam learning rate on the logits.
    init_logit : float, default=0.0
        Starting logit of B everywhere (with ``mean_b``, the logit of ``mean_b``).
    coarse : int, default=1
        Logits on a grid coarser by this factor (1: one logit per voxel).
    fixed_noise : bool, default=False
        Reuse one noise draw at every step.
    mean_b : float or None, default=None
        Target mean of B in the brain (the operating point); None keeps the paper's
        regulariser.
    area_weight : float, default=100.0
        Weight of the operating-point penalty.
    tol : float, default=0.01
        Improvement of the objective (years, the unit of the task loss) below which it
        counts as converged.
    patience : int or None, default=20
        Steps without such an improvement before stopping (None: always run ``steps``).
    """

    def __init__(
        self,
        predictor: nn.Module,
        *,
        mask: Any = None,
        lam: float = 1.0,
        s_min: float = 0.0,
        s_max: float = 1.0,
        target: str = "prediction",
        perturbation: str = "additive",
        noise_sd: float = 0.0,
        blur_sigma: float = 2.0,
        loss: str = "l1",
        reference: Any = None,
        steps: int = 100,
        lr: float = 0.1,
        init_logit: float = 0.0,
        coarse: int = 1,
        fixed_noise: bool = False,
        mean_b: float | None = None,
        area_weight: float = 100.0,
        tol: float = 0.01,
        patience: int | None = 20,
        seed: int = 0,
    ) -> None:
        super().__init__(
            predictor,
            mask=mask,
            lam=lam,
            s_min=s_min,
            s_max=s_max,
            target=target,
            perturbation=perturbation,
            noise_sd=noise_sd,
            blur_sigma=blur_sigma,
            loss=loss,
            reference=reference,
            seed=seed,
        )
        self.steps = int(check_positive("steps", steps, integer=True))
        self.lr = float(check_positive("lr", lr))
        self.init_logit = float(init_logit)
        self.coarse = int(check_positive("coarse", coarse, integer=True))
        self.fixed_noise = bool(fixed_noise)
        self.mean_b = None if mean_b is None else float(check_fraction("mean_b", mean_b))
        self.area_weight = float(check_positive("area_weight", area_weight))
        self.tol = float(check_positive("tol", tol, allow_zero=True))
        self.patience = (
            None if patience is None else int(check_positive("patience", patience, integer=True))
        )
        self._history: list[dict[str, float]] = []

    @property
    def history_(self) -> pd.DataFrame:
        """One row per step of the last :meth:`attribute` call: ``step``, ``objective``,
        ``task`` and ``mean_b`` (means over the images)."""
        return pd.DataFrame(self._history, columns=["step", "objective", "task", "mean_b"])

    @property
    def steps_run_(self) -> int:
        """Steps the last :meth:`attribute` call ran (fewer than ``steps`` if it stopped)."""
        return len(self._history)

    def _full_logits(self, params: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        if self.coarse == 1:
            return params
        return F.interpolate(params, size=shape, mode="trilinear", align_corners=False)

    def attribute(
        self, inputs: torch.Tensor, ages: torch.Tensor | None = None, *, progress: bool = False
    ) -> torch.Tensor:
        """Optimise one map per image and return the importance ``1 - B``.

        Parameters
        ----------
        inputs : torch.Tensor of shape (N, 1, X, Y, Z) or (1, X, Y, Z)
            Images to explain. They are optimised jointly (the loss is a sum over images
            and Adam acts per element); the stopping rule watches their summed objective.
        ages : torch.Tensor of shape (N,) or None, default=None
            True ages; required when ``target="age"``.
        progress : bool, default=False
            Show a tqdm progress bar over the optimisation steps.

        Returns
        -------
        torch.Tensor
            Importance in [0, 1] shaped like ``inputs``, zero outside the brain mask.
        """
        x = _check_inputs(inputs).to(self.device)
        n = x.shape[0]
        ages_t = (
            torch.full((n,), float("nan"))
            if ages is None
            else torch.as_tensor(ages, dtype=torch.float32).reshape(-1)
        )
        if ages_t.shape[0] != n:
            raise BrainAgeInputError(f"'ages' must hold {n} values; {ages_t.shape[0]} given.")
        grid = tuple(x.shape[2:])
        mask = self._brain_mask(grid)
        coarse_shape = tuple(-(-g // self.coarse) for g in grid)
        start = self.init_logit
        if self.mean_b is not None:  # start at the operating point
            start = float(np.log(self.mean_b / (1.0 - self.mean_b)))
        params = torch.full((n, 1, *coarse_shape), start, device=self.device, requires_grad=True)
        optimiser = torch.optim.Adam([params], lr=self.lr)
        gen = _epoch_generator(self.seed, 0, 3, self.device)
        self._history = []
        best, since_best = float("inf"), 0
        with frozen(self.predictor):
            targets = self._targets(x, ages_t)
            bar = tqdm(
                range(self.steps), desc="per-subject map", disable=None if progress else True
            )
            for step in bar:
                if self.fixed_noise:
                    gen = _epoch_generator(self.seed, 0, 3, self.device)
                logits = self._full_logits(params, grid)
                task, reg, b = self._loss(x, logits, targets, gen)
                mean_b = (b * mask).flatten(1).sum(1) / mask.sum()
                if self.mean_b is None:
                    penalty = self.lam * reg
                else:
                    penalty = self.area_weight * (mean_b - self.mean_b).square()
                loss = (task + penalty).sum()
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                objective = float(loss.detach()) / n
                self._history.append(
                    {
                        "step": step + 1,
                        "objective": objective,
                        "task": float(task.detach().mean()),
                        "mean_b": float(mean_b.detach().mean()),
                    }
                )
                if objective < best - self.tol:
                    best, since_best = objective, 0
                else:
                    since_best += 1
                if self.patience is not None and since_best >= self.patience:
                    break
            bar.close()
        with torch.no_grad():
            importance = self._importance(torch.sigmoid(self._full_logits(params, grid)))
        return importance.to(torch.as_tensor(inputs).device).reshape(inputs.shape)


# -- the ``maps`` section of a study configuration --------------------------------------------
@dataclass
class MapsConfig:
    """Settings of the importance-map steps: the ``maps`` section of a study config.

    Attributes
    ----------
    target : {"prediction", "age"}, default="prediction"
        Target of the task loss (see the module docstring for why "prediction"; "age"
        is the paper's).
    perturbation : str, default="additive"
        A name in :data:`brainage_core.perturbations.PERTURBATIONS` ("additive" is the
        paper's noise; "replace_mean" and "replace_blur" remove information).
    noise_sd : float, default=0.0
        Extra noise at B = 1 of the replacement perturbations.
    blur_sigma : float, default=2.0
        Blur (voxels) of "replace_blur".
    loss : {"l1", "l2"}, default="l1"
        Task loss of the noise model.
    lam : float, default=1.0
        Lambda of the noise term, used as is unless ``calibrate`` is true.
    s_min, s_max : float, default=0.0, 0.3
        Noise standard deviation at B = 0 and B = 1, in units of the normalised
        intensities (CSF near 0, white matter near 1; see :mod:`brainage_core.preprocess`).
        At 1.0 (the full tissue contrast) the predictors of the study lose their
        prediction under almost any noise and B collapses towards 0 everywhere.
    channels, depth : int, default=8, 2
        Width and depth of the U-Net noise model.
    downsample : int, default=1
        The U-Net runs on the image pooled by this factor (see :class:`NoiseMapExplainer`).
    epochs, batch_size, lr : default=10, 8, 1e-2
        Training of the noise model (Adam).
    max_train_subjects : int or None, default=None
        Train the noise model on at most this many training subjects (a seeded random
        subset); None uses the whole training split.
    max_val_subjects : int or None, default=64
        Validation subjects evaluated after each epoch (None: all).
    num_threads : int or None, default=None
        Torch CPU threads of the map steps (None: leave torch's setting).
    calibrate : bool, default=False
        Pick lambda with :func:`brainage_core.calibration.calibrate_lambda` before training.
    lambdas : list of float, default=[0.1, 0.3, 1, 3, 10, 30]
        Candidates of the calibration.
    tolerance : float, default=1.0
        Allowed mean shift ``|f(x~) - f(x)|`` (years) of the predictor on perturbed
        validation images.
    calibration_epochs : int, default=3
        Epochs per candidate lambda (each from the same initial weights).
    per_subject_steps, per_subject_lr : default=100, 0.1
        Optimisation of the per-subject (meaningful-perturbation style) maps: most steps,
        Adam learning rate.
    per_subject_coarse : int, default=2
        The per-subject logits live on a grid this many times coarser (upsampled).
    per_subject_fixed_noise : bool, default=True
        One noise draw for all steps (a deterministic objective).
    per_subject_match_mean_b : bool, default=True
        Hold the per-subject maps at the amortised model's mean B (its operating point
        on the explained images) instead of the paper's regulariser.
    per_subject_patience : int, default=20
        Stopping rule: steps without an improvement of the objective by 0.01 y.
    faithfulness_draws : int, default=4
        Noise draws averaged in the like-for-like faithfulness test.
    timing_subjects : int, default=3
        Subjects on which the amortised and per-subject modes are timed.
    age_band_width : float, default=10
        Width in years of the age bands of the population maps (decades).
    age_band_min_subjects : int, default=3
        Age bands with fewer test subjects get no map.
    min_region_voxels : int, default=3
        Regions with fewer voxels on the cohort's grid are left out of the region table.
    top_regions : int, default=10
        Length of the ranked list stored in ``metrics.json`` under ``regions.top``.
    baselines : list of str, default=["saliency", "integrated_gradients"]
        captum methods compared with the noise maps (see
        :data:`brainage_core.attribution.METHODS`).
    ig_steps : int, default=16
        Integration steps of integrated gradients.
    compare_subjects : int, default=8
        Test subjects on which all methods are compared (and the per-subject mode run).
    deletion_steps : int, default=10
        Points of the deletion curve.
    faithfulness_fraction : float, default=0.5
        Share of brain voxels noised in the fixed-noise faithfulness column (the first
        version's test: noise of ``s_max`` on that share, a harsher regime than the maps
        were trained for).
    weak_tail : float, default=0.05
        Truth voxels whose planted intensity change is below this are left out of the
        binary-truth scores (neither planted nor unplanted).
    region_coverage : float, default=0.5
        A region counts as planted when at least this share of its voxels is in the
        truth (coverage-based region truth).
    reliance_subjects : int, default=16
        Test subjects re-rendered to measure the predictor's reliance on each planted
        effect (synthetic cohorts only; see :mod:`brainage_core.reliance`; 0 skips it).
    reliance_delta : float, default=10.0
        Years by which each effect is aged in that measurement.
    seed : int or None, default=None
        Seed of the noise model; None takes the study's top-level ``seed``.
    """

    target: str = "prediction"
    perturbation: str = "additive"
    noise_sd: float = 0.0
    blur_sigma: float = 2.0
    loss: str = "l1"
    lam: float = 1.0
    s_min: float = 0.0
    s_max: float = 0.3
    channels: int = 8
    depth: int = 2
    downsample: int = 1
    epochs: int = 10
    batch_size: int = 8
    lr: float = 1e-2
    max_train_subjects: int | None = None
    max_val_subjects: int | None = 64
    num_threads: int | None = None
    calibrate: bool = False
    lambdas: list[float] = field(default_factory=lambda: [0.1, 0.3, 1.0, 3.0, 10.0, 30.0])
    tolerance: float = 1.0
    calibration_epochs: int = 3
    per_subject_steps: int = 100
    per_subject_lr: float = 0.1
    per_subject_coarse: int = 2
    per_subject_fixed_noise: bool = True
    per_subject_match_mean_b: bool = True
    per_subject_patience: int = 20
    faithfulness_draws: int = 4
    weak_tail: float = 0.05
    region_coverage: float = 0.5
    timing_subjects: int = 3
    age_band_width: float = 10.0
    age_band_min_subjects: int = 3
    min_region_voxels: int = 3
    top_regions: int = 10
    baselines: list[str] = field(default_factory=lambda: ["saliency", "integrated_gradients"])
    ig_steps: int = 16
    compare_subjects: int = 8
    deletion_steps: int = 10
    faithfulness_fraction: float = 0.5
    reliance_subjects: int = 16
    reliance_delta: float = 10.0
    seed: int | None = None

    def __post_init__(self) -> None:
        check_choice("maps.target", self.target, TARGETS)
        check_choice("maps.perturbation", self.perturbation, tuple(PERTURBATIONS))
        check_choice("maps.loss", self.loss, LOSSES)
        check_positive("maps.blur_sigma", self.blur_sigma)
        check_fraction("maps.region_coverage", self.region_coverage, allow_one=True)
        for name in ("per_subject_fixed_noise", "per_subject_match_mean_b"):
            if not isinstance(getattr(self, name), bool):
                raise BrainAgeInputError(
                    f"'maps.{name}' must be true or false; {getattr(self, name)!r} was provided."
                )
        for name in ("lam", "s_min", "tolerance", "noise_sd", "weak_tail"):
            check_positive(f"maps.{name}", getattr(self, name), allow_zero=True)
        for name in ("s_max", "lr", "per_subject_lr", "age_band_width", "reliance_delta"):
            check_positive(f"maps.{name}", getattr(self, name))
        for name in ("max_train_subjects", "max_val_subjects", "num_threads"):
            if getattr(self, name) is not None:
                check_positive(f"maps.{name}", getattr(self, name), integer=True)
        for name in (
            "channels",
            "depth",
            "downsample",
            "epochs",
            "batch_size",
            "calibration_epochs",
            "per_subject_steps",
            "timing_subjects",
            "age_band_min_subjects",
            "min_region_voxels",
            "top_regions",
            "ig_steps",
            "compare_subjects",
            "deletion_steps",
            "reliance_subjects",
            "per_subject_coarse",
            "per_subject_patience",
            "faithfulness_draws",
        ):
            check_positive(
                f"maps.{name}",
                getattr(self, name),
                integer=True,
                allow_zero=name in ("depth", "timing_subjects", "reliance_subjects"),
            )
        check_fraction("maps.faithfulness_fraction", self.faithfulness_fraction, allow_one=True)
        if self.s_max < self.s_min:
            raise BrainAgeInputError(
                f"'maps.s_max' must be at least 'maps.s_min' ({self.s_min}); "
                f"{self.s_max!r} was provided."
            )
        if not isinstance(self.calibrate, bool):
            raise BrainAgeInputError(
                f"'maps.calibrate' must be true or false; {self.calibrate!r} was provided."
            )
        if not isinstance(self.lambdas, (list, tuple)) or not self.lambdas:
            raise BrainAgeInputError(
                f"'maps.lambdas' must be a non-empty list; {self.lambdas!r} was provided."
            )
        for lam in self.lambdas:
            check_positive("maps.lambdas", lam)
        from .attribution import METHODS  # local import: attribution imports this module

        if not isinstance(self.baselines, (list, tuple)):
            raise BrainAgeInputError(
                f"'maps.baselines' must be a list; {self.baselines!r} was provided."
            )
        for method in self.baselines:
            check_choice("maps.baselines", method, METHODS)
        if self.seed is not None:
            check_positive("maps.seed", self.seed, integer=True, allow_zero=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, *, seed: int | None = None) -> MapsConfig:
        """Build from the config's ``maps`` mapping; unknown keys are a clear error.

        Parameters
        ----------
        d : dict or None
            The section (None or {} gives the defaults).
        seed : int or None, default=None
            The study's top-level seed, used when the section sets none.
        """
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise BrainAgeInputError(
                f"unknown key(s) in config section 'maps': {unknown}; it has {sorted(known)}"
            )
        if d.get("seed") is None and seed is not None:
            d["seed"] = seed
        for name in (
            "lam",
            "s_min",
            "s_max",
            "lr",
            "per_subject_lr",
            "tolerance",
            "age_band_width",
            "faithfulness_fraction",
            "reliance_delta",
            "noise_sd",
            "blur_sigma",
            "weak_tail",
            "region_coverage",
        ):
            if isinstance(d.get(name), int) and not isinstance(d.get(name), bool):
                d[name] = float(d[name])
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the settings (YAML/JSON-ready)."""
        return asdict(self)

    def explainer_kwargs(self) -> dict[str, Any]:
        """Arguments of :class:`NoiseMapExplainer` (all but ``predictor`` and ``mask``)."""
        return {
            "lam": self.lam,
            "perturbation": self.perturbation,
            "s_min": self.s_min,
            "s_max": self.s_max,
            "noise_sd": self.noise_sd,
            "blur_sigma": self.blur_sigma,
            "target": self.target,
            "loss": self.loss,
            "channels": self.channels,
            "depth": self.depth,
            "downsample": self.downsample,
            "seed": self.seed or 0,
        }
