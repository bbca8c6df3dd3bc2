"""The per-image scores a sharded comparison gathers: a shard gives the whole set's rows.

Each image's random draws come from the seed and the image's position in the whole set,
so scoring every second image with its positions gives exactly those rows of the whole
set's scores (same draws; the forward passes in other batches may round differently,
hence the 1e-5 tolerance on values in years, measured 0).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.maps import RegionPredictor, make_data

from brainage_core._utils.torch import seeded
from brainage_core.analysis.faithfulness import (
    budget_faithfulness,
    budget_shifts,
    budget_summary,
    fixed_noise_shifts,
    road_changes,
    road_curve,
)
from brainage_core.analysis.robustness import stability_per_image
from brainage_core.analysis.sanity import cascade_spearman
from brainage_core.explain.captum import CaptumExplainer
from brainage_core.explain.noise.perturbations import PerturbationParams, replace_mean
from brainage_core.explain.reference import RandomMap
from brainage_core.models.cnn import BrainAgeCNN

torch.set_num_threads(1)

SHARD = [1, 3]  # the second process's share of 4 images on 2 processes


@pytest.fixture(scope="module")
def case():
    data = make_data(6, seed=2)
    x = data.images[:4]
    maps = torch.rand(x.shape, generator=torch.Generator().manual_seed(0))
    return data, x, maps, RegionPredictor(data.truth)


def _perturb(reference, brain):
    mask = torch.as_tensor(brain, dtype=torch.float32)[None, None]

    def perturb(x, b, generator):
        return replace_mean(x, b, mask, reference, PerturbationParams(), generator)

    return perturb


def test_random_draws_of_a_shard_are_the_whole_sets_rows(case):
    data, x, maps, predictor = case
    reference = data.images.mean(0, keepdim=True)
    budget = torch.rand(x.shape, generator=torch.Generator().manual_seed(1))
    perturb = _perturb(reference, data.brain)
    whole = budget_shifts(predictor, x, maps, budget, perturb, data.brain, n_draws=2)
    part = budget_shifts(predictor, x[SHARD], maps[SHARD], budget[SHARD], perturb,
                         data.brain, n_draws=2, positions=SHARD)
    np.testing.assert_allclose(part, whole[SHARD], rtol=0, atol=1e-5)
    # without the positions the shard's images would take the first images' draws
    moved = budget_shifts(predictor, x[SHARD], maps[SHARD], budget[SHARD], perturb,
                          data.brain, n_draws=2)
    assert not np.allclose(moved, whole[SHARD], rtol=0, atol=1e-3)
    summary = budget_summary(whole)
    assert summary == budget_faithfulness(predictor, x, maps, budget, perturb, data.brain,
                                          n_draws=2)
    assert summary["learned_ratio"] == pytest.approx(summary["learned"] / summary["permuted"])

    whole = fixed_noise_shifts(predictor, x, maps, data.brain, n_draws=2)
    part = fixed_noise_shifts(predictor, x[SHARD], maps[SHARD], data.brain, n_draws=2,
                              positions=SHARD)
    np.testing.assert_allclose(part, whole[SHARD], rtol=0, atol=1e-5)

    span = float(x.max() - x.min())
    whole = road_changes(predictor, x, maps, data.brain, fractions=(0.3, 0.6))
    part = road_changes(predictor, x[SHARD], maps[SHARD], data.brain, fractions=(0.3, 0.6),
                        positions=SHARD, intensity_range=span)
    np.testing.assert_allclose(part, whole[SHARD], rtol=0, atol=1e-5)
    curve = road_curve(predictor, x, maps, data.brain, fractions=(0.3, 0.6))
    assert list(curve["fraction"]) == [0.0, 0.3, 0.6]
    np.testing.assert_allclose(curve["change"][1:], whole.mean(0))
    with pytest.raises(Exception, match="'positions'"):
        road_changes(predictor, x, maps, data.brain, positions=[0])


def test_random_methods_give_a_shard_the_whole_sets_maps(case):
    data, x, _, _ = case
    torch.manual_seed(0)
    cnn = BrainAgeCNN(tuple(x.shape[2:]), channels=(2, 4), norm="batch").eval()
    # an unseeded random map draws from torch's generator: seeded per subject, it repeats
    with seeded(0, 3):
        a = RandomMap(data.brain, seed=None).attribute(x[:1])
    with seeded(0, 3):
        assert torch.equal(a, RandomMap(data.brain, seed=None).attribute(x[:1]))
    with seeded(0, 4):
        assert not torch.equal(a, RandomMap(data.brain, seed=None).attribute(x[:1]))
    for method in (RandomMap(data.brain, seed=None),
                   CaptumExplainer(cnn, "smoothgrad", mask=data.brain, n_samples=2)):
        whole = stability_per_image(method, x, data.brain)
        part = stability_per_image(method, x[SHARD], data.brain, positions=SHARD,
                                   intensity_range=float(x.max() - x.min()))
        np.testing.assert_allclose(part, whole[SHARD], rtol=0, atol=1e-6)

    def smoothgrad(model):
        return CaptumExplainer(model, "smoothgrad", mask=data.brain, n_samples=2)

    layers, whole = cascade_spearman(cnn, smoothgrad, x, data.brain, positions=range(4))
    shard_layers, part = cascade_spearman(cnn, smoothgrad, x[SHARD], data.brain,
                                          positions=SHARD)
    assert layers == shard_layers and whole.shape == (4, len(layers))
    np.testing.assert_allclose(part, whole[SHARD], rtol=0, atol=1e-6)
    # a process without images still builds every level's explainer (a collective refit)
    built = []
    none_layers, none = cascade_spearman(cnn, lambda m: built.append(m) or smoothgrad(m),
                                         x[:0], data.brain, positions=[])
    assert none.shape == (0, len(layers)) and len(built) == len(layers) + 1
