"""Demographics of the synthetic cohort: ages, biological and regional ages, the oracle."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd
from scipy import special

from brainage_core.data.synth.config import SynthConfig

SUBJECT_STREAM = 1  # spawn_key (i, 1): nuisance of subject i; (i, 0): its demographics
_REGIONAL_STREAM = 2  # spawn_key (i, 2): its regional age offsets
_ORACLE_SAMPLES = 400_000


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
