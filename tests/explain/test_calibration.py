"""Tests of the lambda calibration."""

from __future__ import annotations

import pytest
import torch
from helpers.maps import RegionPredictor, make_data

from brainage_core._utils.validation import BrainAgeInputError
from brainage_core.explain.noise.amortised import NoiseMapExplainer
from brainage_core.explain.noise.calibration import calibrate_lambda

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def setup():
    data = make_data(24, seed=0)
    train = (data.images[:16], data.ages[:16])
    val = (data.images[16:], data.ages[16:])
    return data, RegionPredictor(data.truth), train, val


def run(setup, lambdas, tolerance):
    data, predictor, train, val = setup
    return calibrate_lambda(
        predictor,
        train,
        val,
        lambdas=lambdas,
        tolerance=tolerance,
        explainer_kwargs={"mask": data.brain, "channels": 2, "seed": 0, "s_max": 1.0},
        fit_kwargs={"epochs": 4, "lr": 1e-2},
        n_draws=4,
        progress=False,
    )


def test_chosen_lambda_meets_the_tolerance(setup):
    data, _, _, val = setup
    tolerance = 1.0
    result = run(setup, [100.0, 0.1, 1.0, 10.0], tolerance)
    curve = result.curve
    assert list(curve["lam"]) == [0.1, 1.0, 10.0, 100.0]  # sorted
    assert curve["chosen"].sum() == 1
    row = curve[curve["chosen"]].iloc[0]
    assert row["lam"] == result.lam
    assert row["shift"] <= tolerance
    # it is the largest admissible candidate, and the largest lambda breaks the tolerance
    assert not curve[curve["lam"] > result.lam]["within_tolerance"].any()
    assert curve["shift"].iloc[-1] > tolerance
    # more lambda, more noise
    assert curve["mean_sigma"].iloc[-1] > curve["mean_sigma"].iloc[0]
    # the returned explainer is the chosen one, and holds its tolerance on fresh noise draws
    assert result.explainer.noise.lam == result.lam
    fresh = result.explainer.evaluate(val, n_draws=8, seed_offset=7)
    assert fresh["shift"] <= 1.5 * tolerance
    assert result.explainer.attribute(data.images[:1]).shape == data.images[:1].shape


def test_unreachable_tolerance_warns_and_takes_the_smallest(setup):
    with pytest.warns(UserWarning, match="no lambda"):
        result = run(setup, [10.0, 100.0], 0.0)
    assert result.lam == 10.0


def test_bad_arguments(setup):
    data, predictor, train, val = setup
    with pytest.raises(BrainAgeInputError, match="'lam'"):
        calibrate_lambda(predictor, train, val, explainer_kwargs={"lam": 1.0})
    with pytest.raises(BrainAgeInputError, match="true age"):
        calibrate_lambda(
            predictor,
            train,
            data.images[16:],
            lambdas=[1.0],
            explainer_kwargs={"channels": 2, "target": "age"},
            fit_kwargs={"epochs": 1},
            progress=False,
        )


def test_candidates_start_from_the_same_weights(setup):
    """Without warm start, a candidate equals a noise model trained alone at its lambda."""
    data, predictor, train, val = setup
    result = run(setup, [0.3, 3.0], 1e9)  # every candidate admissible: the largest is kept
    alone = NoiseMapExplainer(predictor, lam=3.0, s_max=1.0, mask=data.brain, channels=2, seed=0)
    alone.fit(train, val, epochs=4, lr=1e-2, progress=False)
    for key, value in alone.noise_model.state_dict().items():
        torch.testing.assert_close(result.explainer.noise_model.state_dict()[key], value)


def test_calibration_works_without_ages_and_on_a_replacement(setup):
    data, predictor, train, val = setup
    result = calibrate_lambda(
        predictor,
        train,
        val[0],
        lambdas=[0.1, 10.0],
        tolerance=5.0,
        explainer_kwargs={"mask": data.brain, "channels": 2, "perturbation": "replace_mean"},
        fit_kwargs={"epochs": 3, "lr": 1e-2},
        progress=False,
    )
    assert result.curve["clean_mae"].isna().all()
    assert result.curve["shift"].notna().all()
    assert result.explainer.reference is not None
