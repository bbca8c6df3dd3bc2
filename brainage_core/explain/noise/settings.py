"""The noise model's objective, declared once: lambda, the noise scale, the target, the seed.

One frozen :class:`NoiseSettings` is passed whole: the objective reads it, the amortised
and the per-subject explainers share it, a checkpoint stores it and a resume compares it,
and the study's ``maps`` section builds it (``maps.lam``, ``maps.s_min``, ``maps.s_max``,
``maps.target``, ``maps.seed``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from brainage_core._utils.validation import BrainAgeInputError, check_choice, check_positive
from brainage_core.explain.noise.perturbations import PERTURBATIONS

#: What the noisy prediction is compared with: the model's own clean prediction (explains
#: the model), or the chronological age (the paper's choice; mixes model error in).
TARGETS = ("prediction", "age")

#: The task loss: ``|f(x~) - t|`` ("l1") or ``(f(x~) - t)**2`` ("l2").
LOSSES = ("l1", "l2")


@dataclass(frozen=True)
class NoiseSettings:
    """The U-Noise objective adapted to regression.

    With the paper's perturbation (``perturbation="additive"``) the noisy input is
    ``x~ = x + eps * (s_min + B * (s_max - s_min))`` inside the brain mask; the replacement
    perturbations move voxels toward a reference image instead (see
    :mod:`brainage_core.explain.noise.perturbations`). The noise model minimises
    ``|f(x~) - target| - lam * mean_brain(log B)``.

    Attributes
    ----------
    lam : float, default=1.0
        Weight lambda of ``-mean_brain(log B)``: larger means more noise and sparser maps.
        Pick it with :func:`brainage_core.explain.noise.calibration.calibrate_lambda`.
    s_min, s_max : float, default=0.0, 0.3
        Noise standard deviation at ``B = 0`` and ``B = 1``, in units of the normalised
        intensities (CSF near 0, white matter near 1). At 1.0 (the full tissue contrast)
        the study's predictors lose their prediction under almost any noise and B
        collapses towards 0 everywhere.
    target : {"prediction", "age"}, default="prediction"
        What the noisy prediction is compared with (see :data:`TARGETS`).
    perturbation : str, default="additive"
        A name in :data:`~brainage_core.explain.noise.perturbations.PERTURBATIONS`:
        "additive" is the paper's noise; "replace_mean" and "replace_blur" move voxels
        toward the training-mean image or a blurred copy (they remove information).
    noise_sd : float, default=0.0
        Extra Gaussian noise at ``B = 1`` of the replacement perturbations (0: none, the
        perturbation is deterministic).
    blur_sigma : float, default=2.0
        Blur of "replace_blur", in voxels.
    loss : {"l1", "l2"}, default="l1"
        Task loss (see :data:`LOSSES`).
    seed : int, default=0
        Seeds the noise model's initial weights, the data order and the noise draws.
    """

    lam: float = 1.0
    s_min: float = 0.0
    s_max: float = 0.3
    target: str = "prediction"
    perturbation: str = "additive"
    noise_sd: float = 0.0
    blur_sigma: float = 2.0
    loss: str = "l1"
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "lam", float(check_positive("lam", self.lam, allow_zero=True)))
        object.__setattr__(
            self, "s_min", float(check_positive("s_min", self.s_min, allow_zero=True))
        )
        object.__setattr__(self, "s_max", float(check_positive("s_max", self.s_max)))
        if self.s_max < self.s_min:
            raise BrainAgeInputError(
                f"'s_max' must be at least 's_min' ({self.s_min}); {self.s_max!r} was provided."
            )
        check_choice("target", self.target, TARGETS)
        check_choice("perturbation", self.perturbation, tuple(PERTURBATIONS))
        check_choice("loss", self.loss, LOSSES)
        object.__setattr__(
            self, "noise_sd", float(check_positive("noise_sd", self.noise_sd, allow_zero=True))
        )
        object.__setattr__(self, "blur_sigma", float(check_positive("blur_sigma", self.blur_sigma)))
        object.__setattr__(
            self, "seed", int(check_positive("seed", self.seed, integer=True, allow_zero=True))
        )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, prefix: str = "") -> NoiseSettings:
        """Build from a mapping of the fields; an unknown key or bad value is a clear error.

        Parameters
        ----------
        values : mapping
            Some fields of :class:`NoiseSettings` (the others keep their defaults).
        prefix : str, default=""
            Prepended to the parameter name in error messages (``"maps."`` when the values
            come from a study config).
        """
        unknown = sorted(set(values) - set(field_names()))
        if unknown:
            raise BrainAgeInputError(
                f"unknown noise-model setting(s) {unknown}; the settings are {field_names()}"
            )
        try:
            return cls(**dict(values))
        except BrainAgeInputError as err:
            if not prefix:
                raise
            names = "|".join(field_names())
            message = re.sub(
                rf"'({names})'", lambda m: f"'{prefix}{m.group(1)}'", str(err), count=1
            )
            raise BrainAgeInputError(message) from err

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the settings (YAML/JSON-ready, stored in checkpoints)."""
        return asdict(self)


def field_names() -> list[str]:
    """Names of the fields of :class:`NoiseSettings`, in declaration order."""
    return [f.name for f in fields(NoiseSettings)]


def resolve_settings(settings: NoiseSettings | None, overrides: Mapping[str, Any]) -> NoiseSettings:
    """The settings of an explainer: ``settings`` as given, or built from keyword overrides.

    ``NoiseMapExplainer(model, lam=3.0)`` is shorthand for
    ``NoiseMapExplainer(model, NoiseSettings(lam=3.0))``; giving both is an error.
    """
    if settings is not None and overrides:
        raise BrainAgeInputError(
            f"give either 'settings' or the keyword settings {sorted(overrides)}, not both."
        )
    if settings is not None:
        if not isinstance(settings, NoiseSettings):
            raise BrainAgeInputError(
                f"'settings' must be a NoiseSettings; {type(settings).__name__} was provided."
            )
        return settings
    return NoiseSettings.from_dict(overrides)
