"""Tests of the map scores on constructed cases."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from helpers.maps import RegionPredictor, make_data

from brainage_core._utils.validation import BrainAgeInputError
from brainage_core.analysis.faithfulness import (
    budget_faithfulness,
    deletion_auc,
    deletion_curve,
    faithfulness,
)
from brainage_core.analysis.localisation import (
    age_correlation_map,
    core_truth,
    coverage_regions,
    localisation_auroc,
    planted_in_top,
    planted_ranks,
    rank_correlation,
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


# -- like-for-like faithfulness, deletion toward a reference, truth variants, ceiling --------
def _replace_mean(reference, brain):
    from brainage_core.explain.noise.perturbations import PerturbationParams, replace_mean

    mask = torch.as_tensor(brain, dtype=torch.float32)[None, None]

    def perturb(x, b, generator):
        return replace_mean(x, b, mask, reference, PerturbationParams(), generator)

    return perturb


def test_budget_faithfulness_orders_learned_permuted_inverted():
    data = make_data(12, seed=3)
    predictor = RegionPredictor(data.truth)
    x = data.images[:6]
    reference = data.images.mean(0, keepdim=True)
    # a budget spread over [0, 1]; the correct map puts its lowest values on the region
    # the predictor reads (1/8 of the brain), the permuted map ~0.5 there, inverted ~0.94
    b = np.random.default_rng(0).random(data.truth.shape) * data.brain
    budget = torch.as_tensor(b, dtype=torch.float32)[None, None].expand_as(x).clone()
    correct = torch.as_tensor(data.truth, dtype=torch.float32)[None, None].expand_as(x)
    correct = correct + 0.01 * torch.rand(x.shape, generator=torch.Generator().manual_seed(1))
    shifts = budget_faithfulness(
        predictor, x, correct, budget, _replace_mean(reference, data.brain), data.brain, n_draws=3
    )
    assert shifts["learned"] < 0.5 * shifts["permuted"]
    assert shifts["inverted"] > 1.5 * shifts["permuted"]
    assert shifts["learned_ratio"] == pytest.approx(shifts["learned"] / shifts["permuted"])
    # any method's map is scored on the same budget: an inverted map swaps the two ends
    swapped = budget_faithfulness(
        predictor, x, -correct, budget, _replace_mean(reference, data.brain), data.brain, n_draws=3
    )
    assert swapped["learned"] == pytest.approx(shifts["inverted"], rel=1e-5)
    assert swapped["inverted"] == pytest.approx(shifts["learned"], rel=1e-5)


def test_deletion_and_insertion_toward_a_reference(data):
    predictor = RegionPredictor(data.truth)
    x = data.images[:2]
    imp = torch.as_tensor(data.truth, dtype=torch.float32)[None, None].expand_as(x)
    # deleting toward the image itself deletes nothing
    same = deletion_curve(predictor, x, imp, data.brain, steps=4, reference=x)
    assert same["change"].abs().max() < 1e-4
    reference = torch.full((1, 1, *x.shape[2:]), 0.5)
    deletion = deletion_curve(predictor, x, imp, data.brain, steps=4, reference=reference)
    insertion = deletion_curve(
        predictor, x, imp, data.brain, steps=4, reference=reference, insertion=True
    )
    # the region read is the top 1/8 of the brain: deleting it first moves the prediction
    # at the first step; inserting it first restores the prediction at the first step
    assert deletion["change"].iloc[1] > 1.0
    assert insertion["change"].iloc[0] > 1.0
    assert insertion["change"].iloc[1] < 1e-3
    assert insertion["change"].iloc[-1] < 1e-4


def test_core_truth_and_rank_correlation():
    truth = np.zeros((6, 6, 6), bool)
    truth[1:5, 1:5, 1:5] = True
    strength = np.where(truth, 0.2, 0.0)
    strength[1, 1:5, 1:5] = 0.01  # a weak tail
    positives, scored = core_truth(truth, strength, 0.05)
    assert positives.sum() == 48 and (~scored).sum() == 16
    assert not (positives & ~scored).any()
    assert rank_correlation(strength, strength) == pytest.approx(1.0)
    assert rank_correlation(-strength, strength) == pytest.approx(-1.0)
    with pytest.raises(BrainAgeInputError, match="'strength'"):
        core_truth(truth, strength[:3], 0.05)


def test_age_correlation_map_finds_the_planted_region():
    data = make_data(40, seed=5)
    ceiling = age_correlation_map(data.images[:, 0].numpy(), data.ages.numpy(), data.brain, chunk=7)
    assert localisation_auroc(ceiling, data.truth, data.brain) > 0.99
    assert ceiling.min() >= 0 and ceiling.max() <= 1
    assert ceiling[data.truth].mean() > 0.9
    with pytest.raises(BrainAgeInputError, match="same number"):
        age_correlation_map(data.images[:, 0].numpy(), data.ages.numpy()[:5])


def test_coverage_regions_and_planted_in_top():
    from helpers.maps import make_atlas

    atlas = make_atlas()
    atlas.names[1], atlas.names[2] = "Left Thing", "Right Thing"
    truth = np.isin(atlas.labels, [1, 2])
    truth[atlas.labels == 3] = (
        np.arange((atlas.labels == 3).sum()) < 0.3 * (atlas.labels == 3).sum()
    )
    regions = coverage_regions(truth, atlas, share=0.5)
    assert list(regions) == ["Thing"]  # merged hemispheres, the 30 % region left out
    assert coverage_regions(truth, atlas, share=0.25)["Region C"] == pytest.approx(0.3, abs=0.02)
    table = pd.DataFrame({"rank": [1, 2, 3, 4], "name": ["A", "Thing", "B", "C"]})
    assert planted_in_top(table, ["Thing"], 3)["all_in_top"]
    assert not planted_in_top(table, ["Thing", "C"], 3)["all_in_top"]
    assert planted_in_top(table, ["Missing"], 3)["ranks"] == {"Missing": None}


def test_relevance_rank_accuracy_known_answers(data, rng):
    from brainage_core.analysis.localisation import relevance_rank_accuracy

    truth, brain = data.truth, data.brain
    assert relevance_rank_accuracy(truth.astype(float), truth, brain) == 1.0
    assert relevance_rank_accuracy(-truth.astype(float), truth, brain) == 0.0
    # half of the planted voxels on top, then the rest of the brain: 0.5
    half = truth.astype(float)
    idx = np.flatnonzero(truth)
    half.ravel()[idx[: idx.size // 2]] = 2.0
    half.ravel()[idx[idx.size // 2 :]] = 0.0
    half[brain & ~truth] = 1.0
    assert relevance_rank_accuracy(half, truth, brain) == pytest.approx(0.5, abs=1 / idx.size)
    share = truth[brain].mean()
    assert relevance_rank_accuracy(rng.random(truth.shape), truth, brain) == pytest.approx(
        share, abs=0.1
    )


def test_noisy_linear_imputation_recovers_a_linear_field():
    from brainage_core.analysis.faithfulness import noisy_linear_imputation

    x = np.fromfunction(lambda i, j, k: i + 2 * j - k, (12, 12, 12)).astype(float)
    removed = np.zeros(x.shape, bool)
    removed[3:9, 3:9, 3:9] = True
    filled = noisy_linear_imputation(x, removed)
    np.testing.assert_allclose(filled, x, atol=0.05)  # harmonic: exact up to the solver
    assert np.array_equal(filled[~removed], x[~removed])
    noisy = noisy_linear_imputation(x, removed, noise_sd=0.5, rng=np.random.default_rng(0))
    assert 0.3 < np.std(noisy[removed] - x[removed]) < 0.7


def test_road_curve_ranks_the_truth_map_above_its_inverse(data):
    from brainage_core.analysis.faithfulness import road_curve

    predictor = RegionPredictor(data.truth)
    good = torch.from_numpy(data.truth.astype(np.float32)).expand_as(data.images)
    bad = 1.0 - good
    x = data.images[:2]
    kw = {"fractions": (0.1, 0.3, 0.5), "seed": 0}
    morf_good = deletion_auc(road_curve(predictor, x, good[:2], data.brain, **kw))
    morf_bad = deletion_auc(road_curve(predictor, x, bad[:2], data.brain, **kw))
    lerf_good = deletion_auc(
        road_curve(predictor, x, good[:2], data.brain, most_relevant_first=False, **kw)
    )
    assert morf_good > morf_bad
    # removing the unread voxels first leaves the prediction alone
    assert lerf_good < 0.1 * morf_good
    curve = road_curve(predictor, x, good[:2], data.brain, **kw)
    assert list(curve["fraction"]) == [0.0, 0.1, 0.3, 0.5]
