"""Input quality control: is an image what the model expects before anything is trusted?

The most common complaint of brain-age users is "nonsense on my data", and its usual cause
is an image that was not preprocessed like the training images. :func:`image_qc` measures,
for one image, on the same path as :func:`~brainage_core.data.preprocess.preprocess_image`:

=======================  ==========================================================  ==============
measure                  what it is                                                  flagged if
=======================  ==========================================================  ==============
``ncc``                  normalised cross-correlation of the preprocessed image      < 0.8 x the
                         with the template T1, inside the brain mask                 reference's
                                                                                     median
``coverage``             share of the template brain mask inside the image's         < 0.97
                         field of view
``outside_ratio``        mean intensity in a 4-20 mm shell around the brain mask     > 0.4
                         over the mean inside it (skull left on?)
``intensity_distance``   mean absolute difference of the normalised brain            > 0.15
                         intensities' percentiles (1..99) from the reference
                         cohort's (another contrast?)
``voxel_size``           largest voxel side of the source image (mm)                 > 3 mm (or the
                                                                                     grid, if
                                                                                     coarser)
``orientation``          the source's orientation code (e.g. ``RAS``); see below     see below
=======================  ==========================================================  ==============

The reference cohort is the run's training split in ``predict`` and the cohort itself in
``prepare``. The NCC limit is relative because the similarity of a clean image to the MNI
template depends on the grid, the contrast and the noise: on the 8 and 4 mm synthetic
cohorts clean subjects score 0.45-0.60 (at least 0.90 x their median), while the same
subjects rotated by 20 degrees score at most 0.73 x and shifted by 2 cm at most 0.55 x
the median. The margin is narrow at 8 mm; real 1 mm images registered to MNI score about
0.9 and a misregistered one far less.

When the similarity is low, the image is also tried with its axes permuted and flipped
(the 47 other readings of its orientation code, each centred on the template brain): if
one matches the template clearly better than the header's own reading, the reason is the
orientation code, not the registration.

The other defaults were set on the same cohorts: clean subjects have coverage 1, outside
ratio below 0.08 and intensity distance below 0.10; a skull (a bright shell 8-20 mm around
the brain) gives an outside ratio of 0.86-0.98, an inverted contrast an intensity distance
of 0.32-0.37, and a swapped orientation code is found by the search (NCC 0.62-0.64 against
0.16-0.18). Change them with ``QCThresholds(...)``.

A second, model-based check, the out-of-distribution score in the predictor's features,
lives with the model (:mod:`brainage_core.models.ood`).
"""

from __future__ import annotations

import itertools
import os
from dataclasses import asdict, dataclass
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from brainage_core._utils.validation import BrainAgeInputError, check_choice
from brainage_core.data.preprocess import (
    ImageLike,
    load_image,
    normalise_intensities,
    reorient,
    resample_to_template,
)
from brainage_core.data.template import Template, load_template

#: What to do with a subject that fails QC: keep it and flag it, leave it out, or stop.
QC_POLICIES = ("warn", "skip", "raise")

#: Percentiles of the brain intensities compared with the reference cohort's.
QC_PERCENTILES = np.arange(1, 100, dtype=float)

#: The shell around the brain mask where a skull would be: from this far (mm) ...
SHELL_INNER_MM = 4.0
#: ... to this far (mm).
SHELL_OUTER_MM = 20.0

#: Grid (mm) of the orientation search (coarse is enough to tell 90° apart).
ORIENTATION_SEARCH_RESOLUTION = 8


@dataclass(frozen=True)
class QCThresholds:
    """Limits outside which an image is flagged (see the module docstring).

    Attributes
    ----------
    ncc_ratio_min : float, default=0.8
        Lowest similarity to the template, as a fraction of the reference cohort's median
        (the training cohort in ``predict``, the cohort itself in ``prepare``).
    coverage_min : float, default=0.97
        Lowest share of the template brain mask inside the field of view.
    outside_ratio_max : float, default=0.4
        Highest signal just outside the brain relative to inside.
    intensity_distance_max : float, default=0.15
        Largest distance of the brain intensity percentiles from the reference's.
    voxel_size_max : float, default=3.0
        Largest voxel side of the source image, mm (or the grid's spacing if coarser).
    orientation_gain : float, default=0.15
        Another reading of the axes whose NCC beats the header's by this much (and passes
        the NCC limit) means the orientation code is wrong.
    ood_max : float or None, default=None
        Highest out-of-distribution score; None uses the run's calibrated threshold.
    """

    ncc_ratio_min: float = 0.8
    coverage_min: float = 0.97
    outside_ratio_max: float = 0.4
    intensity_distance_max: float = 0.15
    voxel_size_max: float = 3.0
    orientation_gain: float = 0.15
    ood_max: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def ncc_min(self, reference: dict[str, Any]) -> float:
        """The NCC limit for a reference cohort (``reference["ncc_median"]``)."""
        return self.ncc_ratio_min * float(reference["ncc_median"])


