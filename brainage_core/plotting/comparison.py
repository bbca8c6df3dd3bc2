"""Figures of the method comparison: map mosaics, intervals, sanity curves, cost.

Every function takes ``output_file=None, title=None`` and returns a
:class:`matplotlib.figure.Figure`; the tables are those of
:func:`brainage_core.study.compare.compare_methods`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from brainage_core._utils.validation import BrainAgeInputError
from brainage_core.plotting._figures import new_figure, save_figure


def plot_map_mosaic(
    maps: Mapping[str, np.ndarray],
    *,
    slices: Sequence[int] | None = None,
    truth: np.ndarray | None = None,
    columns: int = 4,
    output_file: str | os.PathLike | None = None,
    title: str | None = None,
) -> Figure:
    """One panel per method: axial slices of its map, each scaled to its own 99th percentile.

    Parameters
    ----------
    maps : mapping of str to numpy.ndarray
        Maps on one grid ``(X, Y, Z)``, by method.
    slices : sequence of int or None, default=None
        Axial slices shown side by side in each panel (None: three through the middle).
    truth : numpy.ndarray of bool or None, default=None
        Planted voxels, outlined in every panel.
    columns : int, default=4
        Panels per row.
    """
    if not maps:
        raise BrainAgeInputError("'maps' is empty: nothing to plot.")
    shape = next(iter(maps.values())).shape
    z = list(slices) if slices is not None else [shape[2] * k // 8 for k in (3, 4, 5)]
    rows = -(-len(maps) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 1.5 * rows + 0.4),
                             layout="constrained", squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (name, arr) in zip(axes.ravel(), maps.items(), strict=False):
        arr = np.asarray(arr, dtype=np.float64)
        strip = np.concatenate([np.rot90(arr[:, :, k]) for k in z], axis=1)
        vmax = float(np.percentile(arr[arr > 0], 99)) if np.any(arr > 0) else 1.0
        ax.imshow(strip, cmap="hot", vmin=0, vmax=vmax, interpolation="nearest")
        if truth is not None:
            outline = np.concatenate([np.rot90(truth[:, :, k]) for k in z], axis=1)
            ax.contour(outline.astype(float), levels=[0.5], colors="cyan", linewidths=0.5)
        ax.set_title(name, fontsize="small")
    if title:
        fig.suptitle(title)
    return save_figure(fig, output_file)


def plot_auroc_intervals(
    scores: pd.DataFrame,
    *,
    axes: Any = None,
    output_file: str | os.PathLike | None = None,
    title: str | None = None,
) -> Figure:
    """Localisation AUROC of each method's mean map with its bootstrap interval."""
    table = scores.sort_values("localisation_auroc")
    fig, ax = new_figure(axes, (6.0, 0.3 * len(table) + 1.2))
    y = np.arange(len(table))
    value = table["localisation_auroc"].to_numpy(dtype=float)
    lo = table.get("localisation_auroc_lo", table["localisation_auroc"]).to_numpy(dtype=float)
    hi = table.get("localisation_auroc_hi", table["localisation_auroc"]).to_numpy(dtype=float)
    # a percentile interval of a mean map's AUROC may end at (or just below) the estimate
    err = [np.clip(value - lo, 0, None), np.clip(hi - value, 0, None)]
    ax.errorbar(value, y, xerr=err, fmt="o", color="#1f77b4", capsize=3)
    if "localisation_auroc_depth_matched" in table:
        ax.plot(table["localisation_auroc_depth_matched"], y, "x", color="#d62728",
                label="depth-matched")
        ax.legend(frameon=False, fontsize="small")
    ax.axvline(0.5, color="0.5", ls="--", lw=1)
    ax.set_yticks(y, table["method"])
    ax.set_xlabel("localisation AUROC of the mean map (95% bootstrap interval)")
    ax.set_title(title or "Localisation against the planted truth")
    return save_figure(fig, output_file)


def plot_sanity_curves(
    sanity: pd.DataFrame,
    *,
    threshold: float | None = None,
    axes: Any = None,
    output_file: str | os.PathLike | None = None,
    title: str | None = None,
) -> Figure:
    """Spearman correlation with the trained model's map as layers are randomised."""
    fig, ax = new_figure(axes, (6.5, 4.0))
    colours = plt.get_cmap("tab20")
    for k, (method, part) in enumerate(sanity.groupby("method", sort=False)):
        ax.plot(part["level"], part["spearman"], marker=".", label=str(method),
                color=colours(k % 20))
    labels = sanity.drop_duplicates("level").sort_values("level")
    ax.set_xticks(labels["level"], labels["layer"], rotation=30, ha="right")
    if threshold is not None:
        ax.axhline(threshold, color="0.4", ls="--", lw=1)
    ax.set(xlabel="randomised down to layer (cascading, from the output)",
           ylabel="Spearman with the trained model's map")
    ax.legend(frameon=False, fontsize="x-small", ncol=2)
    ax.set_title(title or "Sanity check: maps must change when the model is destroyed")
    return save_figure(fig, output_file)


def plot_cost_vs_localisation(
    scores: pd.DataFrame,
    *,
    axes: Any = None,
    output_file: str | os.PathLike | None = None,
    title: str | None = None,
) -> Figure:
    """Milliseconds per subject (log scale) against the localisation AUROC."""
    fig, ax = new_figure(axes, (6.0, 4.0))
    ms = scores["ms_per_subject"].clip(lower=1e-2)
    ax.scatter(ms, scores["localisation_auroc"], color="#1f77b4")
    for x, y, name in zip(ms, scores["localisation_auroc"], scores["method"], strict=True):
        ax.annotate(str(name), (x, y), textcoords="offset points", xytext=(3, 3),
                    fontsize="x-small")
    ax.set_xscale("log")
    ax.set(xlabel="milliseconds per subject (log)", ylabel="localisation AUROC")
    ax.set_title(title or "Cost against localisation")
    return save_figure(fig, output_file)
