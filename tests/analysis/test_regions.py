"""Tests of the region table."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.maps import make_atlas

from brainage_core._utils.validation import BrainAgeInputError
from brainage_core.analysis.regions import COLUMNS, region_table, top_regions, write_region_table


def test_planted_region_ranks_first_with_volumes(tmp_path, rng):
    atlas = make_atlas()
    planted = atlas.labels == 3
    importance = 0.1 * rng.random(atlas.labels.shape) + planted
    table = region_table(importance, atlas)
    assert list(table.columns) == COLUMNS
    assert len(table) == 8 and list(table["rank"]) == list(range(1, 9))
    assert table["name"].iloc[0] == "Region C" and table["label"].iloc[0] == 3
    assert table["mean_importance"].is_monotonic_decreasing
    row = table.iloc[0]
    assert row["n_voxels"] == planted.sum()
    assert row["volume_ml"] == pytest.approx(planted.sum() * 8**3 / 1000)
    assert row["median_importance"] == pytest.approx(np.median(importance[planted]))
    assert top_regions(table, 1) == ["Region C"]
    path = write_region_table(table, tmp_path / "tables" / "regions.csv")
    assert path.read_text().splitlines()[0] == ",".join(COLUMNS)


def test_bilateral_merges_left_and_right():
    atlas = make_atlas()
    atlas.names[1:] = [
        "Left Hippocampus",
        "Right Hippocampus",
        "Left Putamen",
        "Right Putamen",
        "Left Pole",
        "Right Pole",
        "Left Gyrus",
        "Right Gyrus",
    ]
    importance = np.isin(atlas.labels, [3, 4]).astype(float)
    table = region_table(importance, atlas, bilateral=True)
    assert len(table) == 4
    assert table["name"].iloc[0] == "Putamen" and table["label"].iloc[0] == -1
    assert table["n_voxels"].iloc[0] == np.isin(atlas.labels, [3, 4]).sum()
    small = region_table(importance, atlas, min_voxels=10**6)
    assert small.empty and list(small.columns) == COLUMNS


def test_grid_mismatch_is_named():
    with pytest.raises(BrainAgeInputError, match="'importance'"):
        region_table(np.zeros((3, 3, 3)), make_atlas())
