"""The QC page: a mosaic of flagged and typical subjects, and the QC measures as a table."""

from __future__ import annotations

import html
import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from brainage_core._utils.io import write_text
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


#: Flagged subjects the QC mosaic shows at most; the page's table lists every subject.
MAX_FLAGGED_SHOWN = 24


def write_qc_page(table: pd.DataFrame, out: str | os.PathLike, template: Template, *,
                  title: str = "Quality control", n_typical: int = 3,
                  max_flagged: int = MAX_FLAGGED_SHOWN) -> Path:
    """``OUT/qc_mosaic.png`` (flagged subjects and a few typical ones) and ``OUT/qc.html``.

    The mosaic shows, per subject, three orthogonal slices of the image as ``predict``
    prepared it (on the grid), with the template's brain outline: every flagged subject,
    or the ``max_flagged`` least similar to the template (lowest ``ncc``) when more are
    flagged (a cohort flagged whole, for example for its voxel size, would otherwise make
    a figure of thousands of rows), then ``n_typical`` typical ones. The page holds the
    mosaic and the QC measures of every subject as a sortable table.
    """
    out = Path(out)
    flagged = table[~table["qc_pass"].astype(bool)]
    passed = table[table["qc_pass"].astype(bool)]
    if len(passed) and "ncc" in passed:
        order = (passed["ncc"] - passed["ncc"].median()).abs().sort_values().index
        typical = passed.loc[order[:n_typical]]
    else:
        typical = passed.head(0)
    shown_flagged = flagged
    if len(flagged) > max_flagged:
        worst = flagged.sort_values("ncc", kind="stable") if "ncc" in flagged else flagged
        shown_flagged = worst.head(max_flagged)
    mosaic = out / "qc_mosaic.png"
    plot_qc_mosaic(pd.concat([shown_flagged, typical]), template, output_file=mosaic)
    shown = table.drop(columns=["path"], errors="ignore").round(3)
    rows = shown.to_html(index=False, classes="qc", table_id="qc", na_rep="",
                         escape=True, border=0)
    which = ("every flagged subject" if len(shown_flagged) == len(flagged) else
             f"the {len(shown_flagged)} flagged subjects least similar to the template "
             f"(lowest NCC) of {len(flagged)}")
    page = _QC_HTML.format(title=html.escape(title), n=len(table), n_flagged=len(flagged),
                           which=which, table=rows)
    return write_text(out / "qc.html", page)


_QC_HTML = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
table.qc {{ border-collapse: collapse; font-size: 0.85em; }}
table.qc th, table.qc td {{ padding: 2px 6px; border-bottom: 1px solid #ddd; }}
table.qc th {{ cursor: pointer; background: #f3f3f3; position: sticky; top: 0; }}
</style></head><body>
<h1>{title}</h1>
<p>{n_flagged} of {n} subjects flagged. The mosaic shows {which}, then a few typical
ones, as prepared on the run's grid (red: the template's brain outline).
Click a column header to sort.</p>
<img src="qc_mosaic.png" alt="QC mosaic" style="max-width: 100%">
{table}
<script>
document.querySelectorAll("table.qc th").forEach((th, col) => th.addEventListener("click", () => {{
  const body = th.closest("table").tBodies[0];
  const rows = Array.from(body.rows);
  const asc = th.dataset.asc !== "1"; th.dataset.asc = asc ? "1" : "0";
  const key = r => {{ const t = r.cells[col].textContent; const v = parseFloat(t);
                      return isNaN(v) ? t : v; }};
  rows.sort((a, b) => (key(a) > key(b) ? 1 : key(a) < key(b) ? -1 : 0) * (asc ? 1 : -1));
  rows.forEach(r => body.appendChild(r));
}}));
</script>
</body></html>
"""
