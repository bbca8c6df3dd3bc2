"""One preprocessing path: validation errors, reorientation, resampling, normalisation."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers.data import RES, make_image, save_with_raw_affine, truncate_gzip

from brainage_core._utils.validation import BrainAgeInputError
from brainage_core.data.preprocess import NORMALISATION_PERCENTILES, load_image, preprocess_image
from brainage_core.data.template import load_template


@pytest.fixture(scope="module")
def template():
    return load_template(RES)


def test_output_is_on_the_template_grid(template) -> None:
    out = preprocess_image(make_image(0), template)
    assert out.shape == template.shape
    assert out.dtype == np.float32
    assert np.all(out[~template.mask] == 0)
    lo, hi = np.percentile(out[template.mask], NORMALISATION_PERCENTILES)
    assert lo == pytest.approx(0.0, abs=1e-4) and hi == pytest.approx(1.0, abs=1e-4)


def test_intensity_scale_and_offset_are_removed(template) -> None:
    img = make_image(0)
    data = np.asarray(img.dataobj)
    scaled = nib.Nifti1Image(data * 7.5 + 300.0, img.affine)
    np.testing.assert_allclose(
        preprocess_image(scaled, template), preprocess_image(img, template), atol=1e-4
    )


def test_lps_stored_image_gives_the_same_array_as_ras(template, tmp_path: Path) -> None:
    ras = make_image(1)
    data = np.asarray(ras.dataobj)
    # Store x and y reversed (LPS): same voxels in the world, another array layout.
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3] = data.shape[0] - 1
    flip[1, 3] = data.shape[1] - 1
    lps = nib.Nifti1Image(data[::-1, ::-1, :].copy(), ras.affine @ flip)
    assert nib.aff2axcodes(lps.affine) == ("L", "P", "S")
    path = tmp_path / "lps.nii.gz"
    nib.save(lps, path)
    np.testing.assert_allclose(
        preprocess_image(path, template), preprocess_image(ras, template), atol=1e-5
    )


def test_finer_image_is_resampled_to_the_grid(template) -> None:
    fine = load_template(4)
    img = fine.to_image(fine.t1 * 100)
    out = preprocess_image(img, template)
    assert out.shape == template.shape
    # The resampled template correlates with the coarse template inside the mask.
    r = np.corrcoef(out[template.mask], template.t1[template.mask])[0, 1]
    assert r > 0.9


def test_single_volume_4d_is_squeezed(template, tmp_path: Path) -> None:
    img = make_image(2)
    path = tmp_path / "one_volume.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[..., None], img.affine), path)
    assert load_image(path).shape == img.shape
    np.testing.assert_allclose(
        preprocess_image(path, template), preprocess_image(img, template), atol=1e-6
    )


def test_several_volumes_is_an_error(tmp_path: Path) -> None:
    img = make_image(2)
    path = tmp_path / "bold.nii.gz"
    nib.save(nib.Nifti1Image(np.stack([img.dataobj] * 3, axis=-1), img.affine), path)
    with pytest.raises(BrainAgeInputError, match=r"4D image with 3 volumes") as err:
        load_image(path)
    assert str(path) in str(err.value)


def test_non_finite_voxels_are_an_error(tmp_path: Path) -> None:
    img = make_image(3)
    data = np.asarray(img.dataobj).copy()
    data[3, 4, 5] = np.nan
    data[1, 1, 1] = np.inf
    path = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(data, img.affine), path)
    with pytest.raises(BrainAgeInputError, match=r"nan.nii.gz: 2 non-finite voxel"):
        load_image(path)


@pytest.mark.parametrize(
    ("affine", "pattern"),
    [
        (np.diag([0.0, 8.0, 8.0, 1.0]), "degenerate affine: zero voxel size"),
        (
            np.array([[8.0, 8, 0, 0], [0, 0, 0, 0], [0, 0, 8, 0], [0, 0, 0, 1]]),
            "degenerate affine: not invertible",
        ),
    ],
)
def test_degenerate_affine_is_an_error(tmp_path: Path, affine, pattern) -> None:
    path = save_with_raw_affine(tmp_path / "bad.nii", np.ones((6, 6, 6)), affine)
    with pytest.raises(BrainAgeInputError, match=pattern) as err:
        load_image(path)
    assert str(path) in str(err.value)


def test_truncated_gzip_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "cut.nii.gz"
    nib.save(make_image(4), path)
    truncate_gzip(path)
    with pytest.raises(BrainAgeInputError, match=r"cut.nii.gz: .*truncated or corrupt"):
        load_image(path)


def test_not_a_nifti_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "notes.nii.gz"
    path.write_text("not an image")
    with pytest.raises(BrainAgeInputError, match=r"notes.nii.gz: cannot read the image header"):
        load_image(path)


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(BrainAgeInputError, match=r"absent.nii.gz: image file does not exist"):
        load_image(tmp_path / "absent.nii.gz")


def test_image_outside_the_brain_is_an_error(template, tmp_path: Path) -> None:
    far = np.eye(4) * 2.0
    far[3, 3] = 1
    far[:3, 3] = 500.0  # nowhere near MNI space
    path = tmp_path / "far.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((10, 10, 10), np.float32), far), path)
    with pytest.raises(BrainAgeInputError, match=r"far.nii.gz: image is blank inside the brain"):
        preprocess_image(path, template)
