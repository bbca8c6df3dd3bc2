"""Gradient, path, perturbation, CAM and LRP attributions, computed by captum itself.

The noise maps are compared with the attribution methods people already use. They are
not re-implemented here: :class:`CaptumExplainer` wraps captum's own classes around the
predictor so that they share the noise maps' surface (``attribute(inputs)`` returns an
importance tensor shaped like ``inputs``, zero outside the brain mask).

The predictor is a regression model returning one value per image, shaped ``(N,)``; that
is captum's ``target=None`` case, handled once by :class:`_ScalarOutput`. Path and
occlusion methods start from a reference *image* (the training mean), never from 0, the
CSF intensity. Integrated gradients multiply the batch by ``n_steps``, so they run with
``internal_batch_size``.

Layer-wise relevance propagation uses captum's :class:`~captum.attr.LRP`: captum has no
default rule for ``Conv3d`` and ``BatchNorm3d``, so each leaf layer of a copy of the
predictor gets its rule here (:func:`_lrp_rules`), after its batch norms are folded into
the convolutions. zennit was the other candidate; on this project's environment it
cannot be imported: 0.5.1 imports torchvision at start-up, and the torchvision build on
PyPI for torch 2.13 does not load against the CPU build of torch ("operator
torchvision::nms does not exist"), while 1.0.0 needs Python >= 3.11.11. With the epsilon
rule everywhere, LRP is close to input x gradient on a ReLU network (equal when the
biases carry no relevance; Ancona et al., 2018); the alpha1-beta0 rule on convolutions is
the other variant.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from captum.attr import (
    LRP,
    Deconvolution,
    DeepLift,
    GradientShap,
    GuidedBackprop,
    InputXGradient,
    IntegratedGradients,
    LayerGradCam,
    NoiseTunnel,
    Occlusion,
    Saliency,
)
from captum.attr._utils.lrp_rules import Alpha1_Beta0_Rule, EpsilonRule, IdentityRule
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
    baseline : float or torch.Tensor
        Reference of path, DeepLift, GradientShap and occlusion methods: an intensity or
        an image shaped ``(1, 1, X, Y, Z)`` (the training mean image).
    window : int
        Edge, in voxels, of the cubic occlusion window (the stride is the same).
    n_samples : int
        Noisy copies of SmoothGrad and samples of GradientShap.
    noise_fraction : float
        Standard deviation of SmoothGrad's and GradientShap's noise, as a share of the
        intensity range of the images (Smilkov et al. 2017 recommend 0.1-0.2).
    """

    n_steps: int
    internal_batch_size: int | None
    baseline: float | torch.Tensor
    window: int
    n_samples: int = 16
    noise_fraction: float = 0.15


#: One captum attribution: (model with outputs shaped (N,), a batch, the options) -> map.
CaptumMethod = Callable[[nn.Module, torch.Tensor, CaptumOptions], torch.Tensor]


def _baseline(x: torch.Tensor, opts: CaptumOptions) -> float | torch.Tensor:
    if isinstance(opts.baseline, torch.Tensor):
        return opts.baseline.to(x.device, x.dtype).expand_as(x).contiguous()
    return float(opts.baseline)


def _noise_sd(x: torch.Tensor, opts: CaptumOptions) -> float:
    return float(opts.noise_fraction * (x.max() - x.min()).clamp_min(1e-6))


def _saliency(model: nn.Module, x: torch.Tensor, opts: CaptumOptions) -> torch.Tensor:
    return Saliency(model).attribute(x, target=None, abs=False)


def _integrated_gradients(model: nn.Module, x: torch.Tensor, opts: CaptumOptions) -> torch.Tensor:
    return IntegratedGradients(model).attribute(
        x,
        baselines=_baseline(x, opts),
        target=None,
        n_steps=opts.n_steps,
        internal_batch_size=opts.internal_batch_size,
    )


def _input_x_gradient(model: nn.Module, x: torch.Tensor, opts: CaptumOptions) -> torch.Tensor:
    return InputXGradient(model).attribute(x, target=None)


def _guided_backprop(model: nn.Module, x: torch.Tensor, opts: CaptumOptions) -> torch.Tensor:
    return GuidedBackprop(model).attribute(x, target=None)


def _deconvolution(model: nn.Module, x: torch.Tensor, opts: CaptumOptions) -> torch.Tensor:
    return Deconvolution(model).attribute(x, target=None)


def _occlusion(model: nn.Module, x: torch.Tensor, opts: CaptumOptions) -> torch.Tensor:
    window = (1, opts.window, opts.window, opts.window)
    return Occlusion(model).attribute(
        x,
        sliding_window_shapes=window,
        strides=window,
        baselines=_baseline(x, opts),
        target=None,
        perturbations_per_eval=opts.internal_batch_size or 1,
    )


def _smoothgrad(model: nn.Module, x: torch.Tensor, opts: CaptumOptions) -> torch.Tensor:
    return NoiseTunnel(Saliency(model)).attribute(
        x,
        nt_type="smoothgrad",
        nt_samples=opts.n_samples,
        nt_samples_batch_size=opts.internal_batch_size,
        stdevs=_noise_sd(x, opts),
        target=None,
        abs=False,
    )


