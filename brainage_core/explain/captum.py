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
from collections.abc import Callable
from dataclasses import dataclass
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

from brainage_core._utils.docs import fill_doc
from brainage_core._utils.torch import as_mask, frozen, model_device, predict_batch
from brainage_core._utils.validation import BrainAgeInputError, check_choice, check_positive


@dataclass(frozen=True)
class CaptumOptions:
    """The knobs of the captum methods, passed whole to each method's function.

    Attributes
    ----------
    n_steps : int
        Integration steps of path methods (integrated gradients).
    internal_batch_size : int or None
        Images per internal forward pass of path and perturbation methods.
    baseline : float
        Reference intensity of path and occlusion methods.
    window : int
        Edge, in voxels, of the cubic occlusion window (the stride is the same).
    """

    n_steps: int
    internal_batch_size: int | None
    baseline: float
    window: int


#: One captum attribution: (model with outputs shaped (N,), a batch, the options) -> map.
CaptumMethod = Callable[[nn.Module, torch.Tensor, CaptumOptions], torch.Tensor]


def _saliency(model: nn.Module, x: torch.Tensor, opts: CaptumOptions) -> torch.Tensor:
    return Saliency(model).attribute(x, target=None, abs=False)


def _integrated_gradients(model: nn.Module, x: torch.Tensor, opts: CaptumOptions) -> torch.Tensor:
    return IntegratedGradients(model).attribute(
        x,
        baselines=opts.baseline,
        target=None,
        n_steps=opts.n_steps,
        internal_batch_size=opts.internal_batch_size,
    )


def _input_x_gradient(model: nn.Module, x: torch.Tensor, opts: CaptumOptions) -> torch.Tensor:
    return InputXGradient(model).attribute(x, target=None)


def _guided_backprop(model: nn.Module, x: torch.Tensor, opts: CaptumOptions) -> torch.Tensor:
    return GuidedBackprop(model).attribute(x, target=None)


def _occlusion(model: nn.Module, x: torch.Tensor, opts: CaptumOptions) -> torch.Tensor:
    window = (1, opts.window, opts.window, opts.window)
    return Occlusion(model).attribute(
        x,
        sliding_window_shapes=window,
        strides=window,
        baselines=opts.baseline,
        target=None,
        perturbations_per_eval=opts.internal_batch_size or 1,
    )


#: The captum methods by their name in the config. A new method is one function above and
#: one line here; the config validation, the CLI and the docs read this registry.
CAPTUM_METHODS: dict[str, CaptumMethod] = {
    "saliency": _saliency,
    "integrated_gradients": _integrated_gradients,
    "input_x_gradient": _input_x_gradient,
    "guided_backprop": _guided_backprop,
    "occlusion": _occlusion,
}

#: Names of the attribution methods available through captum.
METHODS = tuple(CAPTUM_METHODS)


class _ScalarOutput(nn.Module):
    """Present the predictor to captum with outputs shaped ``(N,)`` (``target=None``)."""

    def __init__(self, predictor: nn.Module) -> None:
        super().__init__()
        self.predictor = predictor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return predict_batch(self.predictor, x)


@fill_doc
class CaptumExplainer:
    """A captum attribution method with the importance-map surface.

    Parameters
    ----------
    %(predictor)s
    method : str, default="saliency"
        A name in :data:`CAPTUM_METHODS`: "saliency", "integrated_gradients",
        "input_x_gradient", "guided_backprop" or "occlusion" (captum's
        :class:`~captum.attr.Saliency`, :class:`~captum.attr.IntegratedGradients`,
        :class:`~captum.attr.InputXGradient`, :class:`~captum.attr.GuidedBackprop` and
        :class:`~captum.attr.Occlusion`).
    %(mask)s
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
        self.method = check_choice("method", method, tuple(CAPTUM_METHODS))
        self.mask = mask
        self.absolute = bool(absolute)
        self.n_steps = int(check_positive("n_steps", n_steps, integer=True))
        if internal_batch_size is not None:
            check_positive("internal_batch_size", internal_batch_size, integer=True)
        self.internal_batch_size = internal_batch_size
        self.baseline = float(baseline)
        self.window = int(check_positive("window", window, integer=True))
        self.options = CaptumOptions(
            n_steps=self.n_steps,
            internal_batch_size=self.internal_batch_size,
            baseline=self.baseline,
            window=self.window,
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
                method = CAPTUM_METHODS[self.method]
                attr = method(model, chunk.float().to(device), self.options)
                parts.append(attr.detach())
        out = torch.cat(parts)
        if self.absolute:
            out = out.abs()
        out = out * as_mask(self.mask, tuple(x.shape[2:]), out.device)
        return out.to(inputs.device).reshape(inputs.shape)
