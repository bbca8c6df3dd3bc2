"""Tests of the ridge baseline: downsampling and recovery of a planted linear signal."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.predictor import FakeCohort

from brainage_core._utils.validation import BrainAgeInputError
from brainage_core.models.baseline import downsample, fit_ridge_baseline


def test_downsample_block_averages_and_pads():
    v = np.arange(4 * 4 * 2, dtype=np.float32).reshape(4, 4, 2)
    small = downsample(v, 2)
    assert small.shape == (2, 2, 1)
    assert small[0, 0, 0] == pytest.approx(v[:2, :2, :2].mean())
    stack = downsample(np.ones((3, 5, 4, 3)), 2)
    assert stack.shape == (3, 3, 2, 2)
    # Padding with zeros: a block half outside the grid averages to the covered fraction.
    assert stack[0, 2, 0, 0] == pytest.approx(0.5)
    assert stack[0, 0, 0, 1] == pytest.approx(0.5)


def test_ridge_recovers_a_planted_linear_signal():
    cohort = FakeCohort(n=60, seed=1, noise=0.02)
    # Replace the images by a purely linear function of age plus noise.
    rng = np.random.default_rng(0)
    age = cohort.table["age"].to_numpy()
    pattern = rng.normal(size=cohort.images.shape[1:])
    images = (age[:, None, None, None] - 60) / 10 * pattern + rng.normal(
        0, 0.5, (len(age), *pattern.shape))
    cohort.images = images.astype(np.float16)
    baseline = fit_ridge_baseline(cohort, factor=2)
    test = cohort.indices("test")
    mae = np.mean(np.abs(baseline.predict(cohort, test) - age[test]))
    assert mae < 1.5  # ages span 45-82 years: predicting the mean gives about 9
    chance = np.mean(np.abs(age[test] - age[cohort.indices("train")].mean()))
    assert mae < 0.2 * chance
    assert baseline.predict(cohort).shape == (60,)


def test_baseline_needs_training_subjects():
    cohort = FakeCohort(n=10)
    with pytest.raises(BrainAgeInputError, match="split 'nope'"):
        fit_ridge_baseline(cohort, split="nope")
    with pytest.raises(BrainAgeInputError, match="'factor' must be a positive integer"):
        fit_ridge_baseline(cohort, factor=0)
