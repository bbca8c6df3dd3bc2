"""Images as a scanner writes them: a subject in its own native space, with a known transform.

A synthetic subject is rendered in MNI space. With ``SynthConfig.native_space`` set,
:func:`to_native` then writes it as a scanner would: the head moved by a random rigid
transform (rotations up to ``rotation_deg`` about each axis, about the brain's centre, and
a shift up to ``shift_mm`` along each), on another voxel size and field of view, with
another orientation code. The transform is recorded in the ground truth
(``derivatives/ground_truth/native/<participant>_transform.json``: ``native_from_mni``, the
4x4 RAS+ millimetre head pose, and ``native_from_template``, the pose composed with the
best affine of the subject's own anatomy: its head size, rotation and shift and the affine
part of its smooth deformations; see
:meth:`~brainage_core.data.synth.render.SubjectRenderer.subject_affine_fit`), so that
registration can be checked against a known answer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.orientations import axcodes2ornt
from scipy import ndimage

from brainage_core._utils.validation import BrainAgeInputError, check_positive

#: Seed stream of a subject's native pose (spawn_key (i, NATIVE_STREAM)).
NATIVE_STREAM = 2

#: Where the transforms go, under the dataset's ``derivatives/ground_truth/``.
NATIVE_FOLDER = "native"


@dataclass(frozen=True)
class NativeSpace:
    """How a native-space image differs from MNI space.

    Attributes
    ----------
    rotation_deg : float, default=15.0
        Largest rotation about each axis (uniform in ``[-r, r]``), degrees.
    shift_mm : float, default=20.0
        Largest shift along each axis (uniform), mm.
    voxel_size : list of float or None, default=None
        Native voxel size (mm); None: 0.75 x the cohort's grid along x and y and 1.25 x
        along z (anisotropic, as many T1 protocols).
    fov_mm : float, default=256.0
        Field of view along each axis, mm (a cube centred on the moved brain).
    orientation : str, default="LPS"
        Orientation code of the native voxel axes (e.g. ``LPS``, ``PIR``).
    """

    rotation_deg: float = 15.0
    shift_mm: float = 20.0
    voxel_size: tuple[float, float, float] | None = None
    fov_mm: float = 256.0
    orientation: str = "LPS"

    def __post_init__(self) -> None:
        check_positive("native_space.rotation_deg", self.rotation_deg, allow_zero=True)
        check_positive("native_space.shift_mm", self.shift_mm, allow_zero=True)
        check_positive("native_space.fov_mm", self.fov_mm)
        if self.voxel_size is not None:
            sizes = tuple(float(v) for v in self.voxel_size)
            if len(sizes) != 3 or min(sizes) <= 0:
                raise BrainAgeInputError(
                    f"'native_space.voxel_size' must be 3 positive numbers; "
                    f"{self.voxel_size!r} was provided.")
            object.__setattr__(self, "voxel_size", sizes)
        code = str(self.orientation).upper()
        try:
            ornt = axcodes2ornt(tuple(code))
        except Exception as err:  # noqa: BLE001 - nibabel raises several types
            raise BrainAgeInputError(
                f"'native_space.orientation' must be 3 axis codes such as 'LPS'; "
                f"{self.orientation!r} was provided.") from err
        if len(code) != 3 or np.isnan(ornt).any() or len(set(ornt[:, 0])) != 3:
            raise BrainAgeInputError(
                f"'native_space.orientation' must name each of the 3 axes once (e.g. 'LPS'); "
                f"{self.orientation!r} was provided.")
        object.__setattr__(self, "orientation", code)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> NativeSpace | None:
        """Settings from a mapping; None (MNI space) for None, the defaults for ``{}``."""
        if d is None:
            return None
        if not isinstance(d, Mapping):
            raise BrainAgeInputError(
                f"'native_space' must be a mapping (or null for MNI space); {d!r} was provided.")
        allowed = {"rotation_deg", "shift_mm", "voxel_size", "fov_mm", "orientation"}
        unknown = sorted(set(d) - allowed)
        if unknown:
            raise BrainAgeInputError(
                f"unknown key(s) {unknown} in 'native_space'; allowed keys are {sorted(allowed)}.")
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if out["voxel_size"] is not None:
            out["voxel_size"] = list(out["voxel_size"])
        return out


def random_pose(settings: NativeSpace, rng: np.random.Generator, centre: np.ndarray
                ) -> np.ndarray:
    """A random rigid transform (4x4, RAS+ mm) about ``centre``: native_from_mni."""
    angles = np.deg2rad(rng.uniform(-settings.rotation_deg, settings.rotation_deg, 3))
    shift = rng.uniform(-settings.shift_mm, settings.shift_mm, 3)
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    rot = rz @ ry @ rx
    out = np.eye(4)
    out[:3, :3] = rot
    out[:3, 3] = centre - rot @ centre + shift
    return out


def native_grid(settings: NativeSpace, resolution: int, centre: np.ndarray
                ) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Affine and shape of the native grid: the orientation code, voxel size and FOV."""
    sizes = np.asarray(settings.voxel_size or (0.75 * resolution, 0.75 * resolution,
                                               1.25 * resolution), dtype=float)
    ornt = axcodes2ornt(tuple(settings.orientation))
    affine = np.eye(4)
    affine[:3, :3] = 0.0
    for voxel_axis, (world_axis, sign) in enumerate(ornt):
        affine[int(world_axis), voxel_axis] = sign * sizes[voxel_axis]
    shape = tuple(int(np.ceil(settings.fov_mm / s)) for s in sizes)
    middle = (np.asarray(shape) - 1) / 2
    affine[:3, 3] = centre - affine[:3, :3] @ middle
    return affine, shape  # type: ignore[return-value]


