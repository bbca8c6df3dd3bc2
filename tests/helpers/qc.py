"""Images that really are wrong, made from a generated subject (for the QC tests)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
from scipy import ndimage


def _centre(img: nib.Nifti1Image) -> np.ndarray:
    return nib.affines.apply_affine(img.affine, (np.asarray(img.shape) - 1) / 2)


def rotated(img: nib.Nifti1Image, degrees: float = 20.0) -> nib.Nifti1Image:
    """The head rotated about its centre (left-right axis): not registered."""
    t = np.deg2rad(degrees)
    rot = np.eye(4)
    rot[1:3, 1:3] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    c = _centre(img)
    move = np.eye(4)
    move[:3, 3] = c - rot[:3, :3] @ c
    return nib.Nifti1Image(np.asarray(img.dataobj), move @ rot @ img.affine)


def shifted(img: nib.Nifti1Image, mm: tuple[float, float, float] = (0.0, 20.0, 0.0)
            ) -> nib.Nifti1Image:
    """The head moved by ``mm`` (2 cm forward by default): not registered."""
    affine = img.affine.copy()
    affine[:3, 3] += mm
    return nib.Nifti1Image(np.asarray(img.dataobj), affine)


def with_skull(img: nib.Nifti1Image, pad: int = 4) -> nib.Nifti1Image:
    """A larger field of view with a bright shell (a skull) 8-20 mm around the brain."""
    data = np.pad(np.asarray(img.dataobj, dtype=np.float32), pad)
    affine = img.affine.copy()
    affine[:3, 3] -= affine[:3, :3] @ np.full(3, pad)
    brain = data > 0.05 * data.max()
    brain = ndimage.binary_closing(brain, iterations=2)
    zoom = float(np.abs(affine[0, 0]))
    near = ndimage.binary_dilation(brain, iterations=max(int(round(8 / zoom)), 1))
    far = ndimage.binary_dilation(near, iterations=max(int(round(12 / zoom)), 1))
    data[far & ~near] = 1.3 * float(np.percentile(data[brain], 99))
    return nib.Nifti1Image(data, affine)


def inverted(img: nib.Nifti1Image) -> nib.Nifti1Image:
    """Contrast inverted inside the head (CSF bright, white matter dark): a T2 stand-in."""
    data = np.asarray(img.dataobj, dtype=np.float32)
    head = data > 0.05 * data.max()
    out = np.zeros_like(data)
    out[head] = data.max() - data[head]
    return nib.Nifti1Image(out, img.affine)


def wrong_orientation(img: nib.Nifti1Image) -> nib.Nifti1Image:
    """The same voxels with the first two axes' codes swapped in the header."""
    return nib.Nifti1Image(np.asarray(img.dataobj), img.affine[:, [1, 0, 2, 3]])


#: The wrong images by name, with the QC reason each must get.
CASES = {
    "rotated_20deg": (rotated, "registration"),
    "shifted_2cm": (shifted, "registration"),
    "skull_on": (with_skull, "outside_ratio"),
    "inverted_contrast": (inverted, "intensity"),
    "wrong_orientation_code": (wrong_orientation, "orientation"),
}
