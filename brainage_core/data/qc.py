"""Input quality control: is an image what the model expects before anything is trusted?

The most common complaint of brain-age users is "nonsense on my data", and its usual cause
is an image that was not preprocessed like the training images. :func:`image_qc` measures,
for one image, on the same path as :func:`~brainage_core.data.preprocess.preprocess_image`:

=======================  ==========================================================  ==============
measure                  what it is                                                  flagged if
=======================  ==========================================================  ==============
``ncc``                  normalised cross-correlation of the preprocessed image      < 0.5 x the
                         with the template T1, inside the brain mask                 reference's
                                                                                     median
``pose`` (registration)  the best of 24 small rigid moves (rotations of 10 and 20    NCC x 1.3
                         degrees about each axis, shifts of 10 and 20 mm along
                         each): does the image fit the template better moved?
``orientation``          the best of the 47 other readings of the orientation code   NCC + 0.15
                         (axes permuted and flipped, centred on the template brain)
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
=======================  ==========================================================  ==============

The reference cohort is the run's training split in ``predict`` and the cohort itself in
``prepare``. The pose and orientation searches run (on an 8 mm grid, after an 8 mm
smoothing; about 0.3 s) only for an image whose NCC is below 0.9 x the reference's median.

Why a search and not an NCC threshold: the similarity of a clean image to the MNI template
depends on the grid, the contrast, the noise and the individual anatomy. On the quick
preset's 80 synthetic subjects (8 mm grid) clean images score 0.41-0.73 (median 0.54),
and the same subjects rotated by 20 degrees score as much as 0.73 x the median: no
threshold on the NCC alone separates them. Moving the image tells: a clean image gains at
most 1.17 x from the best move (80 subjects), an image rotated by 20 degrees or shifted by
2 cm gains 1.46-2.43 x (tests, 8 and 4 mm).

The other defaults were set on the same cohorts: clean subjects have coverage 1, outside
ratio below 0.08 and intensity distance below 0.10; a skull (a bright shell 8-20 mm around
the brain) gives an outside ratio of 0.57-0.98, an inverted contrast an intensity distance
of 0.31-0.37, and a swapped orientation code is found by the search (NCC 0.56-0.64 against
0.16-0.20). Change them with ``QCThresholds(...)``.

A second, model-based check, the out-of-distribution score in the predictor's features,
lives with the model (:mod:`brainage_core.models.ood`).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage
from tqdm.auto import tqdm

from brainage_core._utils.validation import BrainAgeInputError, check_choice
from brainage_core.data.preprocess import (
    ImageLike,
    align,
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
    ncc_ratio_min : float, default=0.5
        Lowest similarity to the template, as a fraction of the reference cohort's median
        (the training cohort in ``predict``, the cohort itself in ``prepare``): below it the
        image is not even like a brain in MNI space.
    search_ratio : float, default=0.9
        Below this fraction of the median NCC, the pose and orientation searches run.
    pose_gain : float, default=1.3
        A rigid move (:func:`pose_search`) that raises the NCC by this factor means the
        image is not registered to MNI space.
    coverage_min : float, default=0.97
        Lowest share of the template brain mask inside the field of view.
    outside_ratio_max : float, default=0.4
        Highest signal just outside the brain relative to inside.
    intensity_distance_max : float, default=0.15
        Largest distance of the brain intensity percentiles from the reference's.
    voxel_size_max : float, default=3.0
        Largest voxel side of the source image, mm (or the grid's spacing if coarser).
    orientation_gain : float, default=0.15
        Another reading of the axes whose NCC beats the header's by this much (and reaches
        ``search_ratio`` x the median) means the orientation code is wrong.
    ood_max : float or None, default=None
        Highest out-of-distribution score; None uses the run's calibrated threshold.
    """

    ncc_ratio_min: float = 0.5
    search_ratio: float = 0.9
    pose_gain: float = 1.3
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

    def search_below(self, reference: dict[str, Any]) -> float:
        """The NCC below which the pose and orientation searches run."""
        return self.search_ratio * float(reference["ncc_median"])


