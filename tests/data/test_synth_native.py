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
