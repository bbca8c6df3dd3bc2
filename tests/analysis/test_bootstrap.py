"""Tests of the bootstrap intervals over subjects."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from brainage_core._utils.validation import BrainAgeInputError
from brainage_core.analysis.bootstrap import (
    bootstrap_draws,
    bootstrap_interval,
    percentile_interval,
    region_rank_intervals,
)


def test_intervals_cover_the_true_value_at_their_level():
    """95% intervals of a population mean cover the true mean in about 95% of samples."""
    rng = np.random.default_rng(0)
    true_mean, covered, trials = 2.0, 0, 120
    for t in range(trials):
        sample = rng.normal(true_mean, 1.0, size=(40, 1))
        ci = bootstrap_interval(sample, lambda m: float(m[0]), n_boot=200, seed=t)
        covered += ci["lo"] <= true_mean <= ci["hi"]
        assert ci["lo"] <= ci["value"] <= ci["hi"]
    assert 0.88 <= covered / trials <= 0.99


def test_width_shrinks_with_subjects_and_draws_are_seeded():
    rng = np.random.default_rng(1)
    wide = bootstrap_interval(rng.normal(size=(10, 1)), lambda m: float(m[0]), seed=0)
    narrow = bootstrap_interval(rng.normal(size=(400, 1)), lambda m: float(m[0]), seed=0)
    assert narrow["hi"] - narrow["lo"] < 0.5 * (wide["hi"] - wide["lo"])
    maps = rng.normal(size=(6, 3))
    a = bootstrap_draws(maps, lambda m: m, n_boot=20, seed=3)
    assert a.shape == (20, 3) and np.array_equal(a, bootstrap_draws(maps, lambda m: m,
                                                                    n_boot=20, seed=3))
    lo, hi = percentile_interval(np.arange(101.0), 0.9)
    assert (lo, hi) == (pytest.approx(5.0), pytest.approx(95.0))
    with pytest.raises(BrainAgeInputError, match="'maps'"):
        bootstrap_draws(np.zeros((1, 3)), lambda m: 0.0)


def test_region_rank_intervals_separate_a_stable_from_an_unstable_region():
    rng = np.random.default_rng(0)
    names = ["A", "B", "C", "D"]
    # region A always first; B, C and D tie up to subject noise
    maps = np.column_stack([np.full(30, 10.0), rng.normal(1.0, 1.0, size=(30, 3))])

    def rank(mean):
        order = np.argsort(-mean)
        return pd.DataFrame({"name": [names[i] for i in order], "rank": np.arange(1, 5)})

    table = region_rank_intervals(maps, rank, n_boot=100, seed=0)
    rows = table.set_index("name")
    assert rows.loc["A", "rank"] == 1 and rows.loc["A", "rank_span"] == 0
    assert rows.loc[["B", "C", "D"], "rank_span"].max() >= 1
    assert list(region_rank_intervals(maps, rank, n_boot=10, top=2)["rank"]) == [1, 2]
