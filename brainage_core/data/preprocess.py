"""One preprocessing path for every image, whatever its source.

:func:`preprocess_image` runs, in this order:

1. **validate** (:func:`load_image`): the file exists and reads completely, the image is
   3D (a 4D image with one volume is squeezed; several volumes are an error), every voxel
   is finite and the affine is invertible with non-zero voxel sizes. Intensities whose
   magnitude float32 cannot hold well (beyond 2**100, below 2**-20) are rescaled by an
   exact power of two; the normalisation removes any global scale anyway;
2. **reorient** to canonical RAS+ (:func:`nibabel.as_closest_canonical`);
3. **resample** onto the template grid (:func:`nilearn.image.resample_img`, continuous
   interpolation, zero outside the field of view);
4. **mask** with the template's brain mask;
5. **normalise** intensities: a robust min–max scaling inside the mask,
   ``(x - p1) / (p99 - p1)`` with ``p1``/``p99`` the 1st/99th percentiles of the brain
   voxels, so that the darkest brain tissue (CSF) sits near 0, white matter near 1, and
   the background is exactly 0. It removes any global scale and offset of the scanner's
   intensities (T1 units are arbitrary), and unlike a z-score it keeps the background
   distinct from average tissue. Values are clipped to ``[-0.5, 1.5]`` to bound outliers.

Every problem is a :class:`~brainage_core._utils.validation.BrainAgeInputError` naming the file.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
from nilearn.image import resample_img

from brainage_core._utils.validation import BrainAgeInputError
from brainage_core.data.template import Template

#: Percentiles (inside the brain mask) mapped to 0 and 1 by the intensity normalisation.
NORMALISATION_PERCENTILES = (1.0, 99.0)

#: Normalised intensities are clipped to this range.
NORMALISATION_CLIP = (-0.5, 1.5)

#: Description of the preprocessing stored with every cache (part of its key).
PREPROCESSING = {
    "orientation": "RAS (nibabel.as_closest_canonical)",
    "resampling": "nilearn.image.resample_img, continuous",
    "mask": "template brain mask",
    "normalisation": {
        "kind": "percentile min-max inside mask",
        "percentiles": list(NORMALISATION_PERCENTILES),
        "clip": list(NORMALISATION_CLIP),
    },
}

ImageLike = str | os.PathLike | nib.spatialimages.SpatialImage


def load_image(img: ImageLike) -> nib.Nifti1Image:
    """Load and validate a 3D image.

    Parameters
    ----------
    img : str, os.PathLike or nibabel image
        Path of a NIfTI file (``.nii`` or ``.nii.gz``) or an image in memory.

    Returns
    -------
    nibabel.Nifti1Image
        The image with its data in memory (float32), 3D.

    Raises
    ------
    BrainAgeInputError
        Naming the file when it does not exist, cannot be read (truncated or corrupt),
        has several volumes, holds non-finite voxels or has a degenerate affine.
    """
    name: str | os.PathLike
    if isinstance(img, nib.spatialimages.SpatialImage):
        name = img.get_filename() or "<image in memory>"
    else:
        name = Path(img)
        if not name.is_file():
            raise BrainAgeInputError("image file does not exist", name)
        try:
            img = nib.load(name)
        except Exception as err:  # nibabel raises many types for bad files
            raise BrainAgeInputError(
                f"cannot read the image header ({type(err).__name__}: {err}); is it a NIfTI file?",
                name,
            ) from err
    try:
        data = np.asarray(img.dataobj)
    except Exception as err:  # truncated gzip: EOFError, zlib.error, OSError, ValueError
        raise BrainAgeInputError(
            f"cannot read the image data; the file is truncated or corrupt "
            f"({type(err).__name__}: {err})",
            name,
        ) from err
    if not (np.issubdtype(data.dtype, np.integer) or np.issubdtype(data.dtype, np.floating)):
        raise BrainAgeInputError(
            f"voxels of type {data.dtype} are not real numbers; a scalar image was expected",
            name,
        )

    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim == 4:
        raise BrainAgeInputError(
            f"expected a 3D image; got a 4D image with {data.shape[3]} volumes "
            f"(shape {data.shape})",
            name,
        )
    if data.ndim != 3:
        raise BrainAgeInputError(
            f"expected a 3D image; got {data.ndim} dimensions (shape {data.shape})", name
        )
    if min(data.shape) < 2:
        raise BrainAgeInputError(f"image is too small (shape {data.shape})", name)
    n_bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
    if n_bad:
        raise BrainAgeInputError(
            f"{n_bad} non-finite voxel(s) (NaN or inf) out of {data.size}", name
        )
    data = _to_float32(data, name)
    affine = np.asarray(img.affine, dtype=float)
    check_affine(affine, name)
    out = nib.Nifti1Image(data, affine)
    out.header.set_xyzt_units("mm")
    return out


def _to_float32(data: np.ndarray, name: str | os.PathLike) -> np.ndarray:
    """Convert to float32, first rescaling by a power of two if the magnitudes need it.

    Intensities are arbitrary units (the normalisation removes any global scale), but
    float32 cannot hold values beyond about 3e38 and loses precision near 1e-38. A
    power-of-two scale is exact, so an image is changed only when its largest magnitude
    lies outside :data:`_PLAIN_MAGNITUDES` and then only by that exact factor. An image
    whose values span more than float32 can hold at once (an extreme outlier next to
    ordinary intensities) is an error naming both magnitudes.
    """
    peak = float(np.max(np.abs(data))) if data.size else 0.0
    low, high = _PLAIN_MAGNITUDES
    if not (peak > 0 and not low <= peak <= high):
        return np.asarray(data, dtype=np.float32)
    exponent = int(np.frexp(peak)[1])
    original = np.asarray(data, dtype=np.float64)
    scaled = np.ldexp(original, -exponent).astype(np.float32)
    nonzero = original != 0
    lost = int(np.count_nonzero(nonzero & (scaled == 0)))
    if lost > 1e-3 * max(int(np.count_nonzero(nonzero)), 1):
        smallest = float(np.min(np.abs(original[nonzero])))
        raise BrainAgeInputError(
            f"voxel magnitudes range from {smallest:.3g} to {peak:.3g}, more than 32-bit "
            f"floats hold at once: {lost} non-zero voxel(s) would become 0 (an extreme "
            "outlier or a corrupt file?)",
            name,
        )
    return scaled


#: Largest voxel magnitudes used as they are; outside, the image is rescaled exactly
#: (see :func:`_to_float32`).
_PLAIN_MAGNITUDES = (2.0**-20, 2.0**100)


def check_affine(affine: np.ndarray, name: str | os.PathLike = "<image>") -> None:
    """Raise a clear error when an affine is not a usable voxel-to-world mapping.

    Parameters
    ----------
    affine : numpy.ndarray of shape (4, 4)
        The image's affine.
    name : str or os.PathLike, default="<image>"
        File named in the error.
    """
    if affine is None or np.shape(affine) != (4, 4):
        raise BrainAgeInputError(f"affine must be 4x4; got shape {np.shape(affine)}", name)
    if not np.all(np.isfinite(affine)):
        raise BrainAgeInputError("degenerate affine: non-finite entries", name)
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    if np.any(zooms < 1e-6):
        raise BrainAgeInputError(
            f"degenerate affine: zero voxel size (voxel sizes {np.round(zooms, 6).tolist()})",
            name,
        )
    det = float(np.linalg.det(affine[:3, :3]))
    if abs(det) < 1e-6 * float(np.prod(zooms)):
        raise BrainAgeInputError(f"degenerate affine: not invertible (determinant {det:.3g})", name)


def reorient(img: nib.Nifti1Image) -> nib.Nifti1Image:
    """Return the image reoriented to the closest canonical (RAS+) orientation."""
    return nib.as_closest_canonical(img)


def resample_to_template(img: nib.Nifti1Image, template: Template, *,
                         interpolation: str = "continuous") -> np.ndarray:
    """Resample an image onto the template grid.

    Parameters
    ----------
    img : nibabel.Nifti1Image
        The image, in world (MNI) coordinates.
    template : Template
        The grid.
    interpolation : {"continuous", "linear"}, default="continuous"
        nilearn's interpolation: third-order splines for the prepared images, trilinear
        where many candidate placements are only scored (the QC searches; about 3x faster).

    Returns
    -------
    numpy.ndarray of float32
        Array of shape ``template.shape``; zero outside the image's field of view.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        warnings.simplefilter("ignore", category=UserWarning)
        out = resample_img(
            img,
            target_affine=template.affine,
            target_shape=template.shape,
            interpolation=interpolation,
            fill_value=0.0,
            force_resample=True,
            copy_header=True,
        )
    return np.asarray(out.dataobj, dtype=np.float32)


