"""A synthetic ageing cohort with known ground truth, built from the MNI152 template.

Every subject is the MNI152 2009 template (shipped in nilearn, so this works offline),
aged to a *biological* age and then given individual anatomy and scanner effects:

1. **Ages.** Chronological age ``a ~ U(age_min, age_max)``; biological age ``b = a + gap``
   with ``gap ~ N(0, sigma_gap)`` for controls and ``gap ~ N(accelerated_gap_mean,
   accelerated_gap_sd)`` for an accelerated-ageing group (a fraction
   ``accelerated_fraction`` of the subjects, a stand-in for a disease group).
2. **Ageing, driven by b, in template space.** Each :class:`AgeEffect` acts inside
   Harvard–Oxford atlas regions with a magnitude ``strength * h((b - onset) / 40)``, where
   ``h`` is ``t`` (linear), ``t**2`` (quadratic) or a logistic rescaled to ``h(0) = 0,
   h(1) = 1`` (sigmoid), and ``h = 0`` before onset. So ``strength`` is the effect 40 years
   after onset.

   - ``ventricle_expansion``: a real local expansion of the CSF spaces. The image is
     sampled at ``x + d_b(x)``, where ``d_b`` is the flow over the velocity ``m(b) u`` with
     ``u = grad(G_sigma * V) / max|grad(G_sigma * V)|`` for the region mask ``V``. Points
     move toward the ventricles, so the dark ventricles grow outward and push the tissue
     around them; the flow never folds. ``m = strength * h`` is in mm: the displacement of
     the fastest-moving point, for small ``m``.
   - ``atrophy``: tissue (grey and white matter) inside the regions is replaced by CSF
     intensity, ``I <- I + w (c_csf - I)`` with ``w = strength * h * tissue``; ``strength``
     is the fraction of tissue lost.
   - ``cortical_thinning``: the same partial-volume loss toward CSF, weighted by the
     grey-matter probability, in cortical regions.

   **Regional heterogeneity.** Regions do not age in lockstep: effect ``k`` of a subject
   is driven by its own regional age ``b_k = b + delta_k`` with ``delta_k ~ N(0,
   regional_sd)``, independent across effects and subjects. Each effect then carries
   information the others lack, so a predictor near the oracle must read all of them
   (with ``regional_sd = 0`` any single effect determines ``b``, and a model may read just
   the easiest one). The regional ages are ground truth, saved under ``derivatives/``.
   The voxels whose noise-free intensity changes between ``b = age_min`` and
   ``b = age_max`` (by more than ``ground_truth_threshold``) form the ground truth, saved
   under ``derivatives/ground_truth/``.
3. **Nuisance, independent of age.** A smooth random deformation (individual anatomy), head
   size with sex as a covariate, a small rigid misregistration, a smooth multiplicative bias
   field, a contrast change (gamma), a global intensity scale and Gaussian noise. All spatial
   transforms are composed into one coordinate map and the template is resampled once
   (trilinear). Images are skull-stripped (zero outside the subject's brain) and written on
   the template grid with the template's affine.

The oracle MAE, ``E|a - E[a | b_1..b_K]|``, is the error of the best possible predictor that
sees every regional age exactly (their mean is a sufficient statistic); it is computed by
Monte Carlo with the exact posterior mean and recorded in ``dataset_description.json``.

Output is deterministic for a seed: subject ``i`` draws from
``SeedSequence(seed, spawn_key=(i, ...))``, independent of the number of workers and of
``n_subjects``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage, special
from tqdm.auto import tqdm

from . import __version__
from ._io import remove_temporary_files, save_nifti, write_json, write_table
from ._validation import BrainAgeInputError, check_choice, check_fraction, check_positive
from ._workers import process_pool
from .atlas import ATLAS_NAME, load_atlas
from .template import SUPPORTED_RESOLUTIONS, Template, load_template

#: Kinds of age effect.
EFFECT_KINDS = ("ventricle_expansion", "atrophy", "cortical_thinning")

#: Functional forms of an effect's time course.
EFFECT_FORMS = ("linear", "quadratic", "sigmoid")

#: Years after onset at which an effect reaches its ``strength`` (``h(1) = 1``).
AGE_SPAN = 40.0

#: Default smoothing (mm) of each kind: the expansion field's Gaussian, or the soft edge of
#: the intensity effects' regions.
DEFAULT_SMOOTHING_MM = {"ventricle_expansion": 6.0, "atrophy": 2.0, "cortical_thinning": 2.0}

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

#: Largest deformation gradient of one integration step of an expansion flow (keeps every
#: step, hence the whole flow, invertible).
_MAX_STEP_STRAIN = 0.8

_SUBJECT_STREAM = 1  # spawn_key (i, 1): nuisance of subject i; (i, 0): its demographics
_REGIONAL_STREAM = 2  # spawn_key (i, 2): its regional age offsets
_ORACLE_SAMPLES = 400_000


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
        the expansion flow (mm; about the largest displacement), otherwise the fraction of
        tissue replaced by CSF.
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
        if self.kind != "ventricle_expansion" and self.strength > 1:
            raise BrainAgeInputError(
                f"'effect strength' of a {self.kind} effect is a fraction of tissue and must "
                f"be at most 1; {self.strength!r} was provided."
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
    effect (measured with :mod:`brainage_core.reliance`: about 40 % ventricles, 20 %
    hippocampi, 40 % cortex). With a stronger expansion (5 mm) the ventricles alone
    carried about 80 % of the prediction, and the cortex was close to invisible to it.
    """
    return [
        AgeEffect(
            "ventricle_expansion", ["Lateral Ventricle"], strength=2.5, onset=30.0, form="quadratic"
        ),
        AgeEffect("atrophy", ["Hippocampus"], strength=0.6, onset=40.0, form="linear"),
        AgeEffect(
            "cortical_thinning",
            list(DEFAULT_CORTICAL_REGIONS),
            strength=0.6,
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
    deformation_mm : float, default=1.5
        Standard deviation (mm) of the smooth random deformation (individual anatomy).
    deformation_spacing_mm : float, default=16.0
        Spacing (mm) of the control points of the random deformation and bias field.
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
    """

    n_subjects: int = 200
    resolution: int = 2
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
    deformation_mm: float = 1.5
    deformation_spacing_mm: float = 16.0
    head_size_sd: float = 0.03
    head_size_sex_difference: float = 0.04
    rotation_deg: float = 2.0
    translation_mm: float = 2.0
    bias_field_sd: float = 0.08
    contrast_sd: float = 0.1
    scale_sd: float = 0.1
    noise_sd: float = 0.02
    ground_truth_threshold: float = 0.02

    def __post_init__(self) -> None:
        check_positive("n_subjects", self.n_subjects, integer=True)
        check_choice("resolution", self.resolution, SUPPORTED_RESOLUTIONS)
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
        if self.deformation_spacing_mm <= 0:
            raise BrainAgeInputError(
                f"'deformation_spacing_mm' must be positive; {self.deformation_spacing_mm!r} "
                "was provided."
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
        :class:`~brainage_core._validation.BrainAgeInputError` naming them.
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
        return out


_NUISANCE_FIELDS = (
    "nuisance_scale",
    "deformation_mm",
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


# --------------------------------------------------------------------------- demographics


def draw_participants(config: SynthConfig) -> pd.DataFrame:
    """Draw the participants table: ages, sex, gap, biological age and group.

    Subject ``i`` draws from its own seed, so the first subjects of a larger cohort equal
    those of a smaller one.

    Returns
    -------
    pandas.DataFrame
        Columns ``participant_id, age, sex, gap, biological_age, group`` (the public
        table) and ``regional_age_1 .. regional_age_K``, the age driving each effect
        (ground truth).
    """
    width = max(4, len(str(config.n_subjects)))
    rows = []
    for i in range(config.n_subjects):
        rng = np.random.default_rng(np.random.SeedSequence(config.seed, spawn_key=(i, 0)))
        age = rng.uniform(config.age_min, config.age_max)
        male = rng.random() < config.male_fraction
        accelerated = rng.random() < config.accelerated_fraction
        z = rng.standard_normal()
        if accelerated:
            gap = config.accelerated_gap_mean + config.gap_sd_accelerated * z
        else:
            gap = config.sigma_gap * z
        rows.append(
            {
                "participant_id": f"sub-{i + 1:0{width}d}",
                "age": round(float(age), 3),
                "sex": "M" if male else "F",
                "gap": round(float(gap), 3),
                "biological_age": round(float(age) + round(float(gap), 3), 3),
                "group": "accelerated" if accelerated else "control",
                **regional_ages(config, i, round(float(age) + round(float(gap), 3), 3)),
            }
        )
    return pd.DataFrame(rows)


def regional_ages(config: SynthConfig, index: int, biological_age: float) -> dict[str, float]:
    """The regional ages ``b + delta_k`` of subject ``index``, one per effect.

    Drawn from the subject's own seed stream, so they do not shift the demographics or
    the nuisance of any subject.
    """
    rng = np.random.default_rng(
        np.random.SeedSequence(config.seed, spawn_key=(index, _REGIONAL_STREAM))
    )
    offsets = config.regional_sd * rng.standard_normal(len(config.effects))
    return {
        regional_age_column(k): round(float(biological_age + d), 3) for k, d in enumerate(offsets)
    }


def regional_age_column(k: int) -> str:
    """Name of the participants-table column of effect ``k`` (0-based)'s regional age."""
    return f"regional_age_{k + 1}"


#: Columns of the public ``participants.tsv``.
PARTICIPANT_COLUMNS = ("participant_id", "age", "sex", "gap", "biological_age", "group")


# --------------------------------------------------------------------------- oracle


def oracle_mae(config: SynthConfig, *, n_samples: int = _ORACLE_SAMPLES) -> float:
    """Irreducible error of a predictor that reads every regional age ``b_k`` exactly.

    With ``b_k = a + gap + delta_k`` and ``K`` effects, the mean regional age
    ``m = a + gap + mean(delta)`` is a sufficient statistic, and ``m - a`` is the gap
    mixture with each component's variance raised by ``regional_sd**2 / K``. Ages, gaps and
    offsets are drawn from the generative model (Monte Carlo); the posterior mean
    ``E[a | m]`` is exact: with a uniform age prior, ``a | m`` is a mixture of normals
    truncated to ``[age_min, age_max]``.

    Parameters
    ----------
    config : SynthConfig
        The cohort's parameters.
    n_samples : int, default=400000
        Monte-Carlo sample size (standard error about 0.005 years).

    Returns
    -------
    float
        The oracle MAE in years.
    """
    rng = np.random.default_rng(np.random.SeedSequence(config.seed, spawn_key=(2**32,)))
    a0, a1 = float(config.age_min), float(config.age_max)
    age = rng.uniform(a0, a1, n_samples)
    accelerated = rng.random(n_samples) < config.accelerated_fraction
    z = rng.standard_normal(n_samples)
    gap = np.where(
        accelerated,
        config.accelerated_gap_mean + config.gap_sd_accelerated * z,
        config.sigma_gap * z,
    )
    regional_var = config.regional_sd**2 / max(len(config.effects), 1)
    b = age + gap + np.sqrt(regional_var) * rng.standard_normal(n_samples)
    components = [(1.0 - config.accelerated_fraction, 0.0, config.sigma_gap)]
    if config.accelerated_fraction > 0:
        components.append(
            (config.accelerated_fraction, config.accelerated_gap_mean, config.gap_sd_accelerated)
        )
    components = [(w, m, float(np.sqrt(sd**2 + regional_var))) for w, m, sd in components]
    return float(np.mean(np.abs(age - posterior_mean_age(b, a0, a1, components))))


def posterior_mean_age(
    b: np.ndarray, age_min: float, age_max: float, components: Iterable[tuple[float, float, float]]
) -> np.ndarray:
    """``E[a | b]`` for ``a ~ U(age_min, age_max)`` and ``b - a`` a Gaussian mixture.

    Parameters
    ----------
    b : numpy.ndarray
        Biological ages.
    age_min, age_max : float
        Range of the uniform age prior.
    components : iterable of (weight, mean, sd)
        The gap's mixture components.
    """
    b = np.asarray(b, dtype=float)
    numerator = np.zeros_like(b)
    denominator = np.zeros_like(b)
    for weight, mean, sd in components:
        sd = max(float(sd), 1e-9)
        centre = b - mean  # a | b, component k: N(b - mean, sd) truncated to the age range
        alpha, beta = (age_min - centre) / sd, (age_max - centre) / sd
        mass = special.ndtr(beta) - special.ndtr(alpha)
        shift = sd * (_normal_pdf(alpha) - _normal_pdf(beta))  # = mass * (E - centre)
        numerator += weight * (mass * centre + shift)
        denominator += weight * mass
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_age = numerator / denominator
    return np.where(denominator > 0, mean_age, np.clip(b, age_min, age_max))


def _normal_pdf(x: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * x**2) / np.sqrt(2.0 * np.pi)


# --------------------------------------------------------------------------- ageing model


class AgeingModel:
    """The template, aged in template space: what every subject is made from.

    Parameters
    ----------
    config : SynthConfig
        The cohort's parameters (its resolution, effects and ground-truth threshold).
    effects : list of AgeEffect or None, default=None
        Effects to plant instead of ``config.effects`` (used for per-effect ground truth).

    Attributes
    ----------
    template : Template
        The template grid.
    csf_intensity : float
        Template intensity of CSF (median in the ventricles), the value atrophy tends to.
    region_names : list of list of str
        Atlas regions matched by each effect.
    """

    def __init__(self, config: SynthConfig, effects: list[AgeEffect] | None = None) -> None:
        self.config = config
        self.effects = list(config.effects if effects is None else effects)
        self.template: Template = load_template(config.resolution)
        atlas = load_atlas(config.resolution)
        t = self.template
        self.t1 = np.asarray(t.t1, dtype=np.float32)
        self.mask = t.mask.astype(np.float32)
        self.csf_intensity = float(np.median(t.t1[(t.csf > 0.9) & t.mask]))
        res = float(config.resolution)
        self.region_names = [atlas.region_names(e.regions) for e in self.effects]
        # (index of the effect, effect, ...): the index picks the effect's regional age.
        self._intensity: list[tuple[int, AgeEffect, np.ndarray]] = []
        self._expansion: list[tuple[int, AgeEffect, np.ndarray, float]] = []
        for k, effect in enumerate(self.effects):
            region = atlas.region_mask(effect.regions).astype(np.float32)
            if not region.any():
                raise BrainAgeInputError(
                    f"the regions {effect.regions} of a {effect.kind} effect have no voxels on "
                    f"the {config.resolution} mm grid; choose larger regions or a finer grid."
                )
            sigma = effect.sigma_mm / res
            if effect.kind == "ventricle_expansion":
                smooth = ndimage.gaussian_filter(region, sigma) if sigma > 0 else region
                grad = np.stack(np.gradient(smooth)).astype(np.float32)  # per voxel
                norm = max(float(np.sqrt((grad**2).sum(axis=0)).max()), 1e-12)
                # Velocity of unit top speed (1 mm per unit of strength), in voxels.
                velocity = grad / (norm * res)
                strain = np.sqrt(
                    sum((np.stack(np.gradient(velocity[k])) ** 2).sum(axis=0) for k in range(3))
                )
                self._expansion.append((k, effect, velocity, float(strain.max())))
            else:
                soft = ndimage.gaussian_filter(region, sigma) if sigma > 0 else region
                tissue = t.gm if effect.kind == "cortical_thinning" else t.gm + t.wm
                weight = np.clip(soft, 0, 1) * np.clip(tissue, 0, 1) * t.mask
                self._intensity.append((k, effect, weight.astype(np.float32)))
        if self._expansion:
            speed = sum(np.sqrt((v**2).sum(axis=0)) for _, _, v, _ in self._expansion)
            active = speed > 1e-3 * float(speed.max())
            self._active = ndimage.binary_dilation(active, iterations=1)

    def effect_ages(self, b: float | Sequence[float]) -> list[float]:
        """One age per effect: ``b`` for every effect, or the regional ages as given."""
        if np.ndim(b) == 0:
            return [float(b)] * len(self.effects)
        ages = [float(v) for v in b]
        if len(ages) != len(self.effects):
            raise BrainAgeInputError(
                f"{len(ages)} regional ages were given for {len(self.effects)} effects."
            )
        return ages

    def intensity(self, b: float | Sequence[float]) -> np.ndarray:
        """Template intensities with the intensity effects of biological age ``b``.

        ``b`` is one age for every effect, or one regional age per effect.
        """
        if not self._intensity:
            return self.t1
        ages = self.effect_ages(b)
        w = np.zeros_like(self.t1)
        for k, effect, weight in self._intensity:
            w += np.float32(effect.strength * float(effect.profile(ages[k]))) * weight
        np.clip(w, 0.0, 1.0, out=w)
        return self.t1 + w * (np.float32(self.csf_intensity) - self.t1)

    def expand(self, b: float | Sequence[float], coords: np.ndarray) -> np.ndarray:
        """Move template coordinates (voxels, ``(3, N)``) along the expansion flow at ``b``.

        The displacement is the flow of the velocity ``sum_k m_k(b) u_k`` over unit time,
        integrated with enough Euler steps that each step is invertible, so the deformation
        never folds however strong the effect. Points move toward the ventricles' centre, so
        sampling the template there makes the CSF spaces grow.
        """
        if not self._expansion:
            return coords
        ages = self.effect_ages(b)
        magnitudes = [e.strength * float(e.profile(ages[k])) for k, e, _, _ in self._expansion]
        strain = sum(m * lip for m, (_, _, _, lip) in zip(magnitudes, self._expansion, strict=True))
        if strain <= 0:
            return coords
        n_steps = int(np.ceil(strain / _MAX_STEP_STRAIN))
        idx = np.rint(coords).astype(np.intp)
        shape = np.array(self._active.shape)[:, None]
        inside = np.all((idx >= 0) & (idx < shape), axis=0)
        moving = np.flatnonzero(inside)[self._active[tuple(idx[:, inside])]]
        pts = coords[:, moving]
        for _ in range(n_steps):
            step = np.zeros_like(pts)
            for m, (_, _, velocity, _) in zip(magnitudes, self._expansion, strict=True):
                for k in range(3):
                    step[k] += (m / n_steps) * ndimage.map_coordinates(
                        velocity[k], pts, order=1, mode="nearest"
                    )
            pts = pts + step
        out = coords.copy()
        out[:, moving] = pts
        return out

    def sample(
        self, b: float | Sequence[float], coords: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Aged template and brain mask at voxel coordinates ``coords`` (shape ``(3, N)``).

        The expansion moves template coordinates ``z`` along its flow; intensities (with
        the intensity effects of ``b``) and the mask are then read there (trilinear).
        """
        coords = self.expand(b, coords)
        values = ndimage.map_coordinates(self.intensity(b), coords, order=1, cval=0.0)
        inside = ndimage.map_coordinates(self.mask, coords, order=1, cval=0.0)
        return values, inside

    def render(self, b: float | Sequence[float]) -> np.ndarray:
        """Noise-free aged template on the grid (no nuisance), zero outside the brain."""
        coords = np.indices(self.t1.shape, dtype=np.float64).reshape(3, -1)
        values, inside = self.sample(b, coords)
        return (values * (inside >= 0.5)).reshape(self.t1.shape).astype(np.float32)

    def change(self, b_lo: float, b_hi: float) -> np.ndarray:
        """Absolute noise-free intensity change between two biological ages."""
        return np.abs(self.render(b_hi) - self.render(b_lo))


# --------------------------------------------------------------------------- subjects


@dataclass(frozen=True)
class _Subject:
    index: int
    participant_id: str
    sex: str
    biological_age: float | tuple[float, ...]  # one age, or one regional age per effect
    path: str


class SubjectRenderer:
    """Draws a subject's nuisance and renders its image (the generator's workers use it).

    Parameters
    ----------
    model : AgeingModel
        The aged template the subjects are made from.

    Notes
    -----
    Subject ``index`` always draws the same nuisance (its own seed stream), whatever the
    ages it is rendered at. So :meth:`render_subject` can re-render a subject of a cohort
    with one effect aged differently: a counterfactual that changes nothing else.
    """

    def __init__(self, model: AgeingModel) -> None:
        self.model = model
        c = model.config
        self.config = c
        t = model.template
        self.affine = t.affine
        shape = np.array(t.shape)
        # Voxels that a (larger, shifted) subject brain may reach.
        margin = int(np.ceil(12.0 / c.resolution))
        support = ndimage.binary_dilation(t.mask, iterations=margin)
        self.support = support
        self.points = np.argwhere(support).T.astype(np.float64)  # (3, N) voxel indices
        self.centre = np.argwhere(t.mask).mean(axis=0)
        spacing = c.deformation_spacing_mm / c.resolution  # voxels between control points
        self._upsample = [_linear_weights(int(n), spacing) for n in shape]
        self.control_shape = tuple(w.shape[1] for w in self._upsample)

    def render(self, subject: _Subject) -> np.ndarray:
        """Image of a cohort subject, on the template grid."""
        return self.render_subject(subject.index, subject.sex, subject.biological_age)

    def render_subject(self, index: int, sex: str, ages: float | Sequence[float]) -> np.ndarray:
        """Image of subject ``index`` at biological age ``ages``.

        Parameters
        ----------
        index : int
            The subject's 0-based index in the cohort (it seeds the nuisance).
        sex : {"M", "F"}
            Sex (it sets the mean head size).
        ages : float or sequence of float
            One biological age for every effect, or one regional age per effect.

        Returns
        -------
        numpy.ndarray of float32
            The image on the template grid, zero outside the subject's brain.
        """
        c = self.config
        s = c.nuisance_scale
        rng = np.random.default_rng(
            np.random.SeedSequence(c.seed, spawn_key=(index, _SUBJECT_STREAM))
        )
        # Every draw happens whatever the amplitudes, so that the stream stays aligned.
        sex_sign = 0.5 if sex == "M" else -0.5
        log_size = s * (c.head_size_sex_difference * sex_sign + c.head_size_sd * rng.normal())
        angles = np.deg2rad(s * c.rotation_deg) * rng.normal(size=3)
        shift_mm = s * c.translation_mm * rng.normal(size=3)
        gamma = np.exp(s * c.contrast_sd * rng.normal())
        scale = np.exp(s * c.scale_sd * rng.normal())
        fields = self._smooth_fields(rng, 4)
        noise = rng.standard_normal(self.points.shape[1]).astype(np.float32)

        # Output voxel y -> template voxel z: rigid misregistration and head size about the
        # brain's centre, plus the smooth random deformation (in mm, converted to voxels).
        rot = _rotation(angles) / np.exp(log_size)
        y = self.points
        z = (rot @ (y - self.centre[:, None])) + self.centre[:, None]
        z += (shift_mm / c.resolution)[:, None]
        z += (s * c.deformation_mm / c.resolution) * fields[:3]
        values, inside = self.model.sample(ages, z)

        bias = np.exp(s * c.bias_field_sd * fields[3])
        values = scale * bias * np.power(np.clip(values, 0.0, None), gamma)
        values += (s * c.noise_sd) * noise
        values = np.clip(values, 0.0, None) * (inside >= 0.5)
        out = np.zeros(self.model.t1.shape, dtype=np.float32)
        out[self.support] = values
        return out

    def _smooth_fields(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` smooth unit-variance random fields at the support points.

        White noise on a coarse control grid, smoothed there and upsampled (separable
        trilinear interpolation) to the grid: cheap, and smooth on the scale of
        ``deformation_spacing_mm``.
        """
        coarse = rng.standard_normal((n,) + self.control_shape)
        out = np.empty((n, self.points.shape[1]), dtype=np.float64)
        wx, wy, wz = self._upsample
        for k in range(n):
            smooth = ndimage.gaussian_filter(coarse[k], 1.0, mode="nearest")
            smooth /= max(float(smooth.std()), 1e-6)
            fine = np.tensordot(wx, smooth, axes=(1, 0))
            fine = np.tensordot(fine, wy, axes=(1, 1))  # (X, cz, Y)
            fine = np.tensordot(fine, wz, axes=(1, 1))  # (X, Y, Z)
            out[k] = fine[self.support]
        return out

    def write(self, subject: _Subject) -> bool:
        """Render and save a subject unless a valid file exists; True if written."""
        path = Path(subject.path)
        if _valid_image(path, self.model.template):
            return False
        img = self.model.template.to_image(self.render(subject))
        img.set_data_dtype(np.int16)  # nibabel picks the scaling (scl_slope)
        save_nifti(img, path)
        return True


def _linear_weights(n: int, spacing: float) -> np.ndarray:
    """Matrix of linear interpolation from control points (spacing, offset 1) to ``n`` voxels."""
    pos = np.arange(n) / spacing + 1.0
    lo = np.floor(pos).astype(int)
    frac = pos - lo
    weights = np.zeros((n, int(lo.max()) + 2))
    weights[np.arange(n), lo] = 1.0 - frac
    weights[np.arange(n), lo + 1] = frac
    return weights


def _rotation(angles: np.ndarray) -> np.ndarray:
    """Rotation matrix from three angles (radians) about x, y and z."""
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _valid_image(path: Path, template: Template) -> bool:
    """True if ``path`` is a readable image on the template grid."""
    if not path.is_file():
        return False
    try:
        img = nib.load(path)
        ok = img.shape == template.shape and np.allclose(img.affine, template.affine)
        return bool(ok and np.isfinite(np.asarray(img.dataobj)).all())
    except Exception:  # noqa: BLE001 - any unreadable file is simply regenerated
        return False


_WORKER: SubjectRenderer | None = None


def _init_worker(renderer: SubjectRenderer) -> None:
    global _WORKER
    _WORKER = renderer


def _write_in_worker(subject: _Subject) -> bool:
    assert _WORKER is not None
    return _WORKER.write(subject)


# --------------------------------------------------------------------------- dataset


@dataclass(frozen=True, eq=False)
class GroundTruth:
    """Where a synthetic cohort carries planted age signal.

    Attributes
    ----------
    mask_img : nibabel.Nifti1Image
        Binary (uint8) mask of the voxels whose noise-free intensity changes with ``b``.
    strength_img : nibabel.Nifti1Image
        Continuous map: absolute intensity change between ``b = age_min`` and ``age_max``.
    effect_mask_imgs : dict of str to nibabel.Nifti1Image
        One mask per effect kind.
    effects : pandas.DataFrame
        ``effects.tsv``: one row per effect (kind, regions, matched_regions, strength, onset,
        form, smoothing_mm, n_voxels, volume_ml).
    oracle_mae : float
        The cohort's oracle MAE (years).
    regions : list of str
        Names of the atlas regions in which effects were planted.
    regional_ages : pandas.DataFrame or None
        ``regional_ages.tsv``: per participant, the age driving each effect
        (``regional_age_1 .. regional_age_K``, in the order of ``effects``); None for
        cohorts written before regional heterogeneity existed.
    """

    mask_img: nib.Nifti1Image
    strength_img: nib.Nifti1Image
    effect_mask_imgs: dict[str, nib.Nifti1Image]
    effects: pd.DataFrame
    oracle_mae: float
    regions: list[str]
    regional_ages: pd.DataFrame | None = None

    @property
    def mask(self) -> np.ndarray:
        """The mask as a boolean array."""
        return np.asarray(self.mask_img.dataobj) > 0


def generate_cohort(
    config: SynthConfig | Mapping[str, Any],
    out_dir: str | os.PathLike,
    *,
    n_jobs: int = 2,
    progress: bool = True,
) -> Path:
    """Generate a synthetic ageing cohort as a BIDS-like folder.

    Parameters
    ----------
    config : SynthConfig or mapping
        The cohort's parameters (a mapping goes through :meth:`SynthConfig.from_dict`).
    out_dir : str or os.PathLike
        Output folder. It must be empty, absent, or a cohort generated earlier with the
        same config, whose missing subjects are then generated (resumable).
    n_jobs : int, default=2
        Worker processes; the output does not depend on it.
    progress : bool, default=True
        Show a progress bar.

    Returns
    -------
    pathlib.Path
        ``out_dir``, holding ``dataset_description.json``, ``participants.tsv``,
        ``participants.json``, ``sub-XXXX/anat/sub-XXXX_T1w.nii.gz`` and
        ``derivatives/ground_truth/``.
    """
    if not isinstance(config, SynthConfig):
        config = SynthConfig.from_dict(config)
    check_positive("n_jobs", n_jobs, integer=True)
    out = Path(out_dir)
    _check_output_folder(out, config)
    model = AgeingModel(config)  # validates regions and strengths before anything is written
    oracle = oracle_mae(config)
    participants = draw_participants(config)

    out.mkdir(parents=True, exist_ok=True)
    remove_temporary_files(out)  # left by an interrupted run that is now resumed
    write_json(out / "dataset_description.json", _dataset_description(config, oracle))
    regional = [regional_age_column(k) for k in range(len(config.effects))]
    write_table(out / "participants.tsv", participants[list(PARTICIPANT_COLUMNS)])
    write_json(out / "participants.json", _PARTICIPANTS_SIDECAR)
    _write_ground_truth(out, model, oracle)
    write_table(
        out / "derivatives" / "ground_truth" / "regional_ages.tsv",
        participants[["participant_id", *regional]],
    )

    subjects = [
        _Subject(
            index=i,
            participant_id=row.participant_id,
            sex=row.sex,
            biological_age=tuple(float(participants.at[i, c]) for c in regional),
            path=os.fspath(out / row.participant_id / "anat" / f"{row.participant_id}_T1w.nii.gz"),
        )
        for i, row in enumerate(participants.itertuples(index=False))
    ]
    renderer = SubjectRenderer(model)
    quiet = {} if progress else {"disable": True}  # TQDM_DISABLE=1 silences it too
    bar = tqdm(total=len(subjects), desc="synthetic cohort", unit="subject", **quiet)
    with bar:
        if n_jobs == 1 or len(subjects) == 1:
            for subject in subjects:
                renderer.write(subject)
                bar.update()
        else:
            chunk = max(1, min(8, len(subjects) // (4 * n_jobs)))
            # Workers die with this process, even on SIGKILL (see _workers).
            with process_pool(n_jobs, initializer=_init_worker, initargs=(renderer,)) as pool:
                for _ in pool.map(_write_in_worker, subjects, chunksize=chunk):
                    bar.update()
    return out


def load_ground_truth(dataset_root: str | os.PathLike) -> GroundTruth:
    """Load the planted ground truth of a synthetic cohort.

    Parameters
    ----------
    dataset_root : str or os.PathLike
        Folder written by :func:`generate_cohort`.

    Returns
    -------
    GroundTruth
    """
    root = Path(dataset_root)
    gt = root / "derivatives" / "ground_truth"
    meta = _synthetic_metadata(root)
    for name in ("age_signal_mask.nii.gz", "age_signal_strength.nii.gz", "effects.tsv"):
        if not (gt / name).is_file():
            raise BrainAgeInputError("ground-truth file is missing.", gt / name)
    effects = pd.read_csv(gt / "effects.tsv", sep="\t")
    kind_masks = {
        kind: nib.load(gt / f"effect-{kind}_mask.nii.gz")
        for kind in dict.fromkeys(effects["kind"])
        if (gt / f"effect-{kind}_mask.nii.gz").is_file()
    }
    regions: list[str] = []
    for matched in effects["matched_regions"]:
        regions += [r for r in str(matched).split(";") if r and r not in regions]
    return GroundTruth(
        mask_img=nib.load(gt / "age_signal_mask.nii.gz"),
        strength_img=nib.load(gt / "age_signal_strength.nii.gz"),
        effect_mask_imgs=kind_masks,
        effects=effects,
        oracle_mae=float(meta["oracle_mae"]),
        regions=regions,
        regional_ages=(
            pd.read_csv(gt / "regional_ages.tsv", sep="\t")
            if (gt / "regional_ages.tsv").is_file()
            else None
        ),
    )


_PARTICIPANTS_SIDECAR = {
    "age": {"Description": "Chronological age", "Units": "years"},
    "sex": {"Description": "Sex", "Levels": {"M": "male", "F": "female"}},
    "gap": {
        "Description": "True brain-age gap (biological minus chronological age)",
        "Units": "years",
    },
    "biological_age": {
        "Description": "Biological age that drives the planted ageing",
        "Units": "years",
    },
    "group": {
        "Description": "Ageing group",
        "Levels": {"control": "normal ageing", "accelerated": "accelerated ageing"},
    },
}


def _dataset_description(config: SynthConfig, oracle: float) -> dict[str, Any]:
    return {
        "Name": "Synthetic ageing cohort (brainage_core)",
        "BIDSVersion": "1.9.0",
        "DatasetType": "raw",
        "License": "CC0 (synthetic); regions from the Harvard-Oxford atlas (FSL licence)",
        "GeneratedBy": [{"Name": "brainage_core.synth", "Version": __version__}],
        "SyntheticCohort": {
            "config": config.to_dict(),
            "oracle_mae": oracle,
            "atlas": ATLAS_NAME,
            "template": "MNI152 2009 (nilearn)",
            "age_span_years": AGE_SPAN,
        },
    }


def read_cohort_config(dataset_root: str | os.PathLike) -> SynthConfig:
    """The :class:`SynthConfig` a cohort was generated with (from its description).

    Raises
    ------
    BrainAgeInputError
        Naming ``dataset_description.json`` if it is missing, unreadable, or not that of
        a synthetic cohort.
    """
    root = Path(dataset_root)
    config = _synthetic_metadata(root).get("config")
    if not isinstance(config, Mapping):
        raise BrainAgeInputError(
            "the 'SyntheticCohort' entry has no 'config'.", root / "dataset_description.json"
        )
    return SynthConfig.from_dict(config)


def _synthetic_metadata(root: Path) -> dict[str, Any]:
    """The ``SyntheticCohort`` entry of a cohort's ``dataset_description.json``."""
    path = root / "dataset_description.json"
    meta = _read_description(path).get("SyntheticCohort")
    if not isinstance(meta, dict):
        raise BrainAgeInputError("not a synthetic cohort (no 'SyntheticCohort' entry).", path)
    return meta


def _read_description(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise BrainAgeInputError("dataset_description.json is missing.", path)
    try:
        desc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise BrainAgeInputError(f"cannot read the dataset description ({err}).", path) from err
    if not isinstance(desc, dict):
        raise BrainAgeInputError("the dataset description must be a JSON object.", path)
    return desc


def _check_output_folder(out: Path, config: SynthConfig) -> None:
    """Allow an absent or empty folder, or an earlier cohort with the same config."""
    if out.exists() and not out.is_dir():
        raise BrainAgeInputError("the output folder is a file.", out)
    if not out.exists() or not any(out.iterdir()):
        return
    desc_path = out / "dataset_description.json"
    hint = "Choose an empty or new folder."
    if not desc_path.is_file():
        raise BrainAgeInputError(f"the output folder is not empty and holds no cohort. {hint}", out)
    previous = _read_description(desc_path).get("SyntheticCohort")
    old = previous.get("config") if isinstance(previous, dict) else None
    new = json.loads(json.dumps(config.to_dict()))
    if old != new:
        differ = sorted(k for k in set(new) | set(old or {}) if (old or {}).get(k) != new.get(k))
        raise BrainAgeInputError(
            f"the output folder holds a different dataset (settings that differ: {differ}). {hint}",
            out,
        )


def _write_ground_truth(out: Path, model: AgeingModel, oracle: float) -> None:
    config = model.config
    template = model.template
    folder = out / "derivatives" / "ground_truth"
    b_lo, b_hi = float(config.age_min), float(config.age_max)
    threshold = config.ground_truth_threshold
    change = model.change(b_lo, b_hi)
    save_nifti(template.to_image(change, dtype=np.float32), folder / "age_signal_strength.nii.gz")
    save_nifti(
        template.to_image(change > threshold, dtype=np.uint8), folder / "age_signal_mask.nii.gz"
    )
    voxel_ml = config.resolution**3 / 1000.0
    rows = []
    kind_masks: dict[str, np.ndarray] = {}
    for effect, names in zip(model.effects, model.region_names, strict=True):
        single = AgeingModel(dataclasses.replace(config, effects=[effect]))
        mask = single.change(b_lo, b_hi) > threshold
        kind_masks[effect.kind] = kind_masks.get(effect.kind, np.zeros_like(mask)) | mask
        rows.append(
            {
                **effect.to_dict(),
                "regions": ";".join(effect.regions),
                "matched_regions": ";".join(names),
                "smoothing_mm": effect.sigma_mm,
                "n_voxels": int(mask.sum()),
                "volume_ml": float(mask.sum() * voxel_ml),
            }
        )
    for kind, mask in kind_masks.items():
        save_nifti(template.to_image(mask, dtype=np.uint8), folder / f"effect-{kind}_mask.nii.gz")
    columns = [
        "kind",
        "regions",
        "matched_regions",
        "strength",
        "onset",
        "form",
        "smoothing_mm",
        "n_voxels",
        "volume_ml",
    ]
    write_table(folder / "effects.tsv", pd.DataFrame(rows, columns=columns))
    write_json(
        folder / "dataset_description.json",
        {
            "Name": "Planted age signal (ground truth)",
            "BIDSVersion": "1.9.0",
            "DatasetType": "derivative",
            "GeneratedBy": [{"Name": "brainage_core.synth", "Version": __version__}],
            "BiologicalAgeRange": [b_lo, b_hi],
            "Threshold": threshold,
            "OracleMAE": oracle,
            "Atlas": ATLAS_NAME,
        },
    )
