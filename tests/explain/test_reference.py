"""Tests of the reference maps (random floor, fixed model-free map)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from brainage_core._utils.validation import BrainAgeInputError
from brainage_core.explain.protocol import Explainer
from brainage_core.explain.reference import FixedMap, RandomMap


def test_random_map_is_masked_fresh_and_seeded():
    mask = np.zeros((4, 5, 6), bool)
    mask[1:3, 1:4, 1:5] = True
    x = torch.rand(3, 1, 4, 5, 6)
    explainer = RandomMap(mask, seed=1)
    assert isinstance(explainer, Explainer)
    a, b = explainer.attribute(x), explainer.attribute(x)
    assert a.shape == x.shape and torch.all(a[:, 0][:, ~torch.from_numpy(mask)] == 0)
    assert not torch.equal(a, b)  # a new draw at every call
    assert torch.equal(a, RandomMap(mask, seed=1).attribute(x))


def test_fixed_map_repeats_its_map_and_checks_the_grid():
    importance = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    out = FixedMap(importance).attribute(torch.rand(2, 1, 3, 4, 5))
    assert out.shape == (2, 1, 3, 4, 5)
    assert torch.equal(out[1, 0], torch.from_numpy(importance))
    with pytest.raises(BrainAgeInputError, match="'inputs'"):
        FixedMap(importance).attribute(torch.rand(2, 1, 3, 4, 4))
    with pytest.raises(BrainAgeInputError, match="'importance'"):
        FixedMap(np.full((3, 4, 5), np.nan))
