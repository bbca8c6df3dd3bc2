"""Importance per atlas region: the table that names what the maps highlight.

Each region of the Harvard–Oxford atlas (see :mod:`brainage_core.data.atlas`) gets the mean
and median importance of its voxels, its size, and its rank by mean importance.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from brainage_core._utils.io import write_table
from brainage_core._utils.validation import BrainAgeInputError, check_positive

#: Columns of :func:`region_table`.
COLUMNS = ["rank", "label", "name", "n_voxels", "volume_ml", "mean_importance", "median_importance"]

_SIDE = re.compile(r"^(left|right)\s+", flags=re.IGNORECASE)


def region_table(
    importance: Any,
    atlas: Any,
    *,
    bilateral: bool = False,
    min_voxels: int = 1,
) -> pd.DataFrame:
    """Mean and median importance per atlas region, ranked.

    Parameters
    ----------
    importance : array-like
        Importance map on the atlas grid (for example the population map).
    atlas : Atlas
        Anything with ``labels`` (int grid, 0 = background) and ``names`` (``names[k]``
        names label ``k``), such as :func:`brainage_core.data.atlas.load_atlas`'s result.
    bilateral : bool, default=False
        Merge left and right regions of the same name ("Left Hippocampus" and "Right
        Hippocampus" become "Hippocampus"); ``label`` is then -1.
    min_voxels : int, default=1
        Regions with fewer voxels on this grid are left out (tiny regions on coarse
        grids give noisy means).

    Returns
    -------
    pandas.DataFrame
        Columns :data:`COLUMNS`, sorted by decreasing mean importance; ``rank`` starts
        at 1.
    """
    values = np.asarray(importance, dtype=np.float64)
    labels = np.asarray(atlas.labels)
    values = values.reshape(values.shape[-3:]) if values.ndim > 3 else values
    if values.shape != labels.shape:
        raise BrainAgeInputError(
            f"'importance' must be on the atlas grid {labels.shape}; {values.shape} was provided."
        )
    check_positive("min_voxels", min_voxels, integer=True)
    voxel_ml = _voxel_volume_ml(atlas)
    groups: dict[str, list[int]] = {}
    for label in np.unique(labels[labels > 0]):
        name = atlas.names[int(label)]
        key = _SIDE.sub("", name) if bilateral else name
        groups.setdefault(key, []).append(int(label))
    rows = []
    for name, members in groups.items():
        region = values[np.isin(labels, members)]
        if region.size < min_voxels:
            continue
        rows.append(
            {
                "label": members[0] if len(members) == 1 else -1,
                "name": name,
                "n_voxels": int(region.size),
                "volume_ml": float(region.size * voxel_ml),
                "mean_importance": float(region.mean()),
                "median_importance": float(np.median(region)),
            }
        )
    table = pd.DataFrame(rows, columns=COLUMNS[1:])
    table = table.sort_values(
        ["mean_importance", "name"], ascending=[False, True], kind="stable"
    ).reset_index(drop=True)
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    return table


def top_regions(table: pd.DataFrame, n: int = 10) -> list[str]:
    """Names of the ``n`` highest-ranked regions of a :func:`region_table`."""
    check_positive("n", n, integer=True)
    return [str(name) for name in table.sort_values("rank")["name"].head(n)]


def write_region_table(table: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write the region table to CSV atomically (for example ``run/tables/regions.csv``)."""
    return write_table(path, table)


def _voxel_volume_ml(atlas: Any) -> float:
    affine = getattr(atlas, "affine", None)
    if affine is not None:
        return float(abs(np.linalg.det(np.asarray(affine)[:3, :3]))) / 1000.0
    return float(atlas.resolution) ** 3 / 1000.0
