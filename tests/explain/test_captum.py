"""Tests of the captum baselines."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.maps import RegionPredictor, make_data

from brainage_core._utils.validation import BrainAgeInputError
from brainage_core.explain.captum import METHODS, CaptumExplainer
from brainage_core.models.cnn import BrainAgeCNN

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data():
    return make_data(6, seed=0)


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    return BrainAgeCNN((16, 16, 16), channels=(2, 4), norm="instance").eval()


@pytest.mark.parametrize("method", METHODS)
def test_maps_are_input_shaped_masked_and_side_effect_free(method, data, cnn):
    cnn.train()
    explainer = CaptumExplainer(cnn, method, mask=data.brain, n_steps=4, window=4)
    x = data.images[:3].clone()
    out = explainer.attribute(x, batch_size=2)
    assert out.shape == x.shape and not out.requires_grad
    assert torch.isfinite(out).all() and float(out.min()) >= 0
    assert float(out.sum()) > 0
    assert torch.all(out[:, 0][:, ~torch.from_numpy(data.brain)] == 0)
    assert not x.requires_grad and torch.equal(x, data.images[:3])
    assert cnn.training and all(p.requires_grad for p in cnn.parameters())
    assert all(p.grad is None for p in cnn.parameters())
    hooks = [m._forward_hooks or m._backward_hooks or m._forward_pre_hooks for m in cnn.modules()]
    assert not any(hooks)
    # a leaf tensor that requires grad keeps its flag
    leaf = data.images[:1].clone().requires_grad_(True)
    explainer.attribute(leaf)
    assert leaf.requires_grad and leaf.grad is None


def test_integrated_gradients_do_not_depend_on_internal_batch_size(data, cnn):
    x = data.images[:2]
    small = CaptumExplainer(cnn, "integrated_gradients", n_steps=8, internal_batch_size=3)
    none = CaptumExplainer(cnn, "integrated_gradients", n_steps=8, internal_batch_size=None)
    assert torch.allclose(small.attribute(x), none.attribute(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["saliency", "integrated_gradients", "occlusion"])
def test_baselines_find_the_region_the_toy_predictor_reads(method, data):
    predictor = RegionPredictor(data.truth)
    explainer = CaptumExplainer(predictor, method, mask=data.brain, n_steps=4, window=2)
    out = explainer.attribute(data.images[:2]).mean(0)[0].numpy()
    assert out[data.truth].min() > out[~data.truth].max()


def test_repeated_runs_agree_and_errors_are_named(data, cnn):
    explainer = CaptumExplainer(cnn, "saliency")
    assert torch.equal(explainer.attribute(data.images[:2]), explainer.attribute(data.images[:2]))
    with pytest.raises(BrainAgeInputError, match="'method'"):
        CaptumExplainer(cnn, "lime")
    with pytest.raises(BrainAgeInputError, match="'inputs'"):
        explainer.attribute(torch.zeros(2, 16, 16))
    signed = CaptumExplainer(cnn, "saliency", absolute=False).attribute(data.images[:1])
    assert np.any(signed.numpy() < 0)
