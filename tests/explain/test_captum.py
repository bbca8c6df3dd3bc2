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


@pytest.mark.parametrize(
    "method",
    [
        "saliency",
        "smoothgrad",
        "input_x_gradient",
        "integrated_gradients",
        "gradient_shap",
        "deeplift",
        "guided_backprop",
        "lrp_epsilon",
        "lrp_alpha1_beta0",
        "occlusion",
    ],
)
def test_baselines_find_the_region_the_toy_predictor_reads(method, data):
    predictor = RegionPredictor(data.truth)
    reference = data.images.mean(0)  # path methods start from the mean image, not 0
    explainer = CaptumExplainer(
        predictor, method, mask=data.brain, n_steps=4, window=2, n_samples=4, baseline=reference
    )
    out = explainer.attribute(data.images[:2]).mean(0)[0].numpy()
    assert out[data.truth].min() > out[~data.truth].max()


def test_grad_cam_is_upsampled_onto_the_input_grid_without_the_padding(data):
    torch.manual_seed(0)
    odd = BrainAgeCNN((15, 14, 13), channels=(2, 4), norm="batch").eval()
    x = torch.rand(2, 1, 15, 14, 13)
    out = CaptumExplainer(odd, "grad_cam").attribute(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    # LRP on the same network conserves relevance up to the biases
    relevance = CaptumExplainer(odd, "lrp_epsilon", absolute=False).attribute(x)
    assert torch.isfinite(relevance).all() and float(relevance.abs().sum()) > 0


def test_an_image_baseline_is_used_and_checked(data):
    predictor = RegionPredictor(data.truth)
    x = data.images[:1]
    ig = CaptumExplainer(predictor, "integrated_gradients", n_steps=16, absolute=False)
    # completeness: the attributions sum to f(x) - f(baseline), for any baseline image
    reference = data.images[1:2]
    with_ref = CaptumExplainer(
        predictor, "integrated_gradients", n_steps=16, absolute=False, baseline=reference[0]
    )
    total = float(with_ref.attribute(x).sum())
    with torch.no_grad():
        expected = float(predictor(x) - predictor(reference))
        from_zero = float(predictor(x) - predictor(torch.zeros_like(x)))
    assert total == pytest.approx(expected, rel=1e-3, abs=1e-3)
    assert float(ig.attribute(x).sum()) == pytest.approx(from_zero, rel=1e-3)
    with pytest.raises(BrainAgeInputError, match="'baseline'"):
        CaptumExplainer(predictor, "occlusion", baseline=torch.zeros(4, 4, 4)).attribute(x)
    with pytest.raises(BrainAgeInputError, match="'baseline'"):
        CaptumExplainer(predictor, "occlusion", baseline="mean")


def test_repeated_runs_agree_and_errors_are_named(data, cnn):
    explainer = CaptumExplainer(cnn, "saliency")
    assert torch.equal(explainer.attribute(data.images[:2]), explainer.attribute(data.images[:2]))
    with pytest.raises(BrainAgeInputError, match="'method'"):
        CaptumExplainer(cnn, "lime")
    with pytest.raises(BrainAgeInputError, match="'inputs'"):
        explainer.attribute(torch.zeros(2, 16, 16))
    signed = CaptumExplainer(cnn, "saliency", absolute=False).attribute(data.images[:1])
    assert np.any(signed.numpy() < 0)


def test_folding_batch_norms_keeps_the_function():
    from brainage_core.explain.captum import _fold_batch_norms

    torch.manual_seed(0)
    model = BrainAgeCNN((16, 16, 16), channels=(2, 4), norm="batch")
    model.train()
    with torch.no_grad():  # give the norms non-trivial running statistics
        for _ in range(3):
            model(torch.rand(4, 1, 16, 16, 16))
    model.eval()
    x = torch.rand(2, 1, 16, 16, 16)
    import copy

    folded = _fold_batch_norms(copy.deepcopy(model))
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in folded.modules())
    torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)
