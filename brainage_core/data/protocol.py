"""What the models and the map steps need of a cohort: images, ages, splits, a mask."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd


@runtime_checkable
class Cohort(Protocol):
    """A cohort of images on one grid, split into train, val and test.

    :class:`~brainage_core.data.cache.PreparedCohort` is the study's cohort; tests use
    small in-memory stand-ins with the same surface.

    Attributes
    ----------
    table : pandas.DataFrame
        One row per subject: at least ``participant_id``, ``age`` and ``split``.
    mask : numpy.ndarray of bool
        Brain mask on the image grid.
    metadata : dict
        Facts about the source (for example ``oracle_mae`` of a synthetic cohort).
    resolution : int
        Grid spacing in mm.
    """

    table: pd.DataFrame
    mask: np.ndarray
    metadata: dict[str, Any]
    resolution: int

    def __len__(self) -> int: ...

    def image(self, index: int) -> np.ndarray:
        """The image of subject ``index`` as float32, shaped like ``mask``."""
        ...

    def indices(self, split: str) -> np.ndarray:
        """Subject indices of ``split`` ("train", "val" or "test")."""
        ...