@dataclass
class QCResult:
    """The preprocessed image and its QC measures.

    Attributes
    ----------
    image : numpy.ndarray of float32
        The preprocessed image, exactly as :func:`preprocess_image` gives it.
    aligned : nibabel.Nifti1Image
        The source image as it entered the resampling (registered if asked); the pose and
        orientation searches look at it.
    measures : dict
        ``ncc``, ``coverage``, ``outside_ratio``, ``voxel_size``, ``orientation`` and,
        when the NCC is low, ``orientation_fix_ncc`` and ``orientation_fix``.
    """

    image: np.ndarray
    measures: dict[str, Any]
    aligned: nib.Nifti1Image


def preprocess_with_qc(img: ImageLike, template: Template, *, register: bool = False
                       ) -> QCResult:
    """Preprocess one image exactly like :func:`preprocess_image` and measure its QC.

    Parameters
    ----------
    img : str, os.PathLike or nibabel image
        The image.
    template : Template
        The grid of the run or cohort.
    register : bool, default=False
        Register the image to the MNI template first (the measures then judge the
        registered image: a registration that failed is flagged, never silently kept).

    Returns
    -------
    QCResult
        The intensity distance is added later, against a reference
        (:func:`intensity_distance`).
    """
    name = _name(img)
    source = load_image(img)
    aligned = align(source, register, name)
    canonical = reorient(aligned)
    resampled = resample_to_template(canonical, template)
    image = normalise_intensities(resampled, template.mask, name)
    measures: dict[str, Any] = {
        "ncc": ncc(image, template),
        "coverage": coverage(canonical, template),
        "outside_ratio": outside_ratio(canonical),
        "voxel_size": float(np.max(source.header.get_zooms()[:3])),
        "orientation": "".join(nib.aff2axcodes(source.affine)),
    }
    return QCResult(image=image, measures=measures, aligned=aligned)


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


def search_image(img: ImageLike) -> nib.Nifti1Image:
    """The image as the pose and orientation searches score it: canonical and smoothed.

    A Gaussian of FWHM :data:`ORIENTATION_SEARCH_RESOLUTION` mm (the searches' grid) keeps
    the sampling on that grid from aliasing: without it the image as it is, sampled at
    the grid's points, looks sharper than any moved copy, which is interpolated between
    them, and a moved copy of a registered image scores too well (8 false "not registered"
    flags among the 209 searched subjects of the realistic default cohort, against 4 with
    the smoothing).
    """
    canonical = reorient(load_image(img))
    zooms = np.asarray(canonical.header.get_zooms()[:3], dtype=float)
    sigma = ORIENTATION_SEARCH_RESOLUTION / np.sqrt(8 * np.log(2)) / zooms
    data = ndimage.gaussian_filter(np.asarray(canonical.dataobj, dtype=np.float32), sigma)
    return nib.Nifti1Image(data, canonical.affine, canonical.header)


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
    return _orientation_search(search_image(img))


def _orientation_search(canonical: nib.Nifti1Image) -> dict[str, Any]:
    template = load_template(ORIENTATION_SEARCH_RESOLUTION)
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
                resampled = resample_to_template(nib.Nifti1Image(moved.copy(), affine), template,
                                                 interpolation="linear")
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


#: Rigid moves tried by :func:`pose_search`: rotations (degrees) about each axis through
#: the template brain's centre, and shifts (mm) along each axis.
POSE_ROTATIONS_DEG = (-20.0, -10.0, 10.0, 20.0)
POSE_SHIFTS_MM = (-20.0, -10.0, 10.0, 20.0)


def pose_search(img: ImageLike) -> dict[str, Any]:
    """Is the image at the template's pose? Try small rigid moves and see if one fits better.

    A registered image matches the template best where it is; an image rotated or shifted
    away from MNI space matches better once moved back. Each of 24 moves (rotations of
    :data:`POSE_ROTATIONS_DEG` about each axis through the brain's centre, shifts of
    :data:`POSE_SHIFTS_MM` along each) is applied to the image's affine and scored by NCC
    on an 8 mm grid.

    Returns
    -------
    dict
        ``pose_identity_ncc`` (the image as it is, on that grid), ``pose_fix_ncc`` (the best
        move's) and ``pose_fix`` (the move, e.g. ``rotate -20 deg about x``).
    """
    return _pose_search(search_image(img))