def normalise_intensities(
    data: np.ndarray, mask: np.ndarray, name: str | os.PathLike = "<image>"
) -> np.ndarray:
    """Scale intensities robustly inside the mask and zero the background.

    Parameters
    ----------
    data : numpy.ndarray
        Image on the template grid.
    mask : numpy.ndarray of bool
        Brain mask, same shape.
    name : str or os.PathLike, default="<image>"
        File named in the error when the image is blank inside the mask.

    Returns
    -------
    numpy.ndarray of float32
        ``(data - p1) / (p99 - p1)`` inside the mask (clipped to
        :data:`NORMALISATION_CLIP`), 0 outside.
    """
    values = data[mask]
    lo, hi = np.percentile(values, NORMALISATION_PERCENTILES) if values.size else (0.0, 0.0)
    if not hi - lo > 1e-6 * max(abs(hi), abs(lo), 1e-12):
        raise BrainAgeInputError(
            "image is blank inside the brain mask after resampling to the template "
            f"(1st-99th percentile range [{lo:.3g}, {hi:.3g}]); is it in MNI space and "
            "does it cover the brain?",
            name,
        )
    out = np.zeros(data.shape, dtype=np.float32)
    out[mask] = np.clip((values - lo) / (hi - lo), *NORMALISATION_CLIP)
    return out