def _gradient_shap(model: nn.Module, x: torch.Tensor, opts: CaptumOptions) -> torch.Tensor:
    base = _baseline(x, opts)
    if not isinstance(base, torch.Tensor):
        base = torch.full_like(x[:1], base)
    return GradientShap(model).attribute(
        x,
        baselines=base[:1],
        n_samples=opts.n_samples,
        stdevs=_noise_sd(x, opts),
        target=None,
    )


def _deeplift(model: nn.Module, x: torch.Tensor, opts: CaptumOptions) -> torch.Tensor:
    return DeepLift(model).attribute(x, baselines=_baseline(x, opts), target=None)


def _last_conv(model: nn.Module) -> nn.Module:
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv3d, nn.Conv2d, nn.Conv1d))]
    if not convs:
        raise BrainAgeInputError(
            f"Grad-CAM needs a convolution layer; {type(model).__name__} has none."
        )
    return convs[-1]


def _to_input_grid(cam: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
    """Upsample a layer map to the input grid, undoing the model's symmetric padding.

    A feature map of a network that pads its input to a multiple of ``2**k`` (see
    :func:`brainage_core._utils.padding.pad_to_multiple`) covers the padded grid: it is
    upsampled to that grid, then the padding is cropped away (half on each side).
    """
    padded = []
    for size, feat in zip(grid, cam.shape[2:], strict=True):
        factor = 2 ** max(round(math.log2(max(size / feat, 1.0))), 0)
        padded.append(max(feat * factor, size))
    up = F.interpolate(cam, size=tuple(padded), mode="trilinear", align_corners=False)
    slices = [slice((p - s) // 2, (p - s) // 2 + s) for p, s in zip(padded, grid, strict=True)]
    return up[(slice(None), slice(None), *slices)]


def _grad_cam(model: nn.Module, x: torch.Tensor, opts: CaptumOptions) -> torch.Tensor:
    cam = LayerGradCam(model, _last_conv(model)).attribute(
        x, target=None, relu_attributions=True
    )
    return _to_input_grid(cam, tuple(x.shape[2:])).expand_as(x)


def _guided_grad_cam(model: nn.Module, x: torch.Tensor, opts: CaptumOptions) -> torch.Tensor:
    # captum's GuidedGradCam upsamples without undoing the padding: composed here instead
    return _guided_backprop(model, x, opts) * _grad_cam(model, x, opts)


#: Leaf layers propagated with the epsilon rule (linear maps, norms, pooling).
_EPSILON_LAYERS = (
    nn.Linear,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.GroupNorm,
    nn.InstanceNorm3d,
    nn.MaxPool3d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool3d,
)


def _fold_batch_norms(model: nn.Module) -> nn.Module:
    """Fold each evaluation-mode batch norm into the convolution before it (in place).

    The network computes the same function; LRP's rules then see one linear layer, as
    zennit's ``SequentialMergeBatchNorm`` canonizer arranges.
    """
    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    for parent in list(model.modules()):
        if not isinstance(parent, nn.Sequential):  # only there is "the layer before" known
            continue
        children = list(parent.named_children())
        folded = []
        for (_, conv), (name, norm) in zip(children, children[1:], strict=False):
            if not (isinstance(conv, convs) and isinstance(norm, norms)):
                continue
            if norm.training or norm.running_mean is None or norm.running_var is None:
                continue
            with torch.no_grad():
                scale = torch.rsqrt(norm.running_var + norm.eps)
                if norm.weight is not None:
                    scale = scale * norm.weight
                bias = conv.bias if conv.bias is not None else torch.zeros_like(scale)
                shift = norm.bias if norm.bias is not None else torch.zeros_like(scale)
                view = (-1,) + (1,) * (conv.weight.ndim - 1)
                conv.weight = nn.Parameter(conv.weight * scale.view(view), requires_grad=False)
                conv.bias = nn.Parameter(
                    (bias - norm.running_mean) * scale + shift, requires_grad=False
                )
            folded.append(name)
        for name in folded:  # an Identity in its place would confuse captum's LRP hooks
            delattr(parent, name)
    return model


def _lrp_rules(model: nn.Module, conv_rule: type) -> nn.Module:
    """A copy of ``model`` with an LRP rule on every leaf layer (captum lacks 3D defaults).

    Batch norms are first folded into their convolutions (:func:`_fold_batch_norms`).
    """
    model = _fold_batch_norms(copy.deepcopy(model))
    for module in model.modules():
        if next(module.children(), None) is not None:
            continue
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            module.rule = conv_rule()
        elif isinstance(module, nn.Identity):
            module.rule = IdentityRule()
        elif isinstance(module, _EPSILON_LAYERS):
            module.rule = EpsilonRule()
        # ReLU and Dropout need no rule; any other leaf layer: captum names it in its error
    return model


def _lrp(conv_rule: type) -> CaptumMethod:
    def method(model: nn.Module, x: torch.Tensor, opts: CaptumOptions) -> torch.Tensor:
        return LRP(_lrp_rules(model, conv_rule)).attribute(x, target=None)

    return method


#: The captum methods by their name in the config. A new method is one function above and
#: one line here; the config validation, the CLI and the docs read this registry.
CAPTUM_METHODS: dict[str, CaptumMethod] = {
    "saliency": _saliency,
    "smoothgrad": _smoothgrad,
    "input_x_gradient": _input_x_gradient,
    "integrated_gradients": _integrated_gradients,
    "gradient_shap": _gradient_shap,
    "deeplift": _deeplift,
    "guided_backprop": _guided_backprop,
    "deconvolution": _deconvolution,
    "grad_cam": _grad_cam,
    "guided_grad_cam": _guided_grad_cam,
    "lrp_epsilon": _lrp(EpsilonRule),
    "lrp_alpha1_beta0": _lrp(Alpha1_Beta0_Rule),
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
        A name in :data:`CAPTUM_METHODS`: "saliency", "smoothgrad" (captum's
        :class:`~captum.attr.NoiseTunnel` around saliency), "input_x_gradient",
        "integrated_gradients", "gradient_shap", "deeplift", "guided_backprop",
        "deconvolution", "grad_cam" (:class:`~captum.attr.LayerGradCam` on the last
        convolution, upsampled to the input grid), "guided_grad_cam" (guided backprop
        times Grad-CAM), "lrp_epsilon" and "lrp_alpha1_beta0" (:class:`~captum.attr.LRP`
        with the epsilon rule everywhere, or the alpha1-beta0 rule on convolutions) or
        "occlusion".
    %(mask)s
    absolute : bool, default=True
        Return the magnitude of the attributions (importance regardless of sign).
    n_steps : int, default=32
        Integration steps of integrated gradients.
    internal_batch_size : int or None, default=8
        Images per internal forward pass of integrated gradients and occlusion.
    baseline : float or array-like, default=0.0
        Reference of integrated gradients, GradientShap, DeepLift and occlusion: an
        intensity, or an image on the input grid (pass the training mean image: 0 is the
        CSF intensity of the study's images, a poor "absence of signal").
    window : int, default=3
        Edge, in voxels, of the cubic occlusion window (the stride is the same).
    n_samples : int, default=16
        Noisy copies of SmoothGrad, samples of GradientShap.
    noise_fraction : float, default=0.15
        Their noise's standard deviation, as a share of the images' intensity range.

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
        baseline: float | Any = 0.0,
        window: int = 3,
        n_samples: int = 16,
        noise_fraction: float = 0.15,
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
        self.baseline = _check_baseline(baseline)
        self.window = int(check_positive("window", window, integer=True))
        self.n_samples = int(check_positive("n_samples", n_samples, integer=True))
        self.noise_fraction = float(check_positive("noise_fraction", noise_fraction))
        self.options = CaptumOptions(
            n_steps=self.n_steps,
            internal_batch_size=self.internal_batch_size,
            baseline=self.baseline,
            window=self.window,
            n_samples=self.n_samples,
            noise_fraction=self.noise_fraction,
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
        if isinstance(self.baseline, torch.Tensor) and tuple(self.baseline.shape[-3:]) != tuple(
            x.shape[2:]
        ):
            raise BrainAgeInputError(
                f"'baseline' must be an image on the inputs' grid {tuple(x.shape[2:])}; "
                f"{tuple(self.baseline.shape)} was provided."
            )
        parts = []
        with frozen(self.predictor), warnings.catch_warnings():
            # captum announces that it sets requires_grad on the inputs (and restores it)
            # and hooks ReLUs for guided backprop (and removes them): expected here.
            warnings.filterwarnings("ignore", message=".*did not already require gradients")
            warnings.filterwarnings("ignore", message=".*Setting backward hooks on ReLU")
            warnings.filterwarnings("ignore", message=".*Setting forward, backward hooks")
            for chunk in torch.split(x.detach(), batch_size):
                method = CAPTUM_METHODS[self.method]
                attr = method(model, chunk.float().to(device), self.options)
                parts.append(attr.detach())
        out = torch.cat(parts)
        if self.absolute:
            out = out.abs()
        out = out * as_mask(self.mask, tuple(x.shape[2:]), out.device)
        return out.to(inputs.device).reshape(inputs.shape)


def _check_baseline(baseline: Any) -> float | torch.Tensor:
    """A float, or an image reshaped to ``(1, 1, X, Y, Z)``."""
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        return float(baseline)
    try:
        image = torch.as_tensor(baseline, dtype=torch.float32).detach().cpu()
    except (TypeError, ValueError, RuntimeError):
        image = None
    if image is None or image.ndim < 3 or image.numel() != math.prod(image.shape[-3:]):
        raise BrainAgeInputError(
            f"'baseline' must be a number or one image (X, Y, Z); "
            f"{getattr(baseline, 'shape', baseline)!r} was provided."
        )
    return image.reshape(1, 1, *image.shape[-3:])
