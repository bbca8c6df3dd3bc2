"""Interactive plotly figures that render in Jupyter, in the book (offline) and online.

Call :func:`setup_plotly` once at the top of a notebook. It selects the renderer
``plotly_mimetype+notebook``: JupyterLab and VS Code render the plotly mime type, and the
``notebook`` half embeds plotly.js itself once in the notebook's output, so the executed
notebook and the HTML book built from it show the figures without a network connection.
The default renderer of a headless kernel drops figures, and ``notebook_connected`` needs
a CDN; neither is used.
"""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import plotly.graph_objects as go
import plotly.io as pio

from brainage_core._utils.validation import BrainAgeInputError, check_choice

#: The renderer of every study notebook (see the module docstring).
RENDERER = "plotly_mimetype+notebook"

#: Red to yellow: the colour scale of maps over a grey template.
OVERLAY_COLORSCALE = [[0.0, "rgb(160,0,0)"], [0.35, "rgb(230,40,0)"],
                      [0.7, "rgb(255,160,0)"], [1.0, "rgb(255,255,120)"]]

#: Slice axis and displayed (horizontal, vertical) axes of each orientation.
ORIENTATIONS = {
    "axial": (2, (0, 1), ("x (mm, left → right)", "y (mm, posterior → anterior)"), "z"),
    "coronal": (1, (0, 2), ("x (mm, left → right)", "z (mm, inferior → superior)"), "y"),
    "sagittal": (0, (1, 2), ("y (mm, posterior → anterior)", "z (mm, inferior → superior)"),
                 "x"),
}


def setup_plotly(renderer: str = RENDERER) -> str:
    """Make plotly figures render in executed notebooks and in the book, offline.

    Parameters
    ----------
    renderer : str, default="plotly_mimetype+notebook"
        Plotly renderer(s) to use. Anything that needs a CDN or a display is refused.

    Returns
    -------
    str
        The renderer now in use.
    """
    if "connected" in renderer or renderer in ("browser", "chrome", "chromium", "firefox"):
        raise BrainAgeInputError(
            f"'renderer' must work offline in a headless build; {renderer!r} was provided. "
            f"Use {RENDERER!r}."
        )
    pio.renderers.default = renderer
    pio.templates.default = "plotly_white"
    return renderer


