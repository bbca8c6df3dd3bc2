"""Population importance maps: the mean of subjects' maps, overall and per age band.

Subject maps live in template space, so they can be averaged voxel by voxel. The mean is
accumulated one map at a time (maps may be read lazily from NIfTI files), so a large
cohort never has to fit in memory.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from brainage_core._utils.io import save_nifti
from brainage_core._utils.validation import BrainAgeInputError, check_positive

#: File name of the population map in a run's ``maps/`` folder.
POPULATION_FILE = "population_importance.nii.gz"


def mean_map(maps: Iterable[Any]) -> np.ndarray:
    """Voxel-wise mean of importance maps, accumulated one map at a time.

    Parameters
    ----------
    maps : iterable of array-like
        Maps on one grid: arrays, tensors, NIfTI images or paths to NIfTI files, or a
        single array shaped ``(N, X, Y, Z)``.

    Returns
    -------
    numpy.ndarray of float64
        The mean map, shaped like one input map.
    """
    total: np.ndarray | None = None
    count = 0
    for item in maps:
        arr = load_map(item)
        if total is None:
            total = np.zeros(arr.shape, dtype=np.float64)
        elif arr.shape != total.shape:
            raise BrainAgeInputError(
                f"all maps must share one grid; map {count} has shape {arr.shape}, "
                f"the first {total.shape}."
            )
        total += arr
        count += 1
    if total is None:
        raise BrainAgeInputError("'maps' is empty: there is no map to average.")
    return total / count


def age_bands(ages: Sequence[float], width: float = 10) -> list[tuple[int, int]]:
    """Consecutive age bands of ``width`` years covering ``ages`` (decades by default).

    Band edges are multiples of ``width`` (for example 40–50, 50–60, ...); each band holds
    ages ``lo <= age < hi``.
    """
    check_positive("width", width)
    ages = np.asarray(ages, dtype=float)
    if ages.size == 0:
        return []
    lo = np.floor(ages.min() / width) * width
    hi = np.floor(ages.max() / width) * width + width
    edges = np.arange(lo, hi + width / 2, width)
    return [
        (_int_if_whole(a), _int_if_whole(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)
    ]


def age_band_maps(
    maps: Sequence[Any],
    ages: Sequence[float],
    *,
    width: float = 10,
    min_subjects: int = 1,
) -> dict[tuple[int, int], np.ndarray]:
    """Mean map of the subjects in each age band.

    Parameters
    ----------
    maps : sequence of array-like
        One map per subject (arrays, NIfTI images or paths), in the order of ``ages``.
    ages : sequence of float
        The subjects' chronological ages.
    width : float, default=10
        Band width in years.
    min_subjects : int, default=1
        Bands with fewer subjects are left out.

    Returns
    -------
    dict
        ``{(lo, hi): mean map}`` for every band with enough subjects, in age order.
    """
    ages = np.asarray(ages, dtype=float)
    if len(maps) != len(ages):
        raise BrainAgeInputError(f"got {len(maps)} maps but {len(ages)} ages.")
    check_positive("min_subjects", min_subjects, integer=True)
    out: dict[tuple[int, int], np.ndarray] = {}
    for lo, hi in age_bands(ages, width):
        members = np.flatnonzero((ages >= lo) & (ages < hi))
        if len(members) >= min_subjects:
            out[(lo, hi)] = mean_map(maps[i] for i in members)
    return out


def band_file(lo: float, hi: float) -> str:
    """File name of an age band's map: ``population_age-<lo>-<hi>_importance.nii.gz``."""
    return f"population_age-{_int_if_whole(lo)}-{_int_if_whole(hi)}_importance.nii.gz"


def save_population_maps(
    maps: Sequence[Any],
    ages: Sequence[float],
    to_image: Callable[[np.ndarray], nib.Nifti1Image],
    out_dir: str | os.PathLike,
    *,
    width: float = 10,
    min_subjects: int = 1,
) -> dict[str, Path]:
    """Write the population map and the age-band maps as NIfTI files.

    Parameters
    ----------
    maps, ages, width, min_subjects
        As for :func:`age_band_maps`.
    to_image : callable
        Turns an array on the grid into a NIfTI image with the grid's affine, for
        example ``cohort.to_image`` or ``template.to_image``.
    out_dir : str or os.PathLike
        Destination folder (a run's ``maps/``).

    Returns
    -------
    dict
        ``{"all": path, "<lo>-<hi>": path, ...}``.
    """
    out_dir = Path(out_dir)
    written = {
        "all": save_nifti(to_image(mean_map(maps).astype(np.float32)), out_dir / POPULATION_FILE)
    }
    for (lo, hi), arr in age_band_maps(maps, ages, width=width, min_subjects=min_subjects).items():
        written[f"{lo}-{hi}"] = save_nifti(
            to_image(arr.astype(np.float32)), out_dir / band_file(lo, hi)
        )
    return written


def load_map(item: Any) -> np.ndarray:
    """One map as an array: from an array, a tensor, a NIfTI image or a NIfTI file path."""
    if isinstance(item, (str, os.PathLike)):
        if not Path(item).is_file():
            raise BrainAgeInputError("importance map not found", item)
        item = nib.load(item)
    if isinstance(item, nib.spatialimages.SpatialImage):
        return np.asarray(item.get_fdata(dtype=np.float32))
    if hasattr(item, "detach"):
        item = item.detach().cpu().numpy()
    arr = np.asarray(item, dtype=np.float64)
    return arr.reshape(arr.shape[-3:]) if arr.ndim > 3 and arr.shape[0] == 1 else arr


def _int_if_whole(value: float) -> Any:
    return int(value) if float(value).is_integer() else float(value)
