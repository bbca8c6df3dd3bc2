"""The generator's record of a subject's own affine nuisance (head size, rotation, shift)."""

from __future__ import annotations

import numpy as np

from brainage_core.data.synth import SynthConfig
from brainage_core.data.synth.render import AgeingModel, SubjectRenderer
from brainage_core.data.template import load_template


def test_subject_affine_says_where_the_template_brain_lands():
    config = SynthConfig.from_dict({"n_subjects": 2, "resolution": 8, "seed": 1,
                                    "rotation_deg": 0.0, "translation_mm": 6.0,
                                    "head_size_sd": 0.0, "head_size_sex_difference": 0.0,
                                    "deformation_mm": 0.0, "local_deformation_mm": 0.0,
                                    "effects": []})
    renderer = SubjectRenderer(AgeingModel(config))
    affine = renderer.subject_affine(3, "F")  # a shift of 12.5 mm
    assert np.allclose(affine[:3, :3], np.eye(3))  # a pure shift here
    image = renderer.render_subject(3, "F", 60.0)
    template = load_template(8)
    com = np.array([np.average(np.indices(image.shape)[a], weights=image) for a in range(3)])
    com_t = np.array([np.average(np.indices(image.shape)[a], weights=template.t1)
                      for a in range(3)])
    moved_mm = (com - com_t) * 8.0
    np.testing.assert_allclose(moved_mm, affine[:3, 3], atol=2.5)  # within a third of a voxel
    assert np.linalg.norm(affine[:3, 3]) > 10.0


def test_the_best_affine_of_the_anatomy_is_what_registration_should_find():
    base = {"n_subjects": 2, "resolution": 8, "render_resolution": 8, "seed": 2, "effects": [],
            "local_deformation_mm": 0.0, "rotation_deg": 3.0, "translation_mm": 3.0}
    # without smooth deformation, the fit is the drawn head size, rotation and shift
    plain = SubjectRenderer(AgeingModel(SynthConfig.from_dict({**base, "deformation_mm": 0.0})))
    fitted, nonaffine = plain.subject_affine_fit(1, "M")
    np.testing.assert_allclose(fitted, plain.subject_affine(1, "M"), atol=1e-6)
    assert nonaffine < 1e-6
    # a coarse smooth deformation has an affine part: the fit moves away from the drawn
    # transform (by more than a few tenths of a mm over the brain)
    renderer = SubjectRenderer(AgeingModel(SynthConfig.from_dict(
        {**base, "deformation_mm": 3.0, "deformation_spacing_mm": 32.0})))
    fitted, nonaffine = renderer.subject_affine_fit(1, "M")
    drawn = renderer.subject_affine(1, "M")
    template = load_template(8)
    points = np.c_[np.argwhere(template.mask) * 8.0 + template.affine[:3, 3],
                   np.ones(int(template.mask.sum()))]
    moved = np.linalg.norm(points @ (fitted - drawn).T, axis=1).mean()
    assert moved > 0.3, moved
    assert 0.0 < nonaffine < 6.0
