"""Deterministic, age-stratified train/validation/test splits.

Participants are sorted by age and dealt, block by block, into the splits in proportion
to the requested fractions, so that every split covers the whole age range. Within a
block of similar ages the assignment is shuffled with a seeded generator: the same
ages, fractions and seed always give the same split.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from brainage_core._utils.validation import BrainAgeInputError

#: Split names, in the order of the fractions.
SPLITS = ("train", "val", "test")


def check_split_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    """Validate ``(train, val, test)`` fractions: three non-negative numbers summing to 1.

    Returns
    -------
    tuple of float
        The fractions.
    """
    try:
        values = tuple(float(f) for f in fractions)
    except (TypeError, ValueError) as err:
        raise BrainAgeInputError(
            f"'split_fractions' must be three numbers (train, val, test); "
            f"{fractions!r} was provided."
        ) from err
    if len(values) != 3 or any(not math.isfinite(f) or f < 0 for f in values):
        raise BrainAgeInputError(
            f"'split_fractions' must be three non-negative numbers (train, val, test); "
            f"{fractions!r} was provided."
        )
    if abs(sum(values) - 1.0) > 1e-6 or values[0] <= 0:
        raise BrainAgeInputError(
            f"'split_fractions' must sum to 1 with a positive train fraction; "
            f"{fractions!r} was provided."
        )
    return values  # type: ignore[return-value]


def split_counts(n: int, fractions: Sequence[float]) -> np.ndarray:
    """Number of participants per split (largest remainder; each non-zero split gets one).

    Parameters
    ----------
    n : int
        Number of participants.
    fractions : sequence of float
        ``(train, val, test)`` fractions.

    Returns
    -------
    numpy.ndarray of int, shape (3,)
    """
    frac = np.asarray(check_split_fractions(fractions))
    exact = frac * n
    counts = np.floor(exact).astype(int)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: n - counts.sum()]] += 1
    # Each split asked for gets at least one participant when there are enough.
    for k in np.flatnonzero((frac > 0) & (counts == 0)):
        donor = int(np.argmax(counts))
        if counts[donor] > 1:
            counts[donor] -= 1
            counts[k] += 1
    return counts


def make_splits(
    ages: Sequence[float] | np.ndarray,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    *,
    groups: Sequence[str] | np.ndarray | None = None,
) -> np.ndarray:
    """Assign each participant to "train", "val" or "test", stratified by age.

    Parameters
    ----------
    ages : array-like of float
        Age of each participant (finite).
    fractions : sequence of float, default=(0.7, 0.15, 0.15)
        Fractions of the train, validation and test splits; they sum to 1.
    seed : int, default=0
        Seed of the shuffling within blocks of similar ages.
    groups : array-like or None, default=None
        A group (subject) per row: rows of one group always share a split. The groups
        are split by their mean age, in order of first appearance, so the fractions
        count groups, not rows. With one row per group the result equals that without
        ``groups``.

    Returns
    -------
    numpy.ndarray of str
        Split name of each participant, in input order.
    """
    ages = np.asarray(ages, dtype=float)
    if ages.ndim != 1 or not np.all(np.isfinite(ages)):
        raise BrainAgeInputError("'ages' must be a 1D array of finite numbers.")
    if groups is not None:
        keys = np.asarray(groups, dtype=object)
        if keys.shape != ages.shape:
            raise BrainAgeInputError(
                f"'groups' must give one group per age; {keys.size} groups for {ages.size} ages."
            )
        codes, first = {}, []
        index = np.empty(ages.size, dtype=int)
        for i, key in enumerate(keys):
            if key not in codes:
                codes[key] = len(codes)
                first.append(i)
            index[i] = codes[key]
        group_ages = np.bincount(index, weights=ages) / np.bincount(index)
        return make_splits(group_ages, fractions, seed)[index]
    frac = np.asarray(check_split_fractions(fractions))
    n = ages.size
    counts = split_counts(n, frac)
    rng = np.random.default_rng(seed)

    # Interleave labels so that every prefix of the age-sorted list is close to the
    # target proportions (a "most behind first" deal).
    labels = np.empty(n, dtype=int)
    dealt = np.zeros(3, dtype=int)
    share = counts / max(n, 1)
    for k in range(n):
        deficit = np.where(dealt < counts, share * (k + 1) - dealt, -np.inf)
        j = int(np.argmax(deficit))
        labels[k] = j
        dealt[j] += 1

    # Shuffle labels within blocks of similar ages.
    positive = frac[frac > 0]
    block = max(int(math.ceil(1.0 / positive.min())), 1)
    for start in range(0, n, block):
        rng.shuffle(labels[start : start + block])

    order = np.lexsort((rng.random(n), ages))  # by age, ties broken at random
    out = np.empty(n, dtype=object)
    out[order] = np.asarray(SPLITS, dtype=object)[labels]
    return out.astype(str)
