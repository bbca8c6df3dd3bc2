"""Figures of the importance maps: brain views, region ranking, trade-off and deletion curves.

Brain views use nilearn (:func:`nilearn.plotting.plot_stat_map` over the template, or a
glass brain). Every function takes ``output_file=None, title=None`` and returns a
:class:`matplotlib.figure.Figure`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import nibabel as nib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from nilearn import plotting

from brainage_core._utils.validation import BrainAgeInputError, check_choice
from brainage_core.plotting._figures import new_figure, save_figure

#: Brain views of :func:`plot_importance_map`.
KINDS = ("stat", "glass")


def plot_importance_map(
    img: nib.Nifti1Image | str | os.PathLike,
    *,
    kind: str = "stat",
    bg_img: Any = None,
    threshold: float | None = None,
    vmax: float | None = None,
    display_mode: str = "ortho",
    cut_coords: Any = None,
    output_file: str | os.PathLike | None = None,
    title: str | None = None,
    figsize: tuple[float, float] = (8.0, 3.0),
) -> Figure:
    """A map over the template (``kind="stat"``) or as a glass brain (``kind="glass"``).

    Parameters
    ----------
    img : nibabel.Nifti1Image or path
        The importance map (template space).
    kind : {"stat", "glass"}, default="stat"
        :func:`nilearn.plotting.plot_stat_map` or :func:`nilearn.plotting.plot_glass_brain`.
    bg_img : image-like or None, default=None
        Background of the stat view (None: nilearn's MNI template).
    threshold : float or None, default=None
        Values below are transparent (None: the 50th percentile of the positive values).
    vmax : float or None, default=None
        Top of the colour scale (None: the map's maximum).
    display_mode, cut_coords
        Passed to nilearn.
    output_file : str or os.PathLike or None, default=None
        Save the figure there (format from the suffix).
    title : str or None, default=None
        Title drawn on the figure.
    figsize : tuple of float, default=(8.0, 3.0)
        Figure size in inches.
    """
    check_choice("kind", kind, KINDS)
    img = nib.load(img) if isinstance(img, (str, os.PathLike)) else img
    data = np.asarray(img.get_fdata())
    if threshold is None:
        threshold = _default_threshold(data)
    vmax = float(data.max()) if vmax is None else float(vmax)
    fig = plt.figure(figsize=figsize)
    common = {
        "threshold": threshold,
        "vmax": vmax or None,
        "display_mode": display_mode,
        "cut_coords": cut_coords,
        "title": title,
        "figure": fig,
        "colorbar": True,
    }
    if kind == "stat":
        kwargs = {"cmap": "hot", "symmetric_cbar": False}
        if bg_img is not None:
            kwargs["bg_img"] = bg_img
        plotting.plot_stat_map(img, **common, **kwargs)
    else:
        plotting.plot_glass_brain(img, **common, cmap="hot", plot_abs=False)
    return save_figure(fig, output_file)


def plot_region_ranking(
    table: pd.DataFrame,
    *,
    n: int = 15,
    planted: Sequence[str] | None = None,
    axes: Any = None,
    output_file: str | os.PathLike | None = None,
    title: str | None = None,
) -> Figure:
    """Horizontal bars of the ``n`` top regions' mean importance (median as a tick).

    Parameters
    ----------
    table : pandas.DataFrame
        A :func:`brainage_core.analysis.regions.region_table`.
    n : int, default=15
        Regions shown.
    planted : sequence of str or None, default=None
        Patterns of planted regions (synthetic data): their bars are highlighted.
    """
    if "mean_importance" not in table or "name" not in table:
        raise BrainAgeInputError("'table' must be a region table (name, mean_importance).")
    top = table.sort_values("rank").head(n).iloc[::-1]
    fig, ax = new_figure(axes, (7.0, 0.3 * len(top) + 1.2))
    colours = ["#bbbbbb"] * len(top)
    if planted:
        pattern = re.compile("|".join(re.escape(p) for p in planted), re.IGNORECASE)
        colours = ["#d62728" if pattern.search(name) else "#bbbbbb" for name in top["name"]]
    ax.barh(top["name"], top["mean_importance"], color=colours)
    if "median_importance" in top:
        ax.scatter(
            top["median_importance"],
            top["name"],
            marker="|",
            color="k",
            s=60,
            label="median",
            zorder=3,
        )
        ax.legend(frameon=False, fontsize="small", loc="lower right")
    ax.set_xlabel("mean importance")
    ax.tick_params(axis="y", labelsize="small")
    ax.set_title(title or (f"Top {len(top)} regions" + (" (planted in red)" if planted else "")))
    return save_figure(fig, output_file)


def plot_tradeoff(
    curve: pd.DataFrame,
    *,
    tolerance: float | None = None,
    axes: Any = None,
    output_file: str | os.PathLike | None = None,
    title: str | None = None,
) -> Figure:
    """The MAE–noise trade-off of a lambda calibration.

    Parameters
    ----------
    curve : pandas.DataFrame
        :attr:`brainage_core.explain.noise.calibration.CalibrationResult.curve` (``lam``,
        ``mean_sigma``, ``mae_rise``, optional ``chosen``).
    tolerance : float or None, default=None
        Drawn as a horizontal line.
    """
    fig, ax = new_figure(axes, (5.0, 3.8))
    ax.plot(curve["mean_sigma"], curve["mae_rise"], "o-", color="#1f77b4")
    for _, row in curve.iterrows():
        ax.annotate(
            f"λ={row['lam']:g}",
            (row["mean_sigma"], row["mae_rise"]),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize="small",
        )
    if "chosen" in curve and curve["chosen"].any():
        chosen = curve[curve["chosen"].astype(bool)]
        ax.plot(
            chosen["mean_sigma"],
            chosen["mae_rise"],
            "o",
            ms=12,
            mfc="none",
            color="#d62728",
            label="chosen",
        )
        ax.legend(frameon=False, fontsize="small")
    if tolerance is not None:
        ax.axhline(tolerance, color="0.4", ls="--", lw=1)
    ax.set(xlabel="mean noise s.d. in the brain", ylabel="validation MAE rise (years)")
    ax.set_title(title or "MAE–noise trade-off")
    return save_figure(fig, output_file)


def plot_deletion_curves(
    curves: pd.DataFrame,
    *,
    axes: Any = None,
    output_file: str | os.PathLike | None = None,
    title: str | None = None,
) -> Figure:
    """Deletion curves (``method``, ``fraction``, ``change``), one line per method."""
    fig, ax = new_figure(axes, (5.0, 3.8))
    for method, part in curves.groupby("method", sort=False):
        ax.plot(part["fraction"], part["change"], marker=".", label=str(method))
    ax.set(
        xlabel="fraction of brain voxels deleted (most important first)",
        ylabel="|f(x_deleted) − f(x)| (years)",
    )
    ax.legend(frameon=False, fontsize="small")
    ax.set_title(title or "Deletion curves (higher early = more faithful)")
    return save_figure(fig, output_file)


def plot_method_maps(
    maps: Mapping[str, nib.Nifti1Image],
    *,
    cut_coords: Any = None,
    output_file: str | os.PathLike | None = None,
    title: str | None = None,
) -> Figure:
    """One row of orthogonal views per method, each map scaled to its own maximum."""
    if not maps:
        raise BrainAgeInputError("'maps' is empty: nothing to plot.")
    fig = plt.figure(figsize=(8.0, 2.6 * len(maps)))
    height = 1.0 / len(maps)
    for row, (name, img) in enumerate(maps.items()):
        data = np.asarray(img.get_fdata())
        threshold = _default_threshold(data)
        plotting.plot_stat_map(
            img,
            threshold=threshold,
            vmax=float(data.max()) or None,
            cmap="hot",
            symmetric_cbar=False,
            cut_coords=cut_coords,
            title=name,
            figure=fig,
            axes=(0.0, 1.0 - (row + 1) * height, 1.0, height * 0.95),
            colorbar=True,
        )
    if title:
        fig.suptitle(title)
    return save_figure(fig, output_file)


def _default_threshold(data: np.ndarray) -> float:
    """Median of the positive values, kept below the maximum so something shows."""
    positive = data[data > 0]
    if positive.size == 0:
        return 0.0
    median = float(np.percentile(positive, 50))
    return median if median < positive.max() else 0.5 * float(positive.max())


