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


def test_prediction_runs_in_blocks_and_keeps_the_order(monkeypatch):
    # Issue 16, item 7: a 1 mm cohort's features do not fit in memory at once, so the
    # baseline predicts CHUNK subjects at a time; the ages are those of one whole pass,
    # in the order asked for (up to float32 rounding of a block's products).
    from brainage_core.models import baseline as baseline_mod

    cohort = FakeCohort(n=40, seed=3, noise=0.3)
    fitted = fit_ridge_baseline(cohort, factor=2)
    order = np.random.default_rng(0).permutation(40)
    whole = fitted.model.predict(fitted.features(cohort, order))
    calls = []
    real_features = fitted.features
    monkeypatch.setattr(baseline_mod, "CHUNK", 7)
    monkeypatch.setattr(fitted, "features",
                        lambda c, idx: calls.append(len(idx)) or real_features(c, idx))
    np.testing.assert_allclose(fitted.predict(cohort, order), whole, rtol=0, atol=1e-4)
    assert calls == [7, 7, 7, 7, 7, 5]


def test_baseline_needs_training_subjects():
    cohort = FakeCohort(n=10)
    with pytest.raises(BrainAgeInputError, match="split 'nope'"):
        fit_ridge_baseline(cohort, split="nope")
    with pytest.raises(BrainAgeInputError, match="'factor' must be a positive integer"):
        fit_ridge_baseline(cohort, factor=0)


@pytest.mark.parametrize(("factor", "form"), [(2, "dual"), (6, "primal")])
def test_torch_ridge_matches_scikit_learn(factor, form, monkeypatch):
    # Issue 16, item 7: the torch solver (float32 features, float64 products) picks
    # the same penalty as StandardScaler + RidgeCV and predicts the same ages. 36 training
    # subjects: 252 features at factor 2 (dual form), 12 at factor 6 (primal form).
    # Tolerance: 1e-3 years on the predictions (ages 45-82 y).
    from brainage_core.models import baseline as baseline_mod

    monkeypatch.setattr(baseline_mod, "TORCH_BLOCK_VALUES", 36 * 50)  # several blocks
    cohort = FakeCohort(n=60, seed=2, noise=0.3)
    reference = fit_ridge_baseline(cohort, factor=factor, solver="sklearn")
    fitted = fit_ridge_baseline(cohort, factor=factor, solver="torch", device="cpu")
    assert fitted.model.form == form
    assert fitted.alpha == reference.alpha
    np.testing.assert_allclose(fitted.predict(cohort), reference.predict(cohort), rtol=0,
                               atol=1e-3)
    # the default picks scikit-learn on the CPU
    assert not hasattr(fit_ridge_baseline(cohort, factor=factor).model, "form")


@pytest.mark.parametrize(("n", "p"), [(30, 80), (80, 30)])
def test_torch_ridge_leave_one_out_errors_and_weights_match_scikit_learn(n, p):
    from sklearn.linear_model import RidgeCV
    from sklearn.preprocessing import StandardScaler

    from brainage_core.models.baseline import DEFAULT_ALPHAS, fit_torch_ridge

    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, p)).astype(np.float32)
    x[:, 3] = 1.5  # a constant feature, scaled by 1 as StandardScaler does
    y = x[:, :5] @ rng.normal(size=5) * 5 + 60 + rng.normal(size=n)
    z = StandardScaler().fit_transform(x.astype(np.float64))
    ridge = RidgeCV(alphas=DEFAULT_ALPHAS, store_cv_results=True).fit(z, y)
    ours = fit_torch_ridge(x, y, DEFAULT_ALPHAS)
    assert ours.form == ("dual" if n <= p else "primal")
    # float32 standardisation, float64 products: measured at most 8.4e-8 relative on the
    # errors and 4.4e-8 of the largest weight on the weights
    np.testing.assert_allclose(ours.loo_mse, ridge.cv_results_.mean(0), rtol=1e-5)
    assert ours.alpha_ == ridge.alpha_
    np.testing.assert_allclose(ours.coef, ridge.coef_, rtol=0,
                               atol=1e-5 * np.abs(ridge.coef_).max())
    assert ours.intercept == pytest.approx(ridge.intercept_, abs=1e-9)
