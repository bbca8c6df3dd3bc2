"""Tests of population and age-band maps."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from helpers.maps import make_atlas

from brainage_core._utils.io import save_nifti
from brainage_core._utils.validation import BrainAgeInputError
from brainage_core.analysis.population import (
    POPULATION_FILE,
    age_band_maps,
    age_bands,
    band_file,
    mean_map,
    save_population_maps,
)

SHAPE = (4, 5, 6)


def test_mean_map_streams_arrays_images_and_files(tmp_path, rng):
    maps = rng.random((5, *SHAPE))
    assert np.allclose(mean_map(maps), maps.mean(0))
    paths = []
    for i, arr in enumerate(maps):
        paths.append(
            save_nifti(
                nib.Nifti1Image(arr.astype(np.float32), np.eye(4)), tmp_path / f"sub-{i}.nii.gz"
            )
        )
    assert np.allclose(mean_map(paths), maps.mean(0), atol=1e-6)
    assert np.allclose(mean_map(iter(maps[:, None])), maps.mean(0))  # (1, X, Y, Z) items
    with pytest.raises(BrainAgeInputError, match="empty"):
        mean_map([])
    with pytest.raises(BrainAgeInputError, match="one grid"):
        mean_map([np.zeros(SHAPE), np.zeros((2, 2, 2))])
    with pytest.raises(BrainAgeInputError, match="missing.nii.gz"):
        mean_map([tmp_path / "missing.nii.gz"])


def test_age_bands_are_decades():
    assert age_bands([45.2, 59.9, 60.0, 81.0]) == [(40, 50), (50, 60), (60, 70), (70, 80), (80, 90)]
    assert age_bands([50, 54], width=5) == [(50, 55)]
    assert band_file(50, 60) == "population_age-50-60_importance.nii.gz"


def test_age_band_maps_average_members_only(rng):
    maps = rng.random((4, *SHAPE))
    bands = age_band_maps(maps, [51, 55, 62, 75], width=10)
    assert list(bands) == [(50, 60), (60, 70), (70, 80)]
    assert np.allclose(bands[(50, 60)], maps[:2].mean(0))
    assert np.allclose(bands[(70, 80)], maps[3])
    assert list(age_band_maps(maps, [51, 55, 62, 75], min_subjects=2)) == [(50, 60)]
    with pytest.raises(BrainAgeInputError, match="4 maps but 3 ages"):
        age_band_maps(maps, [1, 2, 3])


def test_saved_maps_have_grid_shape_and_affine(tmp_path, rng):
    atlas = make_atlas()

    def to_image(arr):
        return nib.Nifti1Image(arr, atlas.affine)

    maps = rng.random((3, *atlas.labels.shape)).astype(np.float32)
    written = save_population_maps(maps, [48, 52, 58], to_image, tmp_path / "maps")
    assert set(written) == {"all", "40-50", "50-60"}
    assert written["all"].name == POPULATION_FILE
    for path in written.values():
        img = nib.load(path)
        assert img.shape == atlas.labels.shape
        assert np.allclose(img.affine, atlas.affine)
    assert np.allclose(nib.load(written["all"]).get_fdata(), maps.mean(0), atol=1e-6)
    assert np.allclose(nib.load(written["50-60"]).get_fdata(), maps[1:].mean(0), atol=1e-6)
