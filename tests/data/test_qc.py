"""Input quality control: images that really are wrong are flagged, each for its reason."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from helpers.qc import CASES

from brainage_core.data import qc
from brainage_core.data.preprocess import preprocess_image
from brainage_core.data.template import load_template

THRESHOLDS = qc.QCThresholds()


@pytest.fixture(scope="module")
def reference(tiny_cohort):
    """The reference cohort: every subject but the first, as ``prepare`` would measure it."""
    template = load_template(8)
    paths = sorted(tiny_cohort.glob("sub-*/anat/*_T1w.nii.gz"))
    results = [qc.preprocess_with_qc(p, template) for p in paths[1:]]
    ref = {
        "ncc_median": float(np.median([r.measures["ncc"] for r in results])),
        "intensity_percentiles": np.median(
            [qc.intensity_percentiles(r.image, template.mask) for r in results], axis=0),
    }
    return template, ref, nib.load(paths[0])


def _check(img, template, ref):
    result = qc.preprocess_with_qc(img, template)
    measures = dict(result.measures)
    measures["intensity_distance"] = qc.intensity_distance(
        result.image, template.mask, ref["intensity_percentiles"])
    if qc.needs_search(measures, THRESHOLDS, ref):
        measures.update(qc.search_pose_and_orientation(img))
    reasons = qc.qc_reasons(measures, THRESHOLDS, ref, resolution=template.resolution)
    return measures, qc.reason_codes(reasons), result.image


def test_a_clean_subject_passes_and_is_preprocessed_as_usual(reference):
    template, ref, clean = reference
    measures, codes, image = _check(clean, template, ref)
    assert codes == []
    assert measures["coverage"] == 1.0 and measures["orientation"] == "RAS"
    assert measures["voxel_size"] == 8.0
    # the QC path gives exactly the preprocessing's image
    np.testing.assert_array_equal(image, preprocess_image(clean, template))


@pytest.mark.parametrize("case", sorted(CASES))
def test_wrong_images_are_flagged_for_the_right_reason(reference, case):
    template, ref, clean = reference
    make, expected = CASES[case]
    _, codes, _ = _check(make(clean), template, ref)
    assert expected in codes, (case, codes)
    if expected == "orientation":  # the search names the cause, not a misregistration
        assert "ncc" not in codes and "registration" not in codes
    if expected in ("registration", "outside_ratio"):  # same contrast: normal intensities
        assert "intensity" not in codes and "orientation" not in codes
    if expected == "intensity":  # another contrast is not a misplaced image
        assert "registration" not in codes and "orientation" not in codes


def test_orientation_search_recovers_the_swap(reference):
    template, _, clean = reference
    found = qc.orientation_search(CASES["wrong_orientation_code"][0](clean))
    assert found["orientation_fix"].startswith("axes (1, 0, 2)")
    assert found["orientation_fix_ncc"] > found["orientation_identity_ncc"] + 0.3


def test_coarse_source_voxels_are_flagged(reference):
    template, ref, clean = reference
    measures, _, _ = _check(clean, template, ref)
    measures["voxel_size"] = 5.0
    fine = qc.QCThresholds()
    codes = qc.reason_codes(qc.qc_reasons(measures, fine, ref, resolution=2))
    assert codes == ["voxel_size"]
    assert qc.qc_reasons(measures, fine, ref, resolution=8) == []
