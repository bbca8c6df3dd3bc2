"""Bootstrap intervals over subjects for population-level figures.

A population figure (the AUROC of a mean map, the rank of a region in the region table)
comes from a finite sample of subjects. :func:`bootstrap_draws` recomputes it on subject
sets drawn with replacement; :func:`percentile_interval` turns the draws into an interval.
A region whose rank interval spans ten places is not "the top region".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from brainage_core._utils.validation import BrainAgeInputError, check_fraction, check_positive


def bootstrap_draws(
    maps: Any,
    statistic: Callable[[np.ndarray], Any],
    *,
    n_boot: int = 200,
    seed: int = 0,
) -> np.ndarray:
    """The statistic of the mean map of ``n_boot`` resampled subject sets.

    Parameters
    ----------
    maps : array-like of shape (N, ...)
        One map (or value) per subject.
    statistic : callable
        ``statistic(mean_map) -> float or 1-D array`` (for example a localisation AUROC).
    n_boot : int, default=200
        Bootstrap resamples.
    seed : int, default=0
        Seeds the resampling.

    Returns
    -------
    numpy.ndarray of shape (n_boot,) or (n_boot, K)
    """
    check_positive("n_boot", n_boot, integer=True)
    arr = np.asarray(maps, dtype=np.float64)
    if arr.ndim < 1 or len(arr) < 2:
        raise BrainAgeInputError(
            f"'maps' must hold at least 2 subjects; {len(arr) if arr.ndim else 0} were provided."
        )
    rng = np.random.default_rng(seed)
    n = len(arr)
    return np.asarray(
        [statistic(arr[rng.integers(0, n, size=n)].mean(0)) for _ in range(int(n_boot))],
        dtype=np.float64,
    )


def percentile_interval(draws: Any, level: float = 0.95) -> tuple[Any, Any]:
    """Percentile interval of bootstrap draws (per column for 2-D draws)."""
    check_fraction("level", level)
    tail = 100 * (1 - level) / 2
    d = np.asarray(draws, dtype=np.float64)
    lo, hi = np.nanpercentile(d, [tail, 100 - tail], axis=0)
    return lo, hi


def bootstrap_interval(
    maps: Any,
    statistic: Callable[[np.ndarray], float],
    *,
    n_boot: int = 200,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """The statistic of the mean map with its percentile bootstrap interval.

    Returns
    -------
    dict
        ``value`` (on all subjects), ``lo`` and ``hi``.
    """
    arr = np.asarray(maps, dtype=np.float64)
    lo, hi = percentile_interval(
        bootstrap_draws(arr, statistic, n_boot=n_boot, seed=seed), level
    )
    return {"value": float(statistic(arr.mean(0))), "lo": float(lo), "hi": float(hi)}


def region_rank_intervals(
    maps: Any,
    rank_regions: Callable[[np.ndarray], pd.DataFrame],
    *,
    n_boot: int = 200,
    level: float = 0.95,
    seed: int = 0,
    top: int | None = None,
) -> pd.DataFrame:
    """Bootstrap intervals of each region's rank in the region table.

    Parameters
    ----------
    maps : array-like of shape (N, X, Y, Z)
        Per-subject maps.
    rank_regions : callable
        ``rank_regions(mean_map)`` returns a region table with ``name`` and ``rank``
        (:func:`brainage_core.analysis.regions.region_table` with the atlas bound).
    top : int or None, default=None
        Keep the regions ranked at most ``top`` on all subjects (None: all).

    Returns
    -------
    pandas.DataFrame
        ``name``, ``rank`` (on all subjects), ``rank_lo``, ``rank_hi`` and
        ``rank_span`` (``rank_hi - rank_lo``), ordered by ``rank``.
    """
    arr = np.asarray(maps, dtype=np.float64)
    table = rank_regions(arr.mean(0)).sort_values("rank")
    names = list(table["name"])

    def ranks(mean: np.ndarray) -> np.ndarray:
        r = rank_regions(mean).set_index("name")["rank"]
        return r.reindex(names).to_numpy(dtype=np.float64)

    lo, hi = percentile_interval(bootstrap_draws(arr, ranks, n_boot=n_boot, seed=seed), level)
    out = pd.DataFrame(
        {
            "name": names,
            "rank": table["rank"].to_numpy(dtype=int),
            "rank_lo": lo,
            "rank_hi": hi,
        }
    )
    out["rank_span"] = out["rank_hi"] - out["rank_lo"]
    return out if top is None else out[out["rank"] <= int(top)].reset_index(drop=True)