def to_native(img: nib.Nifti1Image, settings: NativeSpace, rng: np.random.Generator,
              brain_centre: np.ndarray, resolution: int) -> tuple[nib.Nifti1Image, np.ndarray]:
    """Write an MNI-space image as a scanner would (see the module docstring).

    Parameters
    ----------
    img : nibabel.Nifti1Image
        The subject in MNI space.
    settings : NativeSpace
        The native space's parameters.
    rng : numpy.random.Generator
        The subject's own stream (the pose is reproducible).
    brain_centre : numpy.ndarray of shape (3,)
        The brain's centre in MNI mm (rotations are about it).
    resolution : int
        The cohort's grid (mm), from which the default voxel size follows.

    Returns
    -------
    image : nibabel.Nifti1Image
        The native image (linear interpolation, zero outside the MNI image).
    native_from_mni : numpy.ndarray of shape (4, 4)
        The transform of the head.
    """
    pose = random_pose(settings, rng, np.asarray(brain_centre, dtype=float))
    affine, shape = native_grid(settings, resolution, pose[:3, :3] @ brain_centre + pose[:3, 3])
    # native voxel -> native mm -> MNI mm -> MNI voxel
    to_mni_voxel = np.linalg.inv(img.affine) @ np.linalg.inv(pose) @ affine
    data = ndimage.affine_transform(np.asarray(img.dataobj, dtype=np.float32),
                                    to_mni_voxel[:3, :3], offset=to_mni_voxel[:3, 3],
                                    output_shape=shape, order=1, cval=0.0)
    out = nib.Nifti1Image(data.astype(np.float32), affine)
    out.header.set_xyzt_units("mm")
    out.set_qform(affine, code=1)  # scanner space
    out.set_sform(affine, code=1)
    return out, pose


def transform_path(dataset_root: str | os.PathLike, participant_id: str) -> Path:
    """``derivatives/ground_truth/native/<participant>_transform.json``."""
    return (Path(dataset_root) / "derivatives" / "ground_truth" / NATIVE_FOLDER
            / f"{participant_id}_transform.json")


def read_native_transform(dataset_root: str | os.PathLike, participant_id: str,
                          which: str = "native_from_template") -> np.ndarray:
    """A subject's recorded transform (4x4, RAS+ mm).

    Parameters
    ----------
    which : {"native_from_template", "native_from_template_drawn", "native_from_mni"}, \
default="native_from_template"
        The best affine from the template to the native image (what a registration should
        recover), the same through the drawn head size, rotation and shift alone (without
        the affine part of the smooth deformations), or the head pose alone (from the
        subject's MNI-space image).
    """
    path = transform_path(dataset_root, participant_id)
    if not path.is_file():
        raise BrainAgeInputError("no recorded native transform (not a native-space cohort?)",
                                 path)
    record = json.loads(path.read_text(encoding="utf-8"))
    if which not in record:
        raise BrainAgeInputError(f"the recorded transform has no {which!r} (written by an "
                                 "older generator? regenerate the cohort)", path)
    return np.asarray(record[which])
