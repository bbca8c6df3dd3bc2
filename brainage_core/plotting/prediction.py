"""Figures of the predictor: predicted against chronological age, and the brain-age gap.

Each figure comes in two versions: a static matplotlib one (returns a
:class:`matplotlib.figure.Figure`) and an interactive plotly one (returns a
:class:`plotly.graph_objects.Figure`, hovering a point shows the participant). All take a
:func:`~brainage_core.models.evaluation.prediction_table` and ``output_file=None, title=None``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import plotly.graph_objects as go
from matplotlib.figure import Figure
from plotly.subplots import make_subplots

from brainage_core._utils.io import atomic_path
from brainage_core._utils.validation import BrainAgeInputError
from brainage_core.plotting._figures import new_figure, save_figure

#: Marker colours of the groups of a synthetic cohort (others get matplotlib's cycle).
GROUP_COLOURS = {"control": "#1f77b4", "accelerated": "#d62728"}


def plot_age_prediction(
    table: pd.DataFrame,
    *,
    split: str | Sequence[str] = "test",
    axes: Any = None,
    output_file: str | os.PathLike | None = None,
    title: str | None = None,
) -> Figure:
    """Static scatter of predicted against chronological age, with the identity line.

    Parameters
    ----------
    table : pandas.DataFrame
        Prediction table (``age``, ``predicted_age``, ``split``, optional ``group``).
    split : str or sequence of str, default="test"
        Split(s) to show.
    axes : matplotlib.axes.Axes or None, default=None
        Axes to draw on (None: a new figure).
    output_file : str or os.PathLike or None, default=None
        Save the figure there (format from the suffix).
    title : str or None, default=None
        Title (None: the split and its MAE).

    Returns
    -------
    matplotlib.figure.Figure
    """
    part = _select(table, split, ["age", "predicted_age"])
    fig, ax = new_figure(axes, (5.0, 4.5))
    for name, sub in _groups(part):
        ax.scatter(sub["age"], sub["predicted_age"], s=14, alpha=0.75, label=name,
                   color=GROUP_COLOURS.get(name))
    lo, hi = _limits(part["age"], part["predicted_age"])
    ax.plot([lo, hi], [lo, hi], color="0.4", lw=1, ls="--", label="identity")
    ax.set(xlim=(lo, hi), ylim=(lo, hi), xlabel="chronological age (years)",
           ylabel="predicted age (years)", aspect="equal")
    ax.legend(frameon=False, fontsize="small")
    ax.set_title(title or _default_title(part, split))
    return save_figure(fig, output_file)


def plot_gap_vs_age(
    table: pd.DataFrame,
    *,
    split: str | Sequence[str] = "test",
    output_file: str | os.PathLike | None = None,
    title: str | None = None,
) -> Figure:
    """Static brain-age gap against age: raw (left) and bias-corrected (right).

    Parameters
    ----------
    table : pandas.DataFrame
        Prediction table (``age``, ``gap``, ``gap_corrected``, ``split``, optional
        ``group``).
    split : str or sequence of str, default="test"
        Split(s) to show.
    output_file : str or os.PathLike or None, default=None
        Save the figure there.
    title : str or None, default=None
        Figure title.

    Returns
    -------
    matplotlib.figure.Figure
    """
    part = _select(table, split, ["age", "gap", "gap_corrected"])
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 4.0), sharey=True, layout="constrained")
    for ax, column, label in zip(axes, ("gap", "gap_corrected"), ("raw", "bias-corrected"),
                                 strict=True):
        for name, sub in _groups(part):
            ax.scatter(sub["age"], sub[column], s=14, alpha=0.75, label=name,
                       color=GROUP_COLOURS.get(name))
        ax.axhline(0, color="0.4", lw=1, ls="--")
        slope, intercept = _line(part["age"], part[column])
        xs = np.array([part["age"].min(), part["age"].max()])
        ax.plot(xs, slope * xs + intercept, color="k", lw=1.5,
                label=f"fit: slope {slope:+.2f}")
        ax.set(xlabel="chronological age (years)", title=f"{label} gap")
        ax.legend(frameon=False, fontsize="small")
    axes[0].set_ylabel("brain-age gap (years)")
    if title:
        fig.suptitle(title)
    return save_figure(fig, output_file)


def plot_training_history(
    history: Sequence[dict[str, float]] | pd.DataFrame,
    *,
    output_file: str | os.PathLike | None = None,
    title: str | None = None,
) -> Figure:
    """Training loss and validation MAE per epoch.

    Parameters
    ----------
    history : list of dict or pandas.DataFrame
        ``TrainResult.history`` (``epoch``, ``train_loss``, ``val_mae``).
    output_file : str or os.PathLike or None, default=None
        Save the figure there.
    title : str or None, default=None
        Figure title.

    Returns
    -------
    matplotlib.figure.Figure
    """
    h = pd.DataFrame(history)
    if h.empty:
        raise BrainAgeInputError("'history' is empty: nothing was trained.")
    fig, ax = plt.subplots(figsize=(6.0, 3.5), layout="constrained")
    ax.plot(h["epoch"] + 1, h["train_loss"], marker="o", ms=3, color="C0")
    ax.set(xlabel="epoch", ylabel="training loss")
    ax2 = ax.twinx()
    ax2.plot(h["epoch"] + 1, h["val_mae"], marker="s", ms=3, color="C1")
    ax2.set_ylabel("validation MAE (years)", color="C1")
    ax.set_title(title or "training history")
    return save_figure(fig, output_file)


def plot_age_prediction_interactive(
    table: pd.DataFrame,
    *,
    split: str | Sequence[str] = "test",
    output_file: str | os.PathLike | None = None,
    title: str | None = None,
) -> go.Figure:
    """Interactive scatter of predicted against chronological age.

    Hovering a point shows the participant, the ages and both gaps.

    Parameters
    ----------
    table : pandas.DataFrame
        Prediction table (``participant_id``, ``age``, ``predicted_age``, ``split``,
        optional ``gap``, ``gap_corrected``, ``group``).
    split : str or sequence of str, default="test"
        Split(s) to show.
    output_file : str or os.PathLike or None, default=None
        Save as a self-contained HTML file.
    title : str or None, default=None
        Title (None: the split and its MAE).

    Returns
    -------
    plotly.graph_objects.Figure
    """
    part = _select(table, split, ["participant_id", "age", "predicted_age"])
    fig = go.Figure()
    for name, sub in _groups(part):
        fig.add_trace(_scatter(sub, "predicted_age", name))
    lo, hi = _limits(part["age"], part["predicted_age"])
    fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="identity",
                             line={"dash": "dash", "color": "grey"}, hoverinfo="skip"))
    fig.update_layout(title=title or _default_title(part, split), width=560, height=520,
                      xaxis_title="chronological age (years)",
                      yaxis_title="predicted age (years)")
    fig.update_yaxes(scaleanchor="x", scaleratio=1)
    return _finish_plotly(fig, output_file)


def plot_gap_vs_age_interactive(
    table: pd.DataFrame,
    *,
    split: str | Sequence[str] = "test",
    output_file: str | os.PathLike | None = None,
    title: str | None = None,
) -> go.Figure:
    """Interactive brain-age gap against age, raw and bias-corrected side by side.

    Parameters
    ----------
    table : pandas.DataFrame
        Prediction table (``participant_id``, ``age``, ``gap``, ``gap_corrected``,
        ``split``, optional ``group``).
    split : str or sequence of str, default="test"
        Split(s) to show.
    output_file : str or os.PathLike or None, default=None
        Save as a self-contained HTML file.
    title : str or None, default=None
        Figure title.

    Returns
    -------
    plotly.graph_objects.Figure
    """
    part = _select(table, split, ["participant_id", "age", "gap", "gap_corrected"])
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True,
                        subplot_titles=("raw gap", "bias-corrected gap"))
    for col, column in enumerate(("gap", "gap_corrected"), start=1):
        for name, sub in _groups(part):
            trace = _scatter(sub, column, name)
            trace.update(legendgroup=name, showlegend=col == 1)
            fig.add_trace(trace, row=1, col=col)
        slope, intercept = _line(part["age"], part[column])
        xs = np.array([part["age"].min(), part["age"].max()])
        fig.add_trace(go.Scatter(x=xs, y=slope * xs + intercept, mode="lines",
                                 name=f"fit (slope {slope:+.2f})", line={"color": "black"},
                                 hoverinfo="skip"), row=1, col=col)
        fig.add_hline(y=0, line_dash="dash", line_color="grey", row=1, col=col)
        fig.update_xaxes(title_text="chronological age (years)", row=1, col=col)
    fig.update_yaxes(title_text="brain-age gap (years)", row=1, col=1)
    fig.update_layout(title=title, width=900, height=420)
    return _finish_plotly(fig, output_file)


# -- helpers -----------------------------------------------------------------------------
def _select(table: pd.DataFrame, split: str | Sequence[str], columns: list[str]
            ) -> pd.DataFrame:
    missing = [c for c in [*columns, "split"] if c not in table]
    if missing:
        raise BrainAgeInputError(
            f"the prediction table lacks column(s) {missing}; it has {list(table.columns)}."
        )
    splits = [split] if isinstance(split, str) else list(split)
    part = table[table["split"].isin(splits)]
    if part.empty:
        raise BrainAgeInputError(
            f"no subjects in split {split!r}; the table has splits "
            f"{sorted(table['split'].unique())}."
        )
    return part


def _groups(part: pd.DataFrame):
    if "group" not in part:
        return [("subjects", part)]
    return [(str(name), sub) for name, sub in part.groupby("group", sort=True)]


def _scatter(sub: pd.DataFrame, column: str, name: str) -> go.Scatter:
    extra = [c for c in ("predicted_age", "gap", "gap_corrected") if c in sub]
    custom = np.column_stack([sub["participant_id"].astype(str)] +
                             [sub[c].to_numpy(dtype=float).round(2) for c in extra])
    lines = ["<b>%{customdata[0]}</b>", "age %{x:.1f}"]
    lines += [f"{c.replace('_', ' ')} %{{customdata[{i + 1}]}}" for i, c in enumerate(extra)]
    return go.Scatter(x=sub["age"], y=sub[column], mode="markers", name=name,
                      marker={"size": 7, "opacity": 0.8, "color": GROUP_COLOURS.get(name)},
                      customdata=custom, hovertemplate="<br>".join(lines) + "<extra></extra>")


def _line(x: pd.Series, y: pd.Series) -> tuple[float, float]:
    if len(x) < 2 or np.ptp(x) == 0:
        return 0.0, float(np.mean(y))
    slope, intercept = np.polyfit(np.asarray(x, float), np.asarray(y, float), 1)
    return float(slope), float(intercept)


def _limits(*series: pd.Series) -> tuple[float, float]:
    values = np.concatenate([np.asarray(s, dtype=float) for s in series])
    lo, hi = float(values.min()), float(values.max())
    pad = 0.05 * max(hi - lo, 1.0)
    return lo - pad, hi + pad


def _default_title(part: pd.DataFrame, split: str | Sequence[str]) -> str:
    mae = float(np.mean(np.abs(part["predicted_age"] - part["age"])))
    name = split if isinstance(split, str) else "+".join(split)
    return f"{name}: MAE {mae:.2f} years (n={len(part)})"


def _finish_plotly(fig: go.Figure, output_file: str | os.PathLike | None) -> go.Figure:
    if output_file is not None:
        with atomic_path(output_file) as tmp:
            fig.write_html(tmp, include_plotlyjs=True, full_html=True)
    return fig