@dataclass
class QCResult:
    """The preprocessed image and its QC measures.

    Attributes
    ----------
    image : numpy.ndarray of float32
        The preprocessed image, exactly as :func:`preprocess_image` gives it.
    measures : dict
        ``ncc``, ``coverage``, ``outside_ratio``, ``voxel_size``, ``orientation`` and,
        when the NCC is low, ``orientation_fix_ncc`` and ``orientation_fix``.
    """

    image: np.ndarray
    measures: dict[str, Any]


def preprocess_with_qc(img: ImageLike, template: Template) -> QCResult:
    """Preprocess one image exactly like :func:`preprocess_image` and measure its QC.

    Parameters
    ----------
    img : str, os.PathLike or nibabel image
        The image.
    template : Template
        The grid of the run or cohort.

    Returns
    -------
    QCResult
        The intensity distance is added later, against a reference
        (:func:`intensity_distance`).
    """
    name = _name(img)
    source = load_image(img)
    canonical = reorient(source)
    resampled = resample_to_template(canonical, template)
    image = normalise_intensities(resampled, template.mask, name)
    measures: dict[str, Any] = {
        "ncc": ncc(image, template),
        "coverage": coverage(canonical, template),
        "outside_ratio": outside_ratio(canonical),
        "voxel_size": float(np.max(source.header.get_zooms()[:3])),
        "orientation": "".join(nib.aff2axcodes(source.affine)),
    }
    return QCResult(image=image, measures=measures)


def ncc(image: np.ndarray, template: Template) -> float:
    """Normalised cross-correlation of a preprocessed image with the template T1 in the mask."""
    a = np.asarray(image, dtype=np.float64)[template.mask]
    b = np.asarray(template.t1, dtype=np.float64)[template.mask]
    a, b = a - a.mean(), b - b.mean()
    denom = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denom) if denom > 0 else 0.0


def coverage(img: nib.Nifti1Image, template: Template) -> float:
    """Share of the template brain mask's voxels that fall inside the image's field of view."""
    ijk = np.argwhere(template.mask)
    world = nib.affines.apply_affine(template.affine, ijk)
    src = nib.affines.apply_affine(np.linalg.inv(img.affine), world)
    shape = np.asarray(img.shape[:3])
    inside = np.all((src >= -0.5) & (src <= shape - 0.5), axis=1)
    return float(inside.mean()) if len(inside) else 0.0


def outside_ratio(img: nib.Nifti1Image, resolution: int = ORIENTATION_SEARCH_RESOLUTION) -> float:
    """Mean absolute intensity in a shell around the brain over the mean inside it.

    The image is resampled onto the uncropped template grid (which holds the whole head), so
    a skull left on is seen even where the study's cropped grid would cut it off.
    """
    full = load_template(resolution, crop=False)
    data = np.abs(resample_to_template(img, full))
    inner = max(int(round(SHELL_INNER_MM / resolution)), 1)
    outer = max(int(round(SHELL_OUTER_MM / resolution)), inner + 1)
    near = ndimage.binary_dilation(full.mask, iterations=inner)
    far = ndimage.binary_dilation(full.mask, iterations=outer)
    shell = far & ~near
    inside = float(data[full.mask].mean()) if full.mask.any() else 0.0
    if inside <= 0:
        return float("inf")
    return float(data[shell].mean()) / inside


