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

from brainage_core.data.synth.ages import (
    PARTICIPANT_COLUMNS,
    draw_participants,
    oracle_mae,
    posterior_mean_age,
    regional_age_column,
    regional_ages,
)
from brainage_core.data.synth.cohort import (
    GroundTruth,
    generate_cohort,
    load_ground_truth,
    read_cohort_config,
)
from brainage_core.data.synth.config import (
    AGE_SPAN,
    EFFECT_FORMS,
    EFFECT_KINDS,
    AgeEffect,
    SynthConfig,
    default_effects,
)
from brainage_core.data.synth.render import AgeingModel, SubjectRenderer, SubjectSpec

__all__ = [
    "AGE_SPAN",
    "EFFECT_FORMS",
    "EFFECT_KINDS",
    "PARTICIPANT_COLUMNS",
    "AgeEffect",
    "AgeingModel",
    "GroundTruth",
    "SubjectRenderer",
    "SubjectSpec",
    "SynthConfig",
    "default_effects",
    "draw_participants",
    "generate_cohort",
    "load_ground_truth",
    "oracle_mae",
    "posterior_mean_age",
    "read_cohort_config",
    "regional_age_column",
    "regional_ages",
]
