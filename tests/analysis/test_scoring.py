"""Tests of the map scores on constructed cases."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from helpers.maps import RegionPredictor, make_data

from brainage_core._utils.validation import BrainAgeInputError
from brainage_core.analysis.faithfulness import deletion_auc, deletion_curve, faithfulness
from brainage_core.analysis.localisation import (
    localisation_auroc,
    planted_ranks,
    relevance_mass,
    truth_on_grid,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data():
    return make_data(4, seed=0)


def test_localisation_auroc_perfect_random_inverted(data, rng):
    truth, brain = data.truth, data.brain
    assert localisation_auroc(truth.astype(float), truth, brain) == 1.0
    assert localisation_auroc(-truth.astype(float), truth, brain) == 0.0
    random_map = rng.random(truth.shape)
    assert abs(localisation_auroc(random_map, truth, brain) - 0.5) < 0.06
    # voxels outside the brain are ignored: a huge value there changes nothing
    noisy = truth.astype(float)
    noisy[~brain] = 10.0
    assert localisation_auroc(noisy, truth, brain) == 1.0
    assert np.isnan(localisation_auroc(truth, truth, truth))


def test_relevance_mass(data):
    truth, brain = data.truth, data.brain
    assert relevance_mass(truth.astype(float), truth, brain) == 1.0
    uniform = relevance_mass(np.ones(truth.shape), truth, brain)
    assert uniform == pytest.approx(truth.sum() / brain.sum())
    with pytest.raises(BrainAgeInputError, match="non-negative"):
        relevance_mass(-np.ones(truth.shape), truth, brain)
    with pytest.raises(BrainAgeInputError, match="one grid"):
        relevance_mass(np.ones((3, 3, 3)), truth, brain)


def test_planted_ranks():
    table = pd.DataFrame(
        {
            "rank": [1, 2, 3, 4],
            "name": [
                "Left Hippocampus",
                "Right Hippocampus",
                "Left Putamen",
                "Right Lateral Ventricle",
            ],
        }
    )
    result = planted_ranks(table, ["hippocampus"])
    assert result["top"] and result["k"] == 2 and result["precision_at_k"] == 1.0
    assert result["ranks"] == {"Left Hippocampus": 1, "Right Hippocampus": 2}
    result = planted_ranks(table, ["Lateral Ventricle", "Putamen"])
    assert not result["top"] and result["precision_at_k"] == 0.0
    assert result["ranks"]["Right Lateral Ventricle"] == 4


def test_truth_on_grid_resamples_a_mask():
    fine = np.zeros((16, 16, 16), np.uint8)
    fine[4:12, 4:8, :] = 1
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    coarse_affine = affine.copy()
    coarse_affine[:3, :3] *= 2
    coarse_affine[:3, 3] = 1.0  # voxel centres of the coarse grid
    out = truth_on_grid(nib.Nifti1Image(fine, affine), coarse_affine, (8, 8, 8))
    expected = np.zeros((8, 8, 8), bool)
    expected[2:6, 2:4, :] = True
    assert out.dtype == bool and np.array_equal(out, expected)


def test_faithfulness_orders_map_random_inverted(data):
    predictor = RegionPredictor(data.truth)
    importance = torch.from_numpy(data.truth.astype(np.float32)).expand_as(data.images)
    scores = faithfulness(
        predictor, data.images, importance, data.brain, fraction=0.5, sigma=0.5, n_draws=2, seed=0
    )
    assert set(scores) == {"map", "random", "inverted"}
    # the truth map keeps the noise off the region the predictor reads
    assert scores["map"] < 1e-4
    assert scores["map"] < scores["random"] < scores["inverted"]


def test_deletion_curve_and_area(data):
    predictor = RegionPredictor(data.truth)
    good = torch.from_numpy(data.truth.astype(np.float32)).expand_as(data.images)
    bad = 1.0 - good
    curve = deletion_curve(predictor, data.images, good, data.brain, steps=8)
    assert list(curve.columns) == ["fraction", "change"]
    assert curve["fraction"].iloc[0] == 0.0 and curve["fraction"].iloc[-1] == 1.0
    assert curve["change"].iloc[0] == pytest.approx(0.0, abs=1e-4)
    worse = deletion_curve(predictor, data.images, bad, data.brain, steps=8)
    # both end with everything deleted, but the good map moves the prediction earlier
    assert curve["change"].iloc[-1] == pytest.approx(worse["change"].iloc[-1], rel=1e-5)
    assert deletion_auc(curve) > deletion_auc(worse) > 0
    flat = pd.DataFrame({"fraction": [0.0, 0.5, 1.0], "change": [2.0, 2.0, 2.0]})
    assert deletion_auc(flat) == pytest.approx(2.0)


def test_depth_matched_auroc_is_blind_to_a_depth_gradient():
    from scipy import ndimage

    from brainage_core.analysis.localisation import depth_matched_auroc, depth_profile

    brain = np.zeros((24, 24, 24), bool)
    brain[2:22, 2:22, 2:22] = True
    depth = ndimage.distance_transform_edt(brain)
    rng = np.random.default_rng(0)
    truth = brain & (depth >= 5) & (rng.random(brain.shape) < 0.5)  # deep planted voxels
    truth |= brain & (depth < 2) & (rng.random(brain.shape) < 0.2)  # and some at the edge
    depth_only = depth + 0.01 * rng.random(brain.shape)  # "deeper is more important"
    # The plain AUROC rewards the gradient; the depth-matched one sees chance.
    assert localisation_auroc(depth_only, truth, brain) > 0.6
    assert abs(depth_matched_auroc(depth_only, truth, brain) - 0.5) < 0.1
    assert depth_matched_auroc(truth.astype(float), truth, brain) == pytest.approx(1.0)
    table = depth_profile(depth_only, truth, brain, max_depth=6)
    assert list(table["depth"]) == [1, 2, 3, 4, 5, 6]
    assert table["n_voxels"].sum() == brain.sum()
    assert table["mean_importance"].is_monotonic_increasing
    assert table["planted_fraction"].iloc[-1] > 0.4 and table["planted_fraction"].iloc[2] == 0
    assert np.isnan(table["auroc_within"].iloc[2])  # no planted voxel at depth 3
