"""The QC mosaic: three slices of each chosen subject as prepared, with the brain outline."""

from __future__ import annotations

import os

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from brainage_core._utils.validation import BrainAgeInputError
from brainage_core.data.preprocess import load_image, reorient, resample_to_template
from brainage_core.data.template import Template
from brainage_core.plotting._figures import save_figure


def plot_qc_mosaic(table: pd.DataFrame, template: Template, *,
                   output_file: str | os.PathLike | None = None,
                   title: str | None = None) -> Figure:
    """One row per subject: axial, coronal and sagittal mid-slices on the run's grid.

    Parameters
    ----------
    table : pandas.DataFrame
        Rows of ``predict``'s table (``participant_id``, ``path``, ``qc_flags``).
    template : Template
        The run's grid; its brain mask is drawn as a red outline.
    output_file : str, os.PathLike or None, default=None
        Where to save the figure.
    title : str or None, default=None
        Figure title.

    Returns
    -------
    matplotlib.figure.Figure
    """
    n = max(len(table), 1)
    fig, axes = plt.subplots(n, 3, figsize=(6.0, 2.0 * n + 0.4), squeeze=False,
                             layout="constrained")
    centre = [s // 2 for s in template.shape]
    cuts = [(lambda a: a[:, :, centre[2]]), (lambda a: a[:, centre[1], :]),
            (lambda a: a[centre[0], :, :])]
    for ax in axes.ravel():
        ax.set_axis_off()
    for row, (_, rec) in enumerate(table.iterrows()):
        try:
            data = resample_to_template(reorient(load_image(rec["path"])), template)
        except BrainAgeInputError:
            data = np.zeros(template.shape, dtype=np.float32)
        hi = float(np.percentile(data[template.mask], 99)) if np.any(data) else 1.0
        flags = str(rec.get("qc_flags") or "") if pd.notna(rec.get("qc_flags")) else ""
        for col, cut in enumerate(cuts):
            ax = axes[row, col]
            ax.imshow(cut(data).T, origin="lower", cmap="gray", vmin=0, vmax=hi or 1.0)
            ax.contour(cut(template.mask.astype(float)).T, levels=[0.5], colors="red",
                       linewidths=0.6)
        axes[row, 0].set_title(f"{rec['participant_id']}: {flags or 'typical'}", loc="left",
                               fontsize=8, color="darkred" if flags else "black")
    if title:
        fig.suptitle(title, fontsize=9)
    save_figure(fig, output_file, dpi=100)
    return fig
