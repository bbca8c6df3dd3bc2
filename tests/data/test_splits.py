"""Deterministic, age-stratified splits."""

from __future__ import annotations

import numpy as np
import pytest

from brainage_core._utils.validation import BrainAgeInputError
from brainage_core.data.splits import SPLITS, make_splits, split_counts


@pytest.fixture
def ages(rng) -> np.ndarray:
    return rng.uniform(45, 82, 200)


def test_counts_follow_the_fractions(ages) -> None:
    split = make_splits(ages, (0.6, 0.2, 0.2), seed=0)
    assert [int((split == s).sum()) for s in SPLITS] == [120, 40, 40]


def test_deterministic_for_a_seed(ages) -> None:
    a = make_splits(ages, seed=3)
    assert np.array_equal(a, make_splits(ages, seed=3))
    assert not np.array_equal(a, make_splits(ages, seed=4))


def test_every_split_covers_the_age_range(ages) -> None:
    split = make_splits(ages, seed=0)
    deciles = np.percentile(ages, [10, 90])
    for name in SPLITS:
        part = ages[split == name]
        assert part.min() < deciles[0] and part.max() > deciles[1]
        assert abs(np.median(part) - np.median(ages)) < 3.0


def test_stratification_beats_chance() -> None:
    # Sorted ages: a non-stratified "first 70 %" split would put all the old in test.
    ages = np.linspace(40, 90, 100)
    split = make_splits(ages, seed=0)
    for name in SPLITS:
        assert abs(ages[split == name].mean() - ages.mean()) < 2.5


def test_tiny_cohorts_get_every_split() -> None:
    assert sorted(make_splits([50.0, 60.0, 70.0])) == ["test", "train", "val"]
    assert list(split_counts(1, (0.7, 0.15, 0.15))) == [1, 0, 0]
    assert list(split_counts(10, (1.0, 0.0, 0.0))) == [10, 0, 0]


@pytest.mark.parametrize(
    "fractions", [(0.5, 0.5), (0.7, 0.2, 0.2), (0.0, 0.5, 0.5), (0.8, -0.1, 0.3), "abc"]
)
def test_bad_fractions(fractions) -> None:
    with pytest.raises(BrainAgeInputError, match="split_fractions"):
        make_splits([50.0, 60.0], fractions)


def test_non_finite_ages_are_an_error() -> None:
    with pytest.raises(BrainAgeInputError, match="finite"):
        make_splits([50.0, np.nan])
