"""Images of extreme intensity scales are handled or named precisely (issue 10)."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers.data import RES, make_bids

from brainage_core._utils.validation import BrainAgeInputError
from brainage_core.data.preprocess import preprocess_image
from brainage_core.data.template import load_template

FORK = multiprocessing.get_context("fork")


def _image_on_disk(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    img = nib.Nifti1Image(data, affine)
    img.set_data_dtype(np.float64)
    nib.save(img, path)


@pytest.mark.parametrize("factor", [1e300, 1e-30])
def test_extreme_intensity_scales_are_handled(factor: float, tmp_path: Path) -> None:
    template = load_template(RES)
    plain = tmp_path / "plain.nii.gz"
    nib.save(nib.load(make_bids(tmp_path / "b", n=1) / "sub-01/anat/sub-01_T1w.nii.gz"), plain)
    data = np.asarray(nib.load(plain).dataobj, dtype=np.float64)
    scaled = tmp_path / "scaled.nii.gz"
    _image_on_disk(scaled, data * factor, nib.load(plain).affine)
    expected = preprocess_image(plain, template)
    got = preprocess_image(scaled, template)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_an_extreme_outlier_is_named_precisely(tmp_path: Path) -> None:
    template = load_template(RES)
    data = np.asarray(template.t1, dtype=np.float64) * 100
    data[0, 0, 0] = 1e300
    path = tmp_path / "outlier.nii.gz"
    _image_on_disk(path, data, template.affine)
    n_lost = int(np.count_nonzero(data)) - 1
    with pytest.raises(BrainAgeInputError) as err:
        preprocess_image(path, template)
    smallest = float(np.min(np.abs(data[data != 0])))
    assert str(err.value) == (
        f"{path}: voxel magnitudes range from {smallest:.3g} to 1e+300, more than 32-bit "
        f"floats hold at once: {n_lost} non-zero voxel(s) would become 0 (an extreme outlier "
        "or a corrupt file?)"
    )