def _as_image(img: str | os.PathLike | nib.spatialimages.SpatialImage) -> nib.Nifti1Image:
    if isinstance(img, (str, os.PathLike)):
        if not os.path.exists(img):
            raise BrainAgeInputError("image file does not exist", img)
        img = nib.load(img)
    if not hasattr(img, "affine"):
        raise BrainAgeInputError(
            f"expected a NIfTI image or a path to one; {type(img).__name__} was provided."
        )
    data = np.asanyarray(img.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        img = nib.Nifti1Image(data[..., 0], img.affine)
    elif data.ndim != 3:
        raise BrainAgeInputError(f"expected a 3D image; its shape is {data.shape}.")
    return img


def slice_viewer(
    stat_img: str | os.PathLike | nib.spatialimages.SpatialImage,
    bg_img: str | os.PathLike | nib.spatialimages.SpatialImage | None = None,
    *,
    orientation: str = "axial",
    threshold: float | None = None,
    colorscale: str | list = "overlay",
    vmax: float | None = None,
    max_slices: int = 60,
    title: str | None = None,
    stat_label: str = "importance",
) -> go.Figure:
    """A map over a background, with a slider that scrolls through the slices.

    Parameters
    ----------
    stat_img : str, os.PathLike or nibabel image
        The map (for example the population importance map), 3D.
    bg_img : str, os.PathLike, nibabel image or None, default=None
        Background on the same grid (for example the template T1). None shows the map
        alone.
    orientation : {"axial", "coronal", "sagittal"}, default="axial"
        Slicing direction.
    threshold : float or None, default=None
        Map values below it are transparent. None uses the 80th percentile of the non-zero
        values, so the background stays visible.
    colorscale : str or list, default="overlay"
        Plotly colour scale of the map; ``"overlay"`` is a red-to-yellow scale (like
        nilearn's ``hot`` without its black end, which would vanish into the background).
    vmax : float or None, default=None
        Top of the colour scale; None uses the map's maximum.
    max_slices : int, default=60
        At most this many slices (evenly spaced) go into the figure, which keeps the
        page light at 1–2 mm.
    title : str or None, default=None
        Figure title.
    stat_label : str, default="importance"
        Name of the map's values in the colour bar and the hover text.

    Returns
    -------
    plotly.graph_objects.Figure
        Two heatmaps (background in grey, map on top) and a slider over the slices,
        labelled in MNI millimetres; it starts at the slice holding the map's maximum.
    """
    check_choice("orientation", orientation, tuple(ORIENTATIONS))
    if colorscale == "overlay":
        colorscale = OVERLAY_COLORSCALE
    stat = _as_image(stat_img)
    data = np.asarray(stat.get_fdata(), dtype=np.float32)
    bg = None
    if bg_img is not None:
        bg_image = _as_image(bg_img)
        bg = np.asarray(bg_image.get_fdata(), dtype=np.float32)
        if bg.shape != data.shape or not np.allclose(bg_image.affine, stat.affine, atol=1e-3):
            raise BrainAgeInputError(
                f"'bg_img' must be on the map's grid; shapes {bg.shape} and {data.shape}."
            )
    finite = data[np.isfinite(data) & (data != 0)]
    if finite.size == 0:
        raise BrainAgeInputError("the map holds no non-zero finite value to show.")
    if threshold is None:
        threshold = float(np.percentile(finite, 80))
    vmax = float(finite.max()) if vmax is None else float(vmax)

    axis, (h_axis, v_axis), (h_label, v_label), slice_name = ORIENTATIONS[orientation]
    n = data.shape[axis]
    indices = np.unique(np.linspace(0, n - 1, min(n, max_slices)).round().astype(int))
    start = int(np.argmin(np.abs(indices - np.unravel_index(np.nanargmax(data), data.shape)[axis])))
    h_mm = _axis_mm(stat.affine, h_axis, data.shape[h_axis])
    v_mm = _axis_mm(stat.affine, v_axis, data.shape[v_axis])
    s_mm = _axis_mm(stat.affine, axis, n)

    def planes(k: int) -> tuple[np.ndarray | None, np.ndarray]:
        overlay = np.take(data, k, axis=axis).T  # rows = vertical axis
        overlay = np.where(overlay >= threshold, overlay, np.nan).round(4)
        background = None if bg is None else np.take(bg, k, axis=axis).T.round(3)
        return background, overlay

    fig = go.Figure()
    background, overlay = planes(indices[start])
    if bg is not None:
        fig.add_trace(go.Heatmap(
            z=background, x=h_mm, y=v_mm, colorscale="Gray", showscale=False,
            hoverinfo="skip", name="template",
        ))
    fig.add_trace(go.Heatmap(
        z=overlay, x=h_mm, y=v_mm, colorscale=colorscale, zmin=threshold, zmax=vmax,
        colorbar={"title": {"text": stat_label}}, name=stat_label,
        hovertemplate=f"x=%{{x:.0f}} y=%{{y:.0f}} mm<br>{stat_label}=%{{z:.3f}}<extra></extra>",
    ))
    traces = [0, 1] if bg is not None else [0]
    steps = []
    for k in indices:
        background, overlay = planes(k)
        z = [background, overlay] if bg is not None else [overlay]
        steps.append({
            "method": "restyle",
            "label": f"{s_mm[k]:.0f}",
            "args": [{"z": z}, traces],
        })
    fig.update_layout(
        title=title,
        sliders=[{
            "active": start,
            "currentvalue": {"prefix": f"{orientation} slice, {slice_name} = ", "suffix": " mm"},
            "pad": {"t": 40},
            "steps": steps,
        }],
        xaxis={"title": h_label, "constrain": "domain"},
        yaxis={"title": v_label, "scaleanchor": "x", "scaleratio": 1, "constrain": "domain"},
        height=560,
        margin={"l": 60, "r": 20, "t": 60 if title else 30, "b": 40},
    )
    return fig


def _axis_mm(affine: np.ndarray, axis: int, n: int) -> np.ndarray:
    """World coordinates (mm) of the voxel centres along one axis of an RAS-aligned grid."""
    return np.round(affine[axis, axis] * np.arange(n) + affine[axis, 3], 2)
