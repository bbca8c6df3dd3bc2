"""The out-of-distribution score in the predictor's penultimate features."""

from __future__ import annotations

import numpy as np
import torch
from helpers.predictor import SHAPE

from brainage_core.models.cnn import BrainAgeCNN
from brainage_core.models.ood import OOD_MARGIN, FeatureOOD, predict_with_features


def test_features_come_with_the_models_own_predictions():
    torch.manual_seed(0)
    model = BrainAgeCNN(input_shape=SHAPE, channels=[2, 4], norm="group").eval()
    x = torch.randn(3, 1, *SHAPE)
    ages, features = predict_with_features(model, x)
    np.testing.assert_allclose(ages, model(x).detach().numpy(), rtol=1e-6)
    assert features.shape == (3, 4)
    assert not model.training and not model.output._forward_pre_hooks  # no hook left behind


def test_the_score_is_calibrated_on_validation_and_flags_the_unseen():
    rng = np.random.default_rng(0)
    train, val = rng.normal(size=(200, 8)), rng.normal(size=(50, 8))
    ood = FeatureOOD.fit(train, val)
    scores = ood.score(val)
    assert abs(np.median(scores) - 1.0) < 1e-9
    assert ood.threshold == np.percentile(scores, 99) * OOD_MARGIN
    new_like = ood.score(rng.normal(size=(100, 8)))
    assert np.mean(new_like > ood.threshold) < 0.05
    far = ood.score(rng.normal(size=(20, 8)) + 6.0)
    assert (far > ood.threshold).all()
    again = FeatureOOD.from_arrays(ood.to_arrays())
    np.testing.assert_array_equal(again.score(val), scores)
