"""The plotly slice viewer and the notebook renderer set-up."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import plotly.io as pio
import pytest

from brainage_core._utils.validation import BrainAgeInputError
from brainage_core.data.template import load_template
from brainage_core.plotting.interactive import RENDERER, setup_plotly, slice_viewer


@pytest.fixture(scope="module")
def template():
    return load_template(8)


def _blob_map(template, centre):
    grid = np.indices(template.shape)
    dist2 = sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True))
    return template.to_image((np.exp(-dist2 / 8.0) * template.mask).astype(np.float32))


@pytest.mark.parametrize(("orientation", "axis"), [("axial", 2), ("coronal", 1),
                                                   ("sagittal", 0)])
def test_slider_scrolls_through_every_slice_and_starts_at_the_peak(template, orientation, axis):
    centre = (8, 10, 12)
    img = _blob_map(template, centre)
    fig = slice_viewer(img, template.to_image(template.t1), orientation=orientation)
    steps = fig.layout.sliders[0].steps
    assert len(steps) == template.shape[axis]
    assert fig.layout.sliders[0].active == centre[axis]
    background, overlay = fig.data
    # each step shows its own slice: the overlay of the peak slice holds the maximum
    peak = np.asarray(steps[centre[axis]].args[0]["z"][1], dtype=float)
    assert np.nanmax(peak) == pytest.approx(float(img.get_fdata().max()), abs=1e-3)
    # labels are MNI millimetres of the slices
    mm = template.affine[axis, axis] * centre[axis] + template.affine[axis, 3]
    assert steps[centre[axis]].label == f"{mm:.0f}"
    # below the threshold the overlay is transparent (NaN), the background is the template
    assert np.isnan(np.asarray(overlay.z, dtype=float)).any()
    assert np.asarray(background.z).shape == np.asarray(overlay.z).shape


def test_max_slices_thins_the_slider(template):
    fig = slice_viewer(_blob_map(template, (8, 10, 12)), orientation="axial", max_slices=5)
    assert len(fig.layout.sliders[0].steps) == 5
    assert len(fig.data) == 1  # no background given


def test_bad_inputs_are_clear_errors(template, tmp_path):
    img = _blob_map(template, (8, 10, 12))
    with pytest.raises(BrainAgeInputError, match="'orientation' must be one of"):
        slice_viewer(img, orientation="oblique")
    other = load_template(6)
    with pytest.raises(BrainAgeInputError, match="'bg_img' must be on the map's grid"):
        slice_viewer(img, other.to_image(other.t1))
    with pytest.raises(BrainAgeInputError, match="does not exist"):
        slice_viewer(tmp_path / "missing.nii.gz")
    empty = template.to_image(np.zeros(template.shape, np.float32))
    with pytest.raises(BrainAgeInputError, match="no non-zero"):
        slice_viewer(empty)
    four_d = nib.Nifti1Image(np.zeros((*template.shape, 2), np.float32), template.affine)
    with pytest.raises(BrainAgeInputError, match="3D image"):
        slice_viewer(four_d)


def test_setup_plotly_selects_an_offline_renderer():
    before = pio.renderers.default
    try:
        assert setup_plotly() == RENDERER
        assert pio.renderers.default == "plotly_mimetype+notebook"
        with pytest.raises(BrainAgeInputError, match="offline"):
            setup_plotly("notebook_connected")
    finally:
        pio.renderers.default = before
