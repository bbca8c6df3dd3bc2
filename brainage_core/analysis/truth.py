"""The planted truth of a synthetic cohort on a cohort's grid: what maps are scored against.

:class:`brainage_core.data.synth.GroundTruth` holds the generator's truth images in template
space; :class:`GridTruth` is the same truth resampled onto the grid of a prepared cohort,
inside its brain mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from brainage_core._utils.validation import BrainAgeInputError
from brainage_core.analysis.localisation import core_truth, image_on_grid, truth_on_grid
from brainage_core.data.cache import PreparedCohort


@dataclass
class GridTruth:
    """The planted age signal of a synthetic cohort, resampled on a cohort's grid.

    Attributes
    ----------
    mask : numpy.ndarray of bool
        Voxels that carry planted age signal.
    regions : list of str
        Atlas patterns of the planted regions.
    effect_masks : dict of str to numpy.ndarray
        The voxels of each kind of effect (for example ``"cortical_thinning"``), so that
        a map can be scored per effect; empty when unknown.
    strength : numpy.ndarray or None
        Continuous truth: the planted intensity change of each voxel (0 outside the
        truth); None when unknown.
    weak_tail : float
        Planted voxels whose change is below this are left out of the core scores.
    """

    mask: np.ndarray
    regions: list[str]
    effect_masks: dict[str, np.ndarray] = field(default_factory=dict)
    strength: np.ndarray | None = None
    weak_tail: float = 0.05

    def core(self) -> tuple[np.ndarray, np.ndarray]:
        """Planted voxels without the weak tails, and the voxels that are scored."""
        if self.strength is None:
            return self.mask, np.ones(self.mask.shape, bool)
        return core_truth(self.mask, self.strength, self.weak_tail)


def truth_on_cohort_grid(cohort: PreparedCohort, *, weak_tail: float = 0.05) -> GridTruth | None:
    """The ground truth of a synthetic cohort on the cohort's grid; None for real data.

    ``weak_tail`` sets which planted voxels count as weak tails (see :class:`GridTruth`).
    """
    root = cohort.metadata.get("source_root")
    if not root or not (Path(root) / "derivatives" / "ground_truth").is_dir():
        return None
    from brainage_core.data.synth import load_ground_truth

    truth = load_ground_truth(root)
    grid = (cohort.affine, cohort.mask.shape)
    mask = truth_on_grid(truth.mask_img, *grid)
    effect_masks = {
        kind: truth_on_grid(img, *grid) & cohort.mask
        for kind, img in truth.effect_mask_imgs.items()
    }
    strength = getattr(truth, "strength_img", None)
    return GridTruth(
        mask=mask & cohort.mask,
        regions=planted_patterns(truth),
        effect_masks=effect_masks,
        strength=None if strength is None else image_on_grid(strength, *grid) * cohort.mask,
        weak_tail=weak_tail,
    )


def planted_patterns(truth: Any) -> list[str]:
    """Atlas patterns of the planted regions of a :class:`brainage_core.data.synth.GroundTruth`."""
    for name in ("planted_regions", "regions", "region_names"):
        value = getattr(truth, name, None)
        if value:
            return [str(v) for v in value]
    effects = getattr(truth, "effects", None)
    if effects is not None and "regions" in effects:
        out: list[str] = []
        for cell in effects["regions"]:
            out.extend(p.strip() for p in str(cell).replace(";", ",").split(",") if p.strip())
        return sorted(set(out))
    raise BrainAgeInputError("the ground truth names no planted regions")
