"""Figures of the synthetic cohort: subjects of increasing age, and the planted truth.

Both functions take the cohort's folder (written by
:func:`brainage_core.data.synth.generate_cohort`), draw with nilearn, and return the
matplotlib figure; ``output_file`` also saves it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import nibabel as nib
import numpy as np
import pandas as pd
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from nilearn import plotting

from brainage_core._utils.validation import BrainAgeInputError
from brainage_core.data.synth.cohort import load_ground_truth
from brainage_core.data.synth.config import EFFECT_KINDS
from brainage_core.data.template import load_template
from brainage_core.plotting._figures import save_figure

#: Cuts (MNI mm, x/y/z) through the hippocampi and the bodies of the lateral ventricles.
DEFAULT_CUT_COORDS = (-26.0, -22.0, 16.0)

_KIND_COLOURS = {
    "ventricle_expansion": "#1f77b4",
    "atrophy": "#d62728",
    "cortical_thinning": "#ff7f0e",
}
_KIND_LABELS = {
    "ventricle_expansion": "ventricle expansion",
    "atrophy": "atrophy",
    "cortical_thinning": "cortical thinning",
}


def plot_subjects_by_age(
    dataset_root: str | os.PathLike,
    participant_ids: Sequence[str] | None = None,
    *,
    n_subjects: int = 4,
    cut_coords: Sequence[float] = DEFAULT_CUT_COORDS,
    output_file: str | os.PathLike | None = None,
    title: str | None = None,
) -> Figure:
    """Show synthetic subjects of increasing age below the template, cut at the same place.

    Parameters
    ----------
    dataset_root : str or os.PathLike
        Folder of a synthetic cohort.
    participant_ids : sequence of str or None, default=None
        Subjects to show; None picks ``n_subjects`` spread evenly over the age range.
    n_subjects : int, default=4
        Number of subjects picked when ``participant_ids`` is None.
    cut_coords : sequence of 3 floats, default=DEFAULT_CUT_COORDS
        MNI coordinates (mm) of the sagittal, coronal and axial cuts.
    output_file : str or os.PathLike or None, default=None
        Also save the figure there.
    title : str or None, default=None
        Figure title.

    Returns
    -------
    matplotlib.figure.Figure
    """
    root = Path(dataset_root)
    table = _participants(root)
    if participant_ids is None:
        chosen = _spread_by_age(table, n_subjects)
    else:
        unknown = sorted(set(participant_ids) - set(table["participant_id"]))
        if unknown:
            raise BrainAgeInputError(
                f"'participant_ids' not in participants.tsv: {unknown}.", root / "participants.tsv"
            )
        chosen = table.set_index("participant_id").loc[list(participant_ids)].reset_index()
        chosen = chosen.sort_values("age")
    template = load_template(_resolution(root))
    rows = [("MNI152 template", template.to_image(template.t1))]
    for row in chosen.itertuples(index=False):
        path = root / row.participant_id / "anat" / f"{row.participant_id}_T1w.nii.gz"
        label = f"{row.participant_id}: age {row.age:.0f}"
        if "biological_age" in chosen.columns:
            label += f" (biological {row.biological_age:.0f})"
        rows.append((label, nib.load(path)))
    fig, axes = plt.subplots(len(rows), 1, figsize=(8, 2.2 * len(rows)), squeeze=False)
    fig.subplots_adjust(
        left=0.01, right=0.99, top=0.97 if title else 0.99, bottom=0.01, hspace=0.08
    )
    for ax, (label, img) in zip(axes[:, 0], rows, strict=True):
        data = np.asarray(img.dataobj, dtype=np.float32)
        vmax = float(np.percentile(data[data > 0], 99.5)) if (data > 0).any() else 1.0
        plotting.plot_anat(
            img,
            axes=ax,
            cut_coords=tuple(cut_coords),
            display_mode="ortho",
            title=label,
            annotate=False,
            draw_cross=False,
            dim=0,
            vmin=0.0,
            vmax=vmax,
            black_bg=True,
            colorbar=False,
        )
    fig.patch.set_facecolor("black")
    if title:
        fig.suptitle(title, color="white")
    return save_figure(
        fig, output_file, dpi=100, facecolor=fig.get_facecolor(), bbox_inches="tight"
    )


def plot_ground_truth(
    dataset_root: str | os.PathLike,
    *,
    display_mode: str = "z",
    cut_coords: int | Sequence[float] = 7,
    output_file: str | os.PathLike | None = None,
    title: str | None = None,
) -> Figure:
    """Show where age signal was planted, coloured by effect kind, over the template.

    Parameters
    ----------
    dataset_root : str or os.PathLike
        Folder of a synthetic cohort.
    display_mode : str, default="z"
        nilearn display mode ("z", "ortho", "mosaic", ...).
    cut_coords : int or sequence of float, default=7
        Number or MNI positions of the cuts.
    output_file : str or os.PathLike or None, default=None
        Also save the figure there.
    title : str or None, default=None
        Figure title.

    Returns
    -------
    matplotlib.figure.Figure
    """
    root = Path(dataset_root)
    truth = load_ground_truth(root)
    template = load_template(_resolution(root))
    labels = np.zeros(template.shape, dtype=np.int16)
    kinds = [k for k in EFFECT_KINDS if k in truth.effect_mask_imgs]
    for value, kind in enumerate(kinds, start=1):
        mask = np.asarray(truth.effect_mask_imgs[kind].dataobj) > 0
        labels[mask & (labels == 0)] = value
    # Voxels of the overall mask that no single effect reaches (joint effects) get a colour.
    joint = truth.mask & (labels == 0)
    colours = [_KIND_COLOURS[k] for k in kinds]
    names = [_KIND_LABELS[k] for k in kinds]
    if joint.any():
        labels[joint] = len(kinds) + 1
        colours.append("#9467bd")
        names.append("joint effects")
    fig = plt.figure(figsize=(12, 3.2))
    plotting.plot_roi(
        template.to_image(labels),
        bg_img=template.to_image(template.t1),
        display_mode=display_mode,
        cut_coords=cut_coords,
        cmap=ListedColormap(colours),
        vmin=0.5,
        vmax=len(colours) + 0.5,
        figure=fig,
        title=title,
        annotate=False,
        draw_cross=False,
        black_bg=True,
        alpha=0.8,
        colorbar=False,
    )
    handles = [Patch(color=c, label=n) for c, n in zip(colours, names, strict=True)]
    fig.legend(
        handles=handles, loc="lower center", ncol=len(handles), frameon=False, labelcolor="white"
    )
    fig.patch.set_facecolor("black")
    return save_figure(
        fig, output_file, dpi=100, facecolor=fig.get_facecolor(), bbox_inches="tight"
    )


def _participants(root: Path) -> pd.DataFrame:
    path = root / "participants.tsv"
    if not path.is_file():
        raise BrainAgeInputError("participants.tsv is missing.", path)
    return pd.read_csv(path, sep="\t")


def _resolution(root: Path) -> int:
    path = root / "dataset_description.json"
    try:
        desc = json.loads(path.read_text(encoding="utf-8"))
        return int(desc["SyntheticCohort"]["config"]["resolution"])
    except (OSError, KeyError, TypeError, ValueError) as err:
        raise BrainAgeInputError(f"not a synthetic cohort ({err!r}).", path) from err


def _spread_by_age(table: pd.DataFrame, n: int) -> pd.DataFrame:
    """``n`` distinct subjects whose ages are closest to evenly spaced targets."""
    if n < 1:
        raise BrainAgeInputError(f"'n_subjects' must be a positive integer; {n!r} was provided.")
    ordered = table.sort_values("age").reset_index(drop=True)
    targets = np.linspace(ordered["age"].min(), ordered["age"].max(), min(n, len(ordered)))
    picked: list[int] = []
    for target in targets:
        distance = (ordered["age"] - target).abs()
        distance[picked] = np.inf
        picked.append(int(distance.idxmin()))
    return ordered.loc[sorted(picked)]
