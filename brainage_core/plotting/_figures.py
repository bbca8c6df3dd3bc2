"""Helpers every static figure of :mod:`brainage_core.plotting` shares."""

from __future__ import annotations

import os
from typing import Any

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from brainage_core._utils.io import atomic_path


def new_figure(axes: Any, size: tuple[float, float]) -> tuple[Figure, Any]:
    """Return ``(figure, axes)``: the given axes and their figure, or a new pair."""
    if axes is None:
        fig, ax = plt.subplots(figsize=size, layout="constrained")
        return fig, ax
    return axes.figure, axes


def save_figure(
    fig: Figure, output_file: str | os.PathLike | None, *, dpi: int = 150, **savefig_kwargs: Any
) -> Figure:
    """Save ``fig`` atomically to ``output_file`` (format from its suffix) and return it.

    Nothing is written when ``output_file`` is None.
    """
    if output_file is not None:
        with atomic_path(output_file) as tmp:
            fmt = str(output_file).rsplit(".", 1)[-1]
            fig.savefig(tmp, dpi=dpi, format=fmt, **savefig_kwargs)
    return fig
