"""Tests of the Harvard–Oxford atlas on the template grid (8 mm grid: fast)."""

from __future__ import annotations

import numpy as np
import pytest

from brainage_core._utils.validation import BrainAgeInputError
from brainage_core.data.atlas import Atlas, load_atlas
from brainage_core.data.template import load_template


@pytest.fixture(scope="module")
def atlas() -> Atlas:
    return load_atlas(8)


def test_atlas_lives_on_the_template_grid(atlas: Atlas) -> None:
    template = load_template(8)
    assert atlas.labels.shape == template.shape
    np.testing.assert_array_equal(atlas.affine, template.affine)
    assert atlas.resolution == 8
    # Labels only inside the brain mask, and they cover a good part of it.
    assert not atlas.labels[~template.mask].any()
    assert (atlas.labels > 0).sum() > 0.4 * template.mask.sum()
    img = atlas.to_image()
    assert img.shape == template.shape
    np.testing.assert_array_equal(img.affine, template.affine)


def test_names_are_clean_and_lateralised(atlas: Atlas) -> None:
    assert atlas.names[0] == "Background"
    assert len(atlas.names) == 114
    assert atlas.labels.max() < len(atlas.names)
    for name in (
        "Left Lateral Ventricle",
        "Right Lateral Ventricle",
        "Left Hippocampus",
        "Right Putamen",
        "Left Occipital Pole",
        "Brain Stem",
    ):
        assert name in atlas.names
    assert not any("_" in n or "Ventrical" in n for n in atlas.names)


def test_region_mask_matches_case_insensitive_substrings(atlas: Atlas) -> None:
    both = atlas.region_mask("hippocampus")
    left = atlas.region_mask("Left Hippocampus")
    right = atlas.region_mask(["Right Hippocampus"])
    assert left.any() and right.any()
    np.testing.assert_array_equal(both, left | right)
    assert not (left & right).any()
    assert atlas.region_names("Putamen") == ["Left Putamen", "Right Putamen"]


def test_regions_sit_in_the_right_hemisphere_and_tissue(atlas: Atlas) -> None:
    template = load_template(8)
    x_mm = (np.indices(atlas.shape)[0] * atlas.affine[0, 0]) + atlas.affine[0, 3]
    assert np.all(x_mm[atlas.region_mask("Left Putamen")] < 0)
    assert np.all(x_mm[atlas.region_mask("Right Putamen")] > 0)
    # Ventricles hold CSF; the putamen is grey matter.
    assert template.csf[atlas.region_mask("Lateral Ventricle")].mean() > 0.4
    assert template.csf[atlas.region_mask("Putamen")].mean() < 0.1


def test_unknown_region_lists_available_names(atlas: Atlas) -> None:
    with pytest.raises(BrainAgeInputError, match="Nowhere Gyrus.*Available regions:.*Putamen"):
        atlas.region_mask(["Putamen", "Nowhere Gyrus"])
    with pytest.raises(BrainAgeInputError, match="patterns"):
        atlas.region_mask([])


def test_table_counts_voxels_and_volume(atlas: Atlas) -> None:
    table = atlas.table()
    assert list(table.columns) == ["label", "name", "n_voxels", "volume_ml"]
    assert len(table) == len(atlas.names) - 1
    assert table["n_voxels"].sum() == (atlas.labels > 0).sum()
    np.testing.assert_allclose(table["volume_ml"], table["n_voxels"] * 0.512)


def test_load_atlas_is_cached_and_validates_resolution() -> None:
    assert load_atlas(8) is load_atlas(8)
    with pytest.raises(BrainAgeInputError, match="'resolution'"):
        load_atlas(5)
