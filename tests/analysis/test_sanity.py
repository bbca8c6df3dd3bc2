"""Tests of the sanity check (cascading randomisation) and of the robustness test."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.maps import make_data
from scipy import ndimage

from brainage_core.analysis.robustness import map_stability
from brainage_core.analysis.sanity import (
    cascading_randomisation,
    randomisation_levels,
    sanity_verdict,
    spearman_within,
)
from brainage_core.explain.captum import CaptumExplainer
from brainage_core.explain.reference import RandomMap
from brainage_core.models.cnn import BrainAgeCNN

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data():
    return make_data(4, seed=0)


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    return BrainAgeCNN((16, 16, 16), channels=(4, 8), norm="batch").eval()


class EdgeDetector:
    """A map of the image's edges: it never looks at the model."""

    def __init__(self, model=None):
        self.model = model

    def attribute(self, inputs, *, batch_size=4):
        x = inputs.numpy()
        out = np.stack([np.abs(ndimage.sobel(img[0], axis=0))[None] for img in x])
        return torch.from_numpy(out.astype(np.float32))


def test_levels_run_from_the_output_down_and_keep_norms_with_their_conv(cnn):
    levels = randomisation_levels(cnn)
    assert [name for name, _ in levels] == ["output", "features.1.0", "features.0.0"]
    assert levels[1][1] == ["features.1.0", "features.1.1"]


def test_sanity_check_flags_an_edge_detector_and_passes_saliency(cnn, data):
    before = {k: v.clone() for k, v in cnn.state_dict().items()}
    images = data.images[:2]
    edges = cascading_randomisation(cnn, EdgeDetector, images, data.brain)
    assert list(edges["level"]) == [0, 1, 2, 3]
    verdict = sanity_verdict(edges)
    assert verdict["sanity_spearman_all"] == pytest.approx(1.0)
    assert verdict["sanity_pass"] is False

    def saliency(model):
        return CaptumExplainer(model, "saliency", mask=data.brain)

    table = cascading_randomisation(cnn, saliency, images, data.brain)
    assert sanity_verdict(table)["sanity_pass"] is True
    assert table["spearman"].iloc[-1] < 0.5
    # the trained model itself is untouched
    assert all(torch.equal(before[k], v) for k, v in cnn.state_dict().items())


def test_spearman_within_and_map_stability(data, cnn):
    a = np.arange(16**3, dtype=float).reshape(16, 16, 16)
    assert spearman_within(a, a**3, data.brain) == pytest.approx(1.0)
    assert spearman_within(a, -a, data.brain) == pytest.approx(-1.0)
    assert np.isnan(spearman_within(a, np.ones_like(a), data.brain))
    images = data.images[:2]
    still = map_stability(EdgeDetector(), images, data.brain, noise_fraction=0.0)
    assert still == pytest.approx(1.0)
    saliency = CaptumExplainer(cnn, "saliency", mask=data.brain)
    small = map_stability(saliency, images, data.brain, noise_fraction=0.001)
    large = map_stability(saliency, images, data.brain, noise_fraction=0.3)
    assert 0.9 < small <= 1.0 and large < small
    # a random map has no stability at all
    assert abs(map_stability(RandomMap(data.brain), images, data.brain)) < 0.1
