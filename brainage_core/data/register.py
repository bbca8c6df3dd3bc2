"""Affine registration of a raw T1 image to the MNI152 template (SimpleITK).

Off by default (images are expected in MNI space); ``prepare --register``,
``data.register: true`` in a study config, and ``predict`` with a run trained that way turn
it on, and it is part of the cache key (:data:`REGISTRATION`).

:func:`register_to_template` estimates ``native_from_mni``, the 4x4 RAS+ millimetre mapping
of a point of the template brain to the same point of the subject's head:

1. the two images' intensity centres of mass are aligned (no orientation is assumed beyond
   the header's);
2. a rigid transform (6 parameters), then an affine one (12), maximise the Mattes mutual
   information between the image and the skull-stripped MNI152 2009 template on a
   :data:`REGISTRATION_RESOLUTION` mm grid, at three scales (shrink 4, 2, 1; smoothing 2,
   1, 0 voxels), by regular-step gradient descent (10 % of the voxels sampled, at most 100
   iterations per scale, one thread).

:func:`apply_registration` then gives the image the affine that maps its voxels into MNI
space (``inv(native_from_mni) @ affine``), so the usual resampling, mask and
normalisation follow unchanged. An implausible result (a scale outside
:data:`SCALE_RANGE`, or a failure of the optimiser) is an error naming the file; a poor
alignment that is still plausible is caught by the QC's similarity to the template.

Why SimpleITK rather than ANTsPy: ANTsPy (``antspyx`` 0.6.3, a 22 MB wheel for Python 3.11,
90 MB installed) was measured on the same native-space images and is both more accurate and
faster (see ``book/real_data.md``: on 20 subjects with the generator's default anatomy,
90 % below one 2 mm voxel in 2.0 s against SimpleITK's 70 % in 4.9 s, one thread each), but
it requires ``numpy<2.4`` and ``scipy<1.16``: installing it would downgrade the study's
numpy and scipy, so it is not a dependency. SimpleITK (``simpleitk`` 2.5.7, about 50 MB,
no dependency) stays; ``brainage-study bench data --registration`` prints its figures.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import nibabel as nib
import numpy as np

from brainage_core._utils.validation import BrainAgeInputError
from brainage_core.data.template import load_template

#: Grid (mm) of the template the images are registered to.
REGISTRATION_RESOLUTION = 4

#: Share of the template's voxels sampled by the metric, and optimiser iterations per level.
SAMPLING = 0.1
ITERATIONS = 100

#: Threads of one registration (``prepare`` runs one per worker process).
THREADS = 1

#: Scales of the affine outside which a registration is reported as failed.
SCALE_RANGE = (0.6, 1.6)

#: Description stored in the cache key and the run's index when registration is on.
REGISTRATION = {
    "library": "SimpleITK",
    "transform": "rigid then affine",
    "metric": "Mattes mutual information, 32 bins",
    "fixed": f"MNI152 2009 skull-stripped template, {REGISTRATION_RESOLUTION} mm",
    "scales": [4, 2, 1],
    "sampling": 0.1,
    # seeded (session 10): caches registered with the wall-clock seed are not reused
    "sampling_seed": "seed + 1",
    "iterations": 100,
}

_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class Registration:
    """The result of :func:`register_to_template`.

    Attributes
    ----------
    native_from_mni : numpy.ndarray of shape (4, 4)
        RAS+ mm: a template point to the same point of the subject.
    metric : float
        Final Mattes mutual information (negative; lower is better).
    seconds : float
        Wall time.
    """

    native_from_mni: np.ndarray
    metric: float
    seconds: float


def _to_sitk(data: np.ndarray, affine: np.ndarray):
    import SimpleITK as sitk

    lps = _LPS @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(data, (2, 1, 0)),
                                                        dtype=np.float32))
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(v) for v in lps[:3, 3]])
    image.SetDirection([float(v) for v in (lps[:3, :3] / spacing).ravel()])
    return image


def register_to_template(img: nib.Nifti1Image, name: str | os.PathLike = "<image>",
                         *, seed: int = 0) -> Registration:
    """Estimate the affine mapping of the MNI template onto an image (see module docstring).

    Parameters
    ----------
    img : nibabel.Nifti1Image
        A validated 3D image (:func:`~brainage_core.data.preprocess.load_image`).
    name : str or os.PathLike, default="<image>"
        File named in errors.
    seed : int, default=0
        Seed of the metric's random sampling: the same image and seed give the same
        transform. SimpleITK reads a seed of 0 as "seed from the wall clock", so it is
        given ``seed + 1``.

    Raises
    ------
    BrainAgeInputError
        Naming the file when the optimiser fails or the result is implausible.
    """
    import SimpleITK as sitk

    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise BrainAgeInputError(f"'seed' must be an integer >= 0; {seed!r} was given.")
    start = time.perf_counter()
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(THREADS)
    try:
        return _register(img, name, seed, start)
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def _register(img: nib.Nifti1Image, name: str | os.PathLike, seed: int, start: float
              ) -> Registration:
    import SimpleITK as sitk

    template = load_template(REGISTRATION_RESOLUTION, crop=False)
    fixed = _to_sitk(template.t1, template.affine)
    moving = _to_sitk(np.asarray(img.dataobj, dtype=np.float32), np.asarray(img.affine))
    try:
        rigid = sitk.CenteredTransformInitializer(
            fixed, moving, sitk.Euler3DTransform(),
            sitk.CenteredTransformInitializerFilter.MOMENTS)
        rigid = _run(fixed, moving, rigid, seed, iterations=ITERATIONS)
        affine = sitk.AffineTransform(3)
        affine.SetCenter(rigid.GetCenter())
        affine.SetMatrix(rigid.GetMatrix())
        affine.SetTranslation(rigid.GetTranslation())
        method = _method(seed, iterations=ITERATIONS)
        method.SetInitialTransform(affine, inPlace=True)
        method.Execute(fixed, moving)
        metric = float(method.GetMetricValue())
    except RuntimeError as err:
        raise BrainAgeInputError(f"registration to the MNI template failed: "
                                 f"{str(err).strip().splitlines()[-1]}", name) from err
    matrix = np.asarray(affine.GetMatrix()).reshape(3, 3)
    centre = np.asarray(affine.GetCenter())
    lps = np.eye(4)
    lps[:3, :3] = matrix
    lps[:3, 3] = centre + np.asarray(affine.GetTranslation()) - matrix @ centre
    ras = _LPS @ lps @ _LPS
    scales = np.linalg.svd(ras[:3, :3], compute_uv=False)
    if not (SCALE_RANGE[0] <= scales.min() and scales.max() <= SCALE_RANGE[1]) or not np.all(
        np.isfinite(ras)
    ):
        raise BrainAgeInputError(
            f"registration to the MNI template gave an implausible transform (scales "
            f"{np.round(scales, 2).tolist()}, outside {list(SCALE_RANGE)}): is this a brain "
            "image?", name)
    return Registration(native_from_mni=ras, metric=metric,
                        seconds=time.perf_counter() - start)


def _method(seed: int, iterations: int):
    import SimpleITK as sitk

    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    # + 1: SimpleITK's seed 0 (sitkWallClock) draws a new sample on every call
    method.SetMetricSamplingPercentage(SAMPLING, int(seed) + 1)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=1.0, minStep=1e-4, numberOfIterations=iterations,
        relaxationFactor=0.6, gradientMagnitudeTolerance=1e-8)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([4, 2, 1])
    method.SetSmoothingSigmasPerLevel([2, 1, 0])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    return method


def _run(fixed, moving, transform, seed: int, iterations: int):
    method = _method(seed, iterations)
    method.SetInitialTransform(transform, inPlace=True)
    method.Execute(fixed, moving)
    return transform


def apply_registration(img: nib.Nifti1Image, native_from_mni: np.ndarray) -> nib.Nifti1Image:
    """The image with an affine that maps its voxels into MNI space (data unchanged)."""
    affine = np.linalg.inv(native_from_mni) @ np.asarray(img.affine)
    out = nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32), affine)
    out.header.set_xyzt_units("mm")
    return out


def residual_displacement(estimated: np.ndarray, truth: np.ndarray,
                          resolution: int = REGISTRATION_RESOLUTION) -> dict[str, float]:
    """How far the estimated transform puts the template brain's voxels from the truth.

    Returns
    -------
    dict
        ``mean_mm`` and ``max_mm`` of ``|estimated(x) - truth(x)|`` over the brain-mask
        voxels of the template (``resolution`` mm grid).
    """
    template = load_template(resolution)
    points = nib.affines.apply_affine(template.affine, np.argwhere(template.mask))
    diff = (nib.affines.apply_affine(estimated, points)
            - nib.affines.apply_affine(truth, points))
    dist = np.linalg.norm(diff, axis=1)
    return {"mean_mm": float(dist.mean()), "max_mm": float(dist.max())}