def _pose_search(canonical: nib.Nifti1Image) -> dict[str, Any]:
    template = load_template(ORIENTATION_SEARCH_RESOLUTION)
    data = np.asarray(canonical.dataobj)
    centre = nib.affines.apply_affine(template.affine, np.argwhere(template.mask).mean(axis=0))

    def score(move: np.ndarray) -> float:
        moved = nib.Nifti1Image(data, move @ canonical.affine)
        try:
            data_moved = resample_to_template(moved, template, interpolation="linear")
            return ncc(normalise_intensities(data_moved, template.mask), template)
        except BrainAgeInputError:
            return -1.0

    identity = score(np.eye(4))
    best = (-1.0, "")
    for axis in range(3):
        for degrees in POSE_ROTATIONS_DEG:
            t = np.deg2rad(degrees)
            rot = np.eye(4)
            i, j = [a for a in range(3) if a != axis]
            rot[[i, i, j, j], [i, j, i, j]] = [np.cos(t), -np.sin(t), np.sin(t), np.cos(t)]
            rot[:3, 3] = centre - rot[:3, :3] @ centre
            value = score(rot)
            if value > best[0]:
                best = (value, f"rotated {degrees:+g} deg about {'xyz'[axis]}")
        for mm in POSE_SHIFTS_MM:
            shift = np.eye(4)
            shift[axis, 3] = mm
            value = score(shift)
            if value > best[0]:
                best = (value, f"shifted {mm:+g} mm along {'xyz'[axis]}")
    return {"pose_identity_ncc": float(identity), "pose_fix_ncc": float(best[0]),
            "pose_fix": best[1]}