def preprocessing_description(register: bool = False) -> dict:
    """What the preprocessing does (stored in the cache key and a run's index).

    :data:`PREPROCESSING`, plus the registration's description when ``register`` is on.
    """
    if not register:
        return PREPROCESSING
    from brainage_core.data.register import REGISTRATION

    return {**PREPROCESSING, "registration": REGISTRATION}


def align(img: nib.Nifti1Image, register: bool, name: str | os.PathLike = "<image>"
          ) -> nib.Nifti1Image:
    """The image itself, or with ``register`` its affinely registered version (MNI space).

    See :mod:`brainage_core.data.register`; a failed or implausible registration is an
    error naming the file.
    """
    if not register:
        return img
    from brainage_core.data.register import apply_registration, register_to_template

    return apply_registration(img, register_to_template(img, name).native_from_mni)


def preprocess_image(img: ImageLike, template: Template, *, register: bool = False
                     ) -> np.ndarray:
    """Validate, (register,) reorient, resample, mask and normalise one image.

    Parameters
    ----------
    img : str, os.PathLike or nibabel image
        The image (in MNI space, any orientation or voxel size; or, with ``register``, in
        any space).
    template : Template
        Target grid and brain mask (:func:`brainage_core.data.template.load_template`).
    register : bool, default=False
        First register the image affinely to the MNI template
        (:mod:`brainage_core.data.register`).

    Returns
    -------
    numpy.ndarray of float32
        Array of shape ``template.shape``, 0 outside the brain mask.
    """
    name = (
        img
        if not isinstance(img, nib.spatialimages.SpatialImage)
        else (img.get_filename() or "<image in memory>")
    )
    image = reorient(align(load_image(img), register, name))
    data = resample_to_template(image, template)
    return normalise_intensities(data, template.mask, name)
