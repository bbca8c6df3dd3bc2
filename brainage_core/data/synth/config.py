"""Settings of the synthetic cohort: the age effects and the nuisance."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import special

from brainage_core._utils.validation import (
    BrainAgeInputError,
    check_choice,
    check_fraction,
    check_positive,
)
from brainage_core.data.synth.native import NativeSpace
from brainage_core.data.template import SUPPORTED_RESOLUTIONS

#: Kinds of age effect: three shape changes (the defaults) and two intensity-only effects
#: (the earlier generator's atrophy and thinning, kept as options).
EFFECT_KINDS = (
    "ventricle_expansion",
    "atrophy",
    "cortical_thinning",
    "atrophy_intensity",
    "cortical_thinning_intensity",
)

#: Functional forms of an effect's time course.
EFFECT_FORMS = ("linear", "quadratic", "sigmoid")

#: Years after onset at which an effect reaches its ``strength`` (``h(1) = 1``).
AGE_SPAN = 40.0

#: Default smoothing (mm) of each kind: the expansion field's Gaussian, or the soft edge of
#: the thinned or blended regions (a shrinking structure keeps its sharp boundary).
DEFAULT_SMOOTHING_MM = {
    "ventricle_expansion": 6.0,
    "atrophy": 0.0,
    "cortical_thinning": 2.0,
    "atrophy_intensity": 2.0,
    "cortical_thinning_intensity": 2.0,
}

#: Largest volume or thickness fraction an effect may remove (a structure never vanishes).
MAX_FRACTION = 0.9

#: Cortical regions thinned by default (frontal, insular and superior temporal cortex, where
#: grey matter declines most with age).
DEFAULT_CORTICAL_REGIONS = (
    "Frontal Pole",
    "Superior Frontal Gyrus",
    "Middle Frontal Gyrus",
    "Precentral Gyrus",
    "Insular Cortex",
    "Superior Temporal Gyrus",
)


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class AgeEffect:
    """One age effect planted in atlas regions.

    Parameters
    ----------
    kind : {"ventricle_expansion", "atrophy", "cortical_thinning"}
        What ageing does to the regions (see the module docstring).
    regions : list of str
        Harvard–Oxford region name patterns (case-insensitive substrings, e.g.
        ``"Lateral Ventricle"``, ``"Hippocampus"``, ``"Left Putamen"``).
    strength : float
        The effect 40 years after onset: for ``ventricle_expansion`` the largest speed of
        the expansion flow (mm; about the largest displacement); for ``atrophy`` the
        fraction of the structure's volume lost; for ``cortical_thinning`` the fraction of
        the grey-matter ribbon's thickness lost; for the ``*_intensity`` kinds the fraction
        of tissue intensity blended toward CSF. Fractions are capped at 0.9 at any age.
    onset : float, default=40.0
        Biological age (years) at which the effect starts.
    form : {"linear", "quadratic", "sigmoid"}, default="linear"
        Time course ``h`` of the effect after onset.
    smoothing_mm : float or None, default=None
        Smoothing of the region (mm); None takes :data:`DEFAULT_SMOOTHING_MM` of the kind.
    """

    kind: str
    regions: list[str]
    strength: float
    onset: float = 40.0
    form: str = "linear"
    smoothing_mm: float | None = None

    def __post_init__(self) -> None:
        check_choice("effect kind", self.kind, EFFECT_KINDS)
        check_choice("effect form", self.form, EFFECT_FORMS)
        regions = [self.regions] if isinstance(self.regions, str) else self.regions
        if (
            not isinstance(regions, (list, tuple))
            or not regions
            or not all(isinstance(r, str) and r.strip() for r in regions)
        ):
            raise BrainAgeInputError(
                "'regions' of an age effect must be a non-empty list of region names; "
                f"{self.regions!r} was provided."
            )
        object.__setattr__(self, "regions", list(regions))
        check_positive("effect strength", self.strength)
        if self.kind != "ventricle_expansion" and self.strength >= 1:
            raise BrainAgeInputError(
                f"'effect strength' of a {self.kind} effect is a fraction (of volume, "
                f"thickness or tissue) and must be below 1; {self.strength!r} was provided."
            )
        if isinstance(self.onset, bool) or not isinstance(self.onset, (int, float)):
            raise BrainAgeInputError(
                f"'effect onset' must be a number; {self.onset!r} was provided."
            )
        if self.smoothing_mm is not None:
            check_positive("effect smoothing_mm", self.smoothing_mm, allow_zero=True)

    @property
    def sigma_mm(self) -> float:
        """Smoothing in mm (the kind's default when ``smoothing_mm`` is None)."""
        if self.smoothing_mm is None:
            return DEFAULT_SMOOTHING_MM[self.kind]
        return float(self.smoothing_mm)

    def profile(self, biological_age: float | np.ndarray) -> np.ndarray:
        """Time course ``h((b - onset) / AGE_SPAN)``: 0 before onset, 1 at 40 years after."""
        t = np.maximum((np.asarray(biological_age, dtype=float) - self.onset) / AGE_SPAN, 0.0)
        if self.form == "linear":
            return t
        if self.form == "quadratic":
            return t**2
        logistic = special.expit(8.0 * (t - 0.5))
        lo, hi = special.expit(-4.0), special.expit(4.0)
        return (logistic - lo) / (hi - lo)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AgeEffect:
        """Build an effect from a mapping, with a clear error on unknown keys."""
        if isinstance(d, AgeEffect):
            return d
        if not isinstance(d, Mapping):
            raise BrainAgeInputError(f"an age effect must be a mapping; {d!r} was provided.")
        _check_keys("effects[]", d, [f.name for f in dataclasses.fields(cls)])
        missing = [k for k in ("kind", "regions", "strength") if k not in d]
        if missing:
            raise BrainAgeInputError(f"age effect {dict(d)!r} lacks the key(s) {missing}.")
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form (JSON/YAML-serialisable) that :meth:`from_dict` reads back."""
        return {
            "kind": self.kind,
            "regions": list(self.regions),
            "strength": float(self.strength),
            "onset": float(self.onset),
            "form": self.form,
            "smoothing_mm": None if self.smoothing_mm is None else float(self.smoothing_mm),
        }


def default_effects() -> list[AgeEffect]:
    """The default ageing: ventricles, hippocampi and frontal/insular/temporal cortex.

    The strengths are balanced so that a CNN trained on the default cohort relies on each
    effect (measured with :mod:`brainage_core.analysis.reliance`: about 40 % ventricles, 20 %
    hippocampi, 40 % cortex). With a stronger expansion (5 mm) the ventricles alone
    carried about 80 % of the prediction, and the cortex was close to invisible to it.
    """
    return [
        AgeEffect(
            "ventricle_expansion", ["Lateral Ventricle"], strength=2.5, onset=30.0, form="quadratic"
        ),
        AgeEffect("atrophy", ["Hippocampus"], strength=0.3, onset=40.0, form="linear"),
        AgeEffect(
            "cortical_thinning",
            list(DEFAULT_CORTICAL_REGIONS),
            strength=0.3,
            onset=40.0,
            form="linear",
        ),
    ]


@dataclass(frozen=True)
class SynthConfig:
    """Parameters of a synthetic cohort.

    Parameters
    ----------
    n_subjects : int, default=200
        Number of subjects.
    resolution : int, default=2
        Grid spacing in mm (the template grid of that resolution).
    render_resolution : int, default=2
        Spacing (mm) of the fine grid the ageing is planted on and the images are rendered
        at before they are averaged onto the study grid (partial volume); see
        :func:`render_grid`. 1 is the most faithful and about 8 times slower.
    seed : int, default=0
        Seed of every random draw.
    age_min, age_max : float, default=45.0, 82.0
        Range of the uniform chronological age (years).
    sigma_gap : float, default=3.0
        Standard deviation of the brain-age gap of controls (years).
    accelerated_fraction : float, default=0.15
        Probability that a subject belongs to the accelerated-ageing group.
    accelerated_gap_mean : float, default=6.0
        Mean gap of the accelerated group (years).
    accelerated_gap_sd : float or None, default=None
        Standard deviation of its gap; None means ``sigma_gap``.
    male_fraction : float, default=0.5
        Probability that a subject is male.
    regional_sd : float, default=5.0
        Standard deviation (years) of each effect's regional age offset ``delta_k``
        (regional heterogeneity of ageing; 0 makes every region age at ``b``).
    effects : list of AgeEffect, default=default_effects()
        The planted ageing.
    nuisance_scale : float, default=1.0
        Multiplies every nuisance amplitude below; 0 switches nuisance off.
    deformation_mm : float, default=3.0
        Standard deviation (mm, per axis) of the coarse smooth random deformation
        (individual anatomy left after affine registration).
    deformation_spacing_mm : float, default=32.0
        Spacing (mm) of the control points of the coarse deformation and the bias field.
    local_deformation_mm : float, default=2.0
        Standard deviation (mm, per axis) of the local deformation (individual folding).
    local_deformation_spacing_mm : float, default=12.0
        Spacing (mm) of its control points.
    head_size_sd : float, default=0.03
        Relative standard deviation of head size (linear scale).
    head_size_sex_difference : float, default=0.04
        Males' mean linear head size exceeds females' by this fraction.
    rotation_deg : float, default=2.0
        Standard deviation of each misregistration rotation angle (degrees).
    translation_mm : float, default=2.0
        Standard deviation of each misregistration translation (mm).
    bias_field_sd : float, default=0.08
        Standard deviation of the log bias field.
    contrast_sd : float, default=0.1
        Standard deviation of the log of the contrast exponent (gamma).
    scale_sd : float, default=0.1
        Standard deviation of the log global intensity scale.
    noise_sd : float, default=0.02
        Standard deviation of the Gaussian noise (template intensities lie in [0, 1]).
    ground_truth_threshold : float, default=0.02
        Smallest noise-free intensity change between ``b = age_min`` and ``b = age_max``
        for a voxel to count as carrying age signal.
    native_space : dict or None, default=None
        None writes the images in MNI space (on the study grid). A mapping (``{}`` for the
        defaults) writes them as a scanner would, in a native space with a random rigid
        head pose, another voxel size, field of view and orientation code, the transform
        recorded in the ground truth (see
        :class:`~brainage_core.data.synth.native.NativeSpace`); prepare them with
        registration (``data.register: true``, ``prepare --register``).
    """

    n_subjects: int = 200
    resolution: int = 2
    render_resolution: int = 2
    seed: int = 0
    age_min: float = 45.0
    age_max: float = 82.0
    sigma_gap: float = 3.0
    accelerated_fraction: float = 0.15
    accelerated_gap_mean: float = 6.0
    accelerated_gap_sd: float | None = None
    male_fraction: float = 0.5
    regional_sd: float = 5.0
    effects: list[AgeEffect] = field(default_factory=default_effects)
    nuisance_scale: float = 1.0
    deformation_mm: float = 3.0
    deformation_spacing_mm: float = 32.0
    local_deformation_mm: float = 2.0
    local_deformation_spacing_mm: float = 12.0
    head_size_sd: float = 0.03
    head_size_sex_difference: float = 0.04
    rotation_deg: float = 2.0
    translation_mm: float = 2.0
    bias_field_sd: float = 0.08
    contrast_sd: float = 0.1
    scale_sd: float = 0.1
    noise_sd: float = 0.02
    ground_truth_threshold: float = 0.02
    native_space: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        check_positive("n_subjects", self.n_subjects, integer=True)
        check_choice("resolution", self.resolution, SUPPORTED_RESOLUTIONS)
        check_choice("render_resolution", self.render_resolution, SUPPORTED_RESOLUTIONS)
        check_positive("seed", self.seed, integer=True, allow_zero=True)
        check_positive("age_min", self.age_min)
        check_positive("age_max", self.age_max)
        if self.age_max <= self.age_min:
            raise BrainAgeInputError(
                f"'age_max' must exceed 'age_min' ({self.age_min!r}); {self.age_max!r} "
                "was provided."
            )
        check_positive("sigma_gap", self.sigma_gap, allow_zero=True)
        check_fraction("accelerated_fraction", self.accelerated_fraction)
        if isinstance(self.accelerated_gap_mean, bool) or not isinstance(
            self.accelerated_gap_mean, (int, float)
        ):
            raise BrainAgeInputError(
                f"'accelerated_gap_mean' must be a number; {self.accelerated_gap_mean!r} "
                "was provided."
            )
        if self.accelerated_gap_sd is not None:
            check_positive("accelerated_gap_sd", self.accelerated_gap_sd, allow_zero=True)
        check_fraction("male_fraction", self.male_fraction, allow_one=True)
        check_positive("regional_sd", self.regional_sd, allow_zero=True)
        if isinstance(self.effects, (str, bytes)) or not isinstance(self.effects, Sequence):
            raise BrainAgeInputError(
                f"'effects' must be a list of age effects; {self.effects!r} was provided."
            )
        object.__setattr__(self, "effects", [AgeEffect.from_dict(e) for e in self.effects])
        for name in _NUISANCE_FIELDS + ("ground_truth_threshold",):
            check_positive(name, getattr(self, name), allow_zero=True)
        native = NativeSpace.from_dict(self.native_space)
        object.__setattr__(self, "native_space", None if native is None else native.to_dict())
        for name in ("deformation_spacing_mm", "local_deformation_spacing_mm"):
            if getattr(self, name) <= 0:
                raise BrainAgeInputError(
                    f"'{name}' must be positive; {getattr(self, name)!r} was provided."
                )

    @property
    def gap_sd_accelerated(self) -> float:
        """Standard deviation of the accelerated group's gap."""
        if self.accelerated_gap_sd is None:
            return float(self.sigma_gap)
        return float(self.accelerated_gap_sd)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> SynthConfig:
        """Build a config from a mapping (e.g. the ``data.synthetic`` section).

        Missing keys take their defaults; unknown keys raise a
        :class:`~brainage_core._utils.validation.BrainAgeInputError` naming them.
        """
        d = {} if d is None else d
        if not isinstance(d, Mapping):
            raise BrainAgeInputError(
                f"the synthetic-cohort config must be a mapping; {d!r} was provided."
            )
        _check_keys("data.synthetic", d, [f.name for f in dataclasses.fields(cls)])
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form (JSON/YAML-serialisable) that :meth:`from_dict` reads back."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["effects"] = [e.to_dict() for e in self.effects]
        if out["native_space"] is None:  # MNI space: the cohorts (and hashes) of before
            del out["native_space"]
        return out


_NUISANCE_FIELDS = (
    "nuisance_scale",
    "deformation_mm",
    "local_deformation_mm",
    "head_size_sd",
    "head_size_sex_difference",
    "rotation_deg",
    "translation_mm",
    "bias_field_sd",
    "contrast_sd",
    "scale_sd",
    "noise_sd",
)


def _check_keys(section: str, d: Mapping[str, Any], allowed: Sequence[str]) -> None:
    unknown = sorted(set(d) - set(allowed))
    if unknown:
        raise BrainAgeInputError(
            f"unknown key(s) {unknown} in '{section}'; allowed keys are {list(allowed)}."
        )
