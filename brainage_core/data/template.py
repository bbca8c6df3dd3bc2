"""The MNI152 2009 template grid that every image of the study lives on.

The template, its grey- and white-matter probability maps and a brain mask ship inside
nilearn, so the grid is available offline at any resolution. The grid is cropped to the
brain's bounding box (plus a margin) so that a CNN does not spend its time on empty air.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from nilearn import datasets
from scipy import ndimage

from brainage_core._utils.validation import check_choice

#: Grid spacings (mm) the study supports. 1–2 mm is the paper's scale, 4 mm a laptop's,
#: 8 mm is for unit tests only.
SUPPORTED_RESOLUTIONS = (1, 2, 3, 4, 6, 8)

#: Margin (mm) kept around the brain's bounding box when the grid is cropped.
CROP_MARGIN_MM = 8.0


@dataclass(frozen=True, eq=False)
class Template:
    """The MNI152 2009 (symmetric) template on one grid.

    Attributes
    ----------
    resolution : int
        Voxel size in mm (isotropic).
    affine : numpy.ndarray of shape (4, 4)
        Voxel-to-MNI (RAS+, mm) affine of the grid.
    t1 : numpy.ndarray of float32
        T1-weighted template intensities, scaled to [0, 1].
    gm, wm, csf : numpy.ndarray of float32
        Tissue probability maps in [0, 1]. ``csf`` is what the brain mask holds beside
        grey and white matter (ventricles, sulci).
    mask : numpy.ndarray of bool
        Brain mask, ventricles included.
    """

    resolution: int
    affine: np.ndarray
    t1: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    mask: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        """Grid shape ``(x, y, z)``."""
        return tuple(int(s) for s in self.t1.shape)  # type: ignore[return-value]

    def to_image(self, data: np.ndarray, dtype: np.dtype | str | None = None) -> nib.Nifti1Image:
        """Wrap an array on this grid into a NIfTI image with the grid's affine.

        Parameters
        ----------
        data : numpy.ndarray
            Array whose first three dimensions equal :attr:`shape`.
        dtype : numpy dtype or None, default=None
            On-disk data type; defaults to the array's.
        """
        data = np.asarray(data)
        if data.shape[:3] != self.shape:
            raise ValueError(
                f"'data' must have the template grid's shape {self.shape}; "
                f"{data.shape} was provided."
            )
        if dtype is not None:
            data = data.astype(dtype)
        img = nib.Nifti1Image(data, self.affine)
        img.header.set_xyzt_units("mm")
        img.set_qform(self.affine, code=4)  # 4 = MNI152
        img.set_sform(self.affine, code=4)
        return img


@functools.lru_cache(maxsize=8)
def load_template(resolution: int = 2, *, crop: bool = True) -> Template:
    """Load the MNI152 2009 template, tissue maps and brain mask on a grid.

    Parameters
    ----------
    resolution : int, default=2
        Voxel size in mm, one of :data:`SUPPORTED_RESOLUTIONS`.
    crop : bool, default=True
        Crop the grid to the brain's bounding box plus :data:`CROP_MARGIN_MM`.

    Returns
    -------
    Template
        The template on the requested grid. Cached: treat its arrays as read-only.
    """
    check_choice("resolution", resolution, SUPPORTED_RESOLUTIONS)
    t1_img = datasets.load_mni152_template(resolution=resolution)
    gm = _as_float(datasets.load_mni152_gm_template(resolution=resolution))
    wm = _as_float(datasets.load_mni152_wm_template(resolution=resolution))
    t1 = _as_float(t1_img)
    t1 /= max(float(t1.max()), 1e-6)
    # The template is skull-stripped; filling holes puts the ventricles back in the mask.
    mask = ndimage.binary_fill_holes((gm + wm) > 0.2)
    mask = ndimage.binary_closing(mask, iterations=1) & ((t1 > 0) | mask)
    mask = ndimage.binary_fill_holes(mask)
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0) * mask
    affine = np.asarray(t1_img.affine, dtype=float)
    arrays = [t1, gm, wm, csf, mask]
    if crop:
        margin = int(np.ceil(CROP_MARGIN_MM / resolution))
        lo, hi = _bounding_box(mask, margin)
        arrays = [a[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] for a in arrays]
        affine = affine.copy()
        affine[:3, 3] = affine[:3, :3] @ np.asarray(lo, dtype=float) + affine[:3, 3]
    t1, gm, wm, csf, mask = arrays
    for arr in arrays:
        arr.setflags(write=False)
    return Template(
        resolution=resolution,
        affine=affine,
        t1=t1 * mask,
        gm=gm * mask,
        wm=wm * mask,
        csf=csf,
        mask=mask.astype(bool),
    )


def _as_float(img: nib.spatialimages.SpatialImage) -> np.ndarray:
    # a copy: nibabel caches get_fdata's array in the (cached) nilearn image, and the
    # template's arrays are scaled in place and made read-only
    return np.array(img.get_fdata(dtype=np.float32), dtype=np.float32, copy=True)


def _bounding_box(mask: np.ndarray, margin: int) -> tuple[list[int], list[int]]:
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(axis=0) - margin, 0)
    hi = np.minimum(idx.max(axis=0) + 1 + margin, mask.shape)
    return lo.tolist(), hi.tolist()
