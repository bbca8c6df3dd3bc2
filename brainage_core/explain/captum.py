"""Gradient and perturbation baselines, computed by captum itself.

The noise maps are compared with the attribution methods people already use. They are
not re-implemented here: :class:`CaptumExplainer` wraps captum's own classes around the
predictor so that they share the noise maps' surface (``attribute(inputs)`` returns an
importance tensor shaped like ``inputs``, zero outside the brain mask).

The predictor is a regression model returning one value per image, shaped ``(N,)``; that
is captum's ``target=None`` case. Integrated gradients multiply the batch by ``n_steps``,
so they run with ``internal_batch_size``.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from captum.attr import (
    GuidedBackprop,
    InputXGradient,
    IntegratedGradients,
    Occlusion,
    Saliency,
)
from torch import nn

from brainage_core._utils.torch import as_mask, frozen, model_device, predict_batch
from brainage_core._utils.validation import BrainAgeInputError, check_choice, check_positive

#: Attribution methods available through captum, by their name in the config.
METHODS = ("saliency", "integrated_gradients", "input_x_gradient", "guided_backprop", "occlusion")


class _ScalarOutput(nn.Module):
    """Present the predictor to captum with outputs shaped ``(N,)`` (``target=None``)."""

    def __init__(self, predictor: nn.Module) -> None:
        super().__init__()
        self.predictor = predictor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return predict_batch(self.predictor, x)


class CaptumExplainer:
    """A captum attribution method with the importance-map surface.

    Parameters
    ----------
    predictor : torch.nn.Module
        Model mapping ``(N, 1, X, Y, Z)`` to ``(N,)``. It is put in eval mode with frozen
        weights while attributing, and restored afterwards.
    method : {"saliency", "integrated_gradients", "input_x_gradient", "guided_backprop", \
"occlusion"}, default="saliency"
        The captum class used: :class:`captum.attr.Saliency`,
        :class:`~captum.attr.IntegratedGradients`, :class:`~captum.attr.InputXGradient`,
        :class:`~captum.attr.GuidedBackprop` or :class:`~captum.attr.Occlusion`.
    mask : array-like of bool or None, default=None
        Brain mask; importance is set to zero outside it. None keeps every voxel.
    absolute : bool, default=True
        Return the magnitude of the attributions (importance regardless of sign).
    n_steps : int, default=32
        Integration steps of integrated gradients.
    internal_batch_size : int or None, default=8
        Images per internal forward pass of integrated gradients and occlusion.
    baseline : float, default=0.0
        Reference intensity of integrated gradients and occlusion (0 = background).
    window : int, default=3
        Edge, in voxels, of the cubic occlusion window (the stride is the same).

    Examples
    --------
    >>> saliency = CaptumExplainer(model, "saliency", mask=cohort.mask)  # doctest: +SKIP
    >>> importance = saliency.attribute(images)
    """

    def __init__(
        self,
        predictor: nn.Module,
        method: str = "saliency",
        *,
        mask: Any = None,
        absolute: bool = True,
        n_steps: int = 32,
        internal_batch_size: int | None = 8,
        baseline: float = 0.0,
        window: int = 3,
    ) -> None:
        if not isinstance(predictor, nn.Module):
            raise BrainAgeInputError(
                f"'predictor' must be a torch.nn.Module; {type(predictor).__name__} was provided."
            )
        self.predictor = predictor
        self.method = check_choice("method", method, METHODS)
        self.mask = mask
        self.absolute = bool(absolute)
        self.n_steps = int(check_positive("n_steps", n_steps, integer=True))
        if internal_batch_size is not None:
            check_positive("internal_batch_size", internal_batch_size, integer=True)
        self.internal_batch_size = internal_batch_size
        self.baseline = float(baseline)
        self.window = int(check_positive("window", window, integer=True))

    def _captum_attribute(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.method == "saliency":
            return Saliency(model).attribute(x, target=None, abs=False)
        if self.method == "integrated_gradients":
            return IntegratedGradients(model).attribute(
                x,
                baselines=self.baseline,
                target=None,
                n_steps=self.n_steps,
                internal_batch_size=self.internal_batch_size,
            )
        if self.method == "input_x_gradient":
            return InputXGradient(model).attribute(x, target=None)
        if self.method == "guided_backprop":
            return GuidedBackprop(model).attribute(x, target=None)
        window = (1, self.window, self.window, self.window)
        return Occlusion(model).attribute(
            x,
            sliding_window_shapes=window,
            strides=window,
            baselines=self.baseline,
            target=None,
            perturbations_per_eval=self.internal_batch_size or 1,
        )

    def attribute(self, inputs: torch.Tensor, *, batch_size: int = 4) -> torch.Tensor:
        """Attribution maps shaped like ``inputs`` (detached, zero outside the mask).

        Parameters
        ----------
        inputs : torch.Tensor of shape (N, 1, X, Y, Z) or (1, X, Y, Z)
            Images to explain. Their ``requires_grad`` flag is left as it was.
        batch_size : int, default=4
            Images per call of the captum method.
        """
        inputs = torch.as_tensor(inputs)
        x = inputs[None] if inputs.ndim == 4 else inputs
        if x.ndim != 5 or x.shape[1] != 1:
            raise BrainAgeInputError(
                f"'inputs' must be shaped (N, 1, X, Y, Z); {tuple(inputs.shape)} was provided."
            )
        device = model_device(self.predictor)
        model = _ScalarOutput(self.predictor)
        parts = []
        with frozen(self.predictor), warnings.catch_warnings():
            # captum announces that it sets requires_grad on the inputs (and restores it)
            # and hooks ReLUs for guided backprop (and removes them): expected here.
            warnings.filterwarnings("ignore", message=".*did not already require gradients")
            warnings.filterwarnings("ignore", message=".*Setting backward hooks on ReLU")
            for chunk in torch.split(x.detach(), batch_size):
                attr = self._captum_attribute(model, chunk.float().to(device))
                parts.append(attr.detach())
        out = torch.cat(parts)
        if self.absolute:
            out = out.abs()
        out = out * as_mask(self.mask, tuple(x.shape[2:]), out.device)
        return out.to(inputs.device).reshape(inputs.shape)