def intensity_percentiles(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Percentiles :data:`QC_PERCENTILES` of a preprocessed image's brain intensities."""
    return np.percentile(np.asarray(image, dtype=np.float64)[mask], QC_PERCENTILES)


def intensity_distance(image: np.ndarray, mask: np.ndarray, reference: np.ndarray) -> float:
    """Mean absolute difference of the brain-intensity percentiles from a reference profile.

    This is the 1-Wasserstein distance between the two intensity distributions, estimated
    on 99 percentiles.
    """
    return float(np.mean(np.abs(intensity_percentiles(image, mask) - np.asarray(reference))))


def orientation_search(img: ImageLike) -> dict[str, Any]:
    """Read an image's axes in each of the 48 ways and compare each with the template.

    Every reading (a permutation of the canonical axes, some of them flipped) is placed with
    its intensity centre of mass on the template brain's, on an 8 mm grid, so a head that is
    only displaced scores well under the identity reading.

    Returns
    -------
    dict
        ``orientation_identity_ncc`` (the NCC of the header's reading, centred),
        ``orientation_fix_ncc`` (the best NCC among the 47 other readings) and
        ``orientation_fix`` (that reading: the permutation and the flipped axes).
    """
    template = load_template(ORIENTATION_SEARCH_RESOLUTION)
    canonical = reorient(load_image(img))
    data = np.abs(np.asarray(canonical.dataobj, dtype=np.float32))
    zooms = np.asarray(canonical.header.get_zooms()[:3], dtype=float)
    target = nib.affines.apply_affine(
        template.affine, np.argwhere(template.mask).mean(axis=0)
    )
    identity, best = -1.0, (-1.0, "")
    for perm in itertools.permutations(range(3)):
        for flips in itertools.product((False, True), repeat=3):
            moved = np.transpose(data, perm)
            for axis, flip in enumerate(flips):
                if flip:
                    moved = np.flip(moved, axis)
            affine = np.diag([*zooms[list(perm)], 1.0])
            com = np.asarray(ndimage.center_of_mass(moved))
            affine[:3, 3] = target - affine[:3, :3] @ com
            try:
                resampled = resample_to_template(nib.Nifti1Image(moved.copy(), affine), template)
                score = ncc(normalise_intensities(resampled, template.mask), template)
            except BrainAgeInputError:
                continue
            if perm == (0, 1, 2) and not any(flips):
                identity = score
            elif score > best[0]:
                flipped = "".join("xyz"[a] for a, flip in enumerate(flips) if flip)
                best = (score, f"axes {perm}" + (f", {flipped} flipped" if flipped else ""))
    return {"orientation_identity_ncc": float(identity), "orientation_fix_ncc": float(best[0]),
            "orientation_fix": best[1]}


def qc_reasons(measures: dict[str, Any], thresholds: QCThresholds,
               reference: dict[str, Any], *, resolution: float = 0.0) -> list[str]:
    """The reasons (a code, the figure and its limit) why an image fails QC; empty if none.

    Parameters
    ----------
    measures : dict
        From :func:`preprocess_with_qc`, plus ``intensity_distance``, the orientation
        search's keys when it ran (:func:`needs_orientation_search`) and ``ood`` when the
        run has an out-of-distribution score.
    thresholds : QCThresholds
        The limits.
    reference : dict
        The reference cohort: ``ncc_median`` and, for ``ood``, ``ood_max`` (the calibrated
        threshold; ``thresholds.ood_max`` wins if set).
    resolution : float, default=0
        The grid spacing (mm): voxels up to this size are never flagged.
    """
    t = thresholds
    ncc_min = t.ncc_min(reference)
    out = []
    fix, ident = measures.get("orientation_fix_ncc"), measures.get("orientation_identity_ncc")
    if fix is not None and ident is not None and fix >= ncc_min and (
        fix - ident >= t.orientation_gain
    ):
        out.append(
            f"orientation: header says {measures['orientation']}, but the image matches the "
            f"template only with {measures['orientation_fix']} (NCC {fix:.2f} vs {ident:.2f})"
        )
    elif measures["ncc"] < ncc_min:
        out.append(f"ncc: similarity to the template {measures['ncc']:.2f} < {ncc_min:.2f} "
                   "(not registered to MNI space?)")
    if measures["coverage"] < t.coverage_min:
        out.append(f"coverage: {100 * measures['coverage']:.0f}% of the brain mask in the field "
                   f"of view < {100 * t.coverage_min:.0f}%")
    if measures["outside_ratio"] > t.outside_ratio_max:
        out.append(f"outside_ratio: signal around the brain {measures['outside_ratio']:.2f} of "
                   f"the brain's > {t.outside_ratio_max:g} (skull not removed?)")
    dist = measures.get("intensity_distance")
    if dist is not None and np.isfinite(dist) and dist > t.intensity_distance_max:
        out.append(f"intensity: distribution {dist:.2f} from the reference cohort's > "
                   f"{t.intensity_distance_max:g} (another contrast?)")
    voxel_max = max(t.voxel_size_max, float(resolution))
    if measures["voxel_size"] > voxel_max + 1e-6:
        out.append(f"voxel_size: {measures['voxel_size']:.1f} mm > {voxel_max:g} mm")
    limit = t.ood_max if t.ood_max is not None else reference.get("ood_max")
    ood = measures.get("ood")
    if limit is not None and ood is not None and np.isfinite(ood) and ood > limit:
        out.append(f"ood: out-of-distribution score {ood:.2f} > {limit:.2f} "
                   "(unlike the training images)")
    return out


def reason_codes(reasons: list[str]) -> list[str]:
    """The codes (``ncc``, ``orientation``, ...) of :func:`qc_reasons`' reasons."""
    return [r.split(":", 1)[0] for r in reasons]


def needs_orientation_search(measures: dict[str, Any], thresholds: QCThresholds,
                             reference: dict[str, Any]) -> bool:
    """Whether the NCC is low enough to try the other readings of the axes."""
    return measures["ncc"] < thresholds.ncc_min(reference)


def check_qc_policy(name: str, value: Any) -> str:
    """Validate a QC policy (``warn``, ``skip`` or ``raise``)."""
    check_choice(name, value, QC_POLICIES)
    return str(value)


def _name(img: ImageLike) -> str | os.PathLike:
    if isinstance(img, nib.spatialimages.SpatialImage):
        return img.get_filename() or "<image in memory>"
    return img