def qc_reasons(measures: dict[str, Any], thresholds: QCThresholds,
               reference: dict[str, Any], *, resolution: float = 0.0) -> list[str]:
    """The reasons (a code, the figure and its limit) why an image fails QC; empty if none.

    Parameters
    ----------
    measures : dict
        From :func:`preprocess_with_qc`, plus ``intensity_distance``, the orientation
        search's keys when it ran (:func:`needs_search`) and ``ood`` when the
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
    pose, pose_ident = measures.get("pose_fix_ncc"), measures.get("pose_identity_ncc")
    if fix is not None and ident is not None and fix >= t.search_below(reference) and (
        fix - ident >= t.orientation_gain
    ):
        out.append(
            f"orientation: header says {measures['orientation']}, but the image matches the "
            f"template only with {measures['orientation_fix']} (NCC {fix:.2f} vs {ident:.2f})"
        )
    elif pose is not None and pose_ident is not None and pose_ident > 0 and (
        pose >= t.pose_gain * pose_ident  # (an image unlike the template is not misplaced)
    ):
        out.append(
            f"registration: the image matches the template better {measures['pose_fix']} "
            f"(NCC {pose:.2f} vs {pose_ident:.2f}): not registered to MNI space?"
        )
    elif measures["ncc"] < ncc_min:
        out.append(f"ncc: similarity to the template {measures['ncc']:.2f} < {ncc_min:.2f} "
                   "(not a T1 brain image in MNI space?)")
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


def needs_search(measures: dict[str, Any], thresholds: QCThresholds,
                 reference: dict[str, Any]) -> bool:
    """Whether the NCC is low enough to try other poses and readings of the axes."""
    return measures["ncc"] < thresholds.search_below(reference)


def search_pose_and_orientation(img: ImageLike) -> dict[str, Any]:
    """:func:`pose_search` and :func:`orientation_search` together."""
    canonical = search_image(img)
    return {**_pose_search(canonical), **_orientation_search(canonical)}


def check_qc_policy(name: str, value: Any) -> str:
    """Validate a QC policy (``warn``, ``skip`` or ``raise``)."""
    check_choice(name, value, QC_POLICIES)
    return str(value)


def _name(img: ImageLike) -> str | os.PathLike:
    if isinstance(img, nib.spatialimages.SpatialImage):
        return img.get_filename() or "<image in memory>"
    return img


def cohort_qc(
    table: pd.DataFrame,
    template: Template,
    *,
    thresholds: QCThresholds | None = None,
    register: bool = False,
    progress: bool = True,
    measured: Mapping[str, Mapping[str, Any]] | None = None,
) -> pd.DataFrame:
    """QC of every image of a cohort, against the cohort itself (``prepare``, notebook 01).

    Each image is measured on its own (:func:`preprocess_with_qc`, streamed: one image in
    memory at a time); the reference is then the cohort's median NCC and median intensity
    percentiles, so an image is flagged when it is unlike the template *and* unlike the rest
    of its cohort.

    Parameters
    ----------
    table : pandas.DataFrame
        A manifest or a prepared cohort's table (``participant_id``, ``path``).
    template : Template
        The grid.
    thresholds : QCThresholds or None, default=None
        The limits (None: the documented defaults).
    register : bool, default=False
        Register each image first, as ``prepare --register`` does.
    progress : bool, default=True
        Show a progress bar.
    measured : mapping or None, default=None
        Measures already taken, by image path (``{"measures": ..., "profile": ...}``, as
        :meth:`~brainage_core.data.cache.PreparedCohort.qc_measures` gives those taken
        while the images were prepared): those images are not read again.

    Returns
    -------
    pandas.DataFrame
        ``participant_id``, ``path``, the measures, ``qc_pass``, ``qc_flags`` (codes joined
        by ``;``) and ``qc_reasons``; an image that cannot be read is flagged
        ``unreadable`` (``prepare`` reports it through its own ``on_error``).
    """
    thresholds = thresholds or QCThresholds()
    rows: list[dict[str, Any]] = []
    profiles: list[np.ndarray | None] = []
    for rec in tqdm(table[["participant_id", "path"]].itertuples(index=False), total=len(table),
                    desc="QC", unit="img", disable=None if progress else True):
        row: dict[str, Any] = {"participant_id": rec.participant_id, "path": rec.path}
        known = (measured or {}).get(str(rec.path))
        if known is not None:
            row.update(known["measures"])
            profiles.append(np.asarray(known["profile"], dtype=float))
            rows.append(row)
            continue
        try:
            result = preprocess_with_qc(str(rec.path), template, register=register)
        except BrainAgeInputError as err:
            row["error"] = str(err)
            profiles.append(None)
        else:
            row.update(result.measures)
            profiles.append(intensity_percentiles(result.image, template.mask))
        rows.append(row)
    return judge_cohort(rows, profiles, template, thresholds=thresholds, register=register)


def judge_cohort(
    rows: list[dict[str, Any]],
    profiles: list[np.ndarray | None],
    template: Template,
    *,
    thresholds: QCThresholds | None = None,
    register: bool = False,
) -> pd.DataFrame:
    """Flag a cohort's images from their measures (the second half of :func:`cohort_qc`).

    Parameters
    ----------
    rows : list of dict
        One per image: ``participant_id``, ``path`` and the measures of
        :func:`preprocess_with_qc`, or ``error`` (the image could not be read).
    profiles : list of numpy.ndarray or None
        The images' :func:`intensity_percentiles` (None where ``error``).
    template, thresholds, register
        As :func:`cohort_qc`.

    Returns
    -------
    pandas.DataFrame
        As :func:`cohort_qc`. Only the images whose NCC is low are read again, for the pose
        and orientation searches.
    """
    thresholds = thresholds or QCThresholds()
    rows = [dict(r) for r in rows]
    valid = [p for p in profiles if p is not None]
    nccs = [r["ncc"] for r in rows if "ncc" in r]
    reference = {
        "ncc_median": float(np.median(nccs)) if nccs else 0.0,
        "intensity_percentiles": np.median(valid, axis=0) if valid else None,
    }
    for row, profile in zip(rows, profiles, strict=True):
        if profile is None:
            row.update(qc_pass=False, qc_reasons=[f"unreadable: {row.pop('error')}"])
            continue
        row["intensity_distance"] = float(
            np.mean(np.abs(profile - reference["intensity_percentiles"])))
        if needs_search(row, thresholds, reference):
            # streamed: a registered image is registered again for its search
            path = str(row["path"])
            row.update(search_pose_and_orientation(
                align(load_image(path), True, path) if register else path))
        reasons = qc_reasons(row, thresholds, reference, resolution=template.resolution)
        row.update(qc_pass=not reasons, qc_reasons=reasons)
    out = pd.DataFrame(rows)
    out["qc_flags"] = [";".join(reason_codes(r)) for r in out["qc_reasons"]]
    out["qc_reasons"] = [" | ".join(r) for r in out["qc_reasons"]]
    out.attrs["reference"] = {"ncc_median": reference["ncc_median"]}
    return out
