"""NiiVue, the WebGL neuroimaging viewer, embedded in a notebook output and in the book.

:func:`niivue_viewer` returns an object that Jupyter (and so the book built from the
executed notebook) shows as HTML: a canvas with three orthogonal planes (click to move the
crosshair, scroll to change the slice), the template as background, one map at a time
chosen from a menu (methods, age bands), the planted ground truth as a second overlay that
the reader can toggle, a threshold slider, a colour-map menu and a layout menu.

The volumes travel inside the page (gzipped NIfTI as base64 ``data:`` URLs, overlays
quantised to 8 bits with the NIfTI scale slope), so the page needs no server and works
from ``file://``. The NiiVue library itself is not embedded: the page loads
:data:`NIIVUE_BUNDLE` relative to itself, the book vendors that file into its static
files at build time (:func:`brainage_core.pipeline.book.vendor_niivue`), and where it is missing,
or WebGL2 is not available, the viewer says so in place of the canvas and the plotly
slice viewers of the same page remain the fallback.
"""

from __future__ import annotations

import base64
import gzip
import html
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import nibabel as nib
import numpy as np

from brainage_core._utils.validation import BrainAgeInputError, check_choice

#: The npm package, its pinned version, the integrity of its tarball and its licence.
NIIVUE_PACKAGE = "@niivue/niivue"
NIIVUE_VERSION = "0.69.0"
NIIVUE_INTEGRITY = (
    "sha512-YMjQvJgD1W2b7DuoxkwlC4VxbrgIePRJ5qyQzXKxi2v2MBVg285P/CIQyg46oDDGDIcaNlbd+MhtO/edMbXJkA=="
)
NIIVUE_LICENSE = "BSD-2-Clause"

#: The self-contained UMD build inside the npm tarball, and where the book serves it.
NIIVUE_TARBALL_FILE = "package/dist/niivue.umd.js"
NIIVUE_BUNDLE = "niivue/niivue.umd.js"

#: URL of the bundle as seen from a notebook page of the book (``notebooks/NN_x.html``).
BOOK_BUNDLE_URL = f"../_static/{NIIVUE_BUNDLE}"

#: Colour maps offered in the viewer's menu (NiiVue's names); the first is the default.
COLORMAPS = ("warm", "hot", "plasma", "viridis", "inferno", "red", "winter")

#: Slice layouts offered in the menu: label -> NiiVue ``sliceType``.
LAYOUTS = {"three planes": 3, "axial": 0, "coronal": 1, "sagittal": 2, "3D render": 4}


@dataclass(frozen=True)
class NiivueViewer:
    """An embeddable NiiVue viewer (see :func:`niivue_viewer`); shows itself as HTML.

    Attributes
    ----------
    html : str
        The complete HTML fragment (a ``div`` and its script).
    volumes : dict
        Label -> byte size of each embedded gzipped NIfTI (before base64).
    """

    html: str
    volumes: dict[str, int] = field(default_factory=dict)

    def _repr_html_(self) -> str:
        return self.html


def niivue_viewer(
    background: nib.Nifti1Image,
    overlays: Mapping[str, nib.Nifti1Image],
    *,
    truth: nib.Nifti1Image | None = None,
    title: str = "",
    threshold_percentile: float = 80.0,
    colormap: str = COLORMAPS[0],
    height: int = 420,
    bundle_url: str = BOOK_BUNDLE_URL,
) -> NiivueViewer:
    """Build a NiiVue viewer of maps over a background image.

    Parameters
    ----------
    background : nibabel.Nifti1Image
        The anatomy (for example the 1 or 2 mm template), shown in grey.
    overlays : mapping of str to nibabel.Nifti1Image
        The maps, by label; the menu offers them one at a time, the first shown first.
        They may be on a coarser grid than the background: NiiVue places them by their
        affine.
    truth : nibabel.Nifti1Image or None, default=None
        A binary mask (the planted ground truth), shown as a toggleable green outline-like
        overlay; None hides the toggle.
    title : str, default=""
        Caption above the canvas.
    threshold_percentile : float, default=80.0
        Initial threshold of each map: its percentile over the non-zero voxels; voxels
        below are transparent. The slider moves it between the map's minimum and maximum.
    colormap : str, default="warm"
        Initial colour map, one of :data:`COLORMAPS`.
    height : int, default=420
        Canvas height in pixels.
    bundle_url : str, default=BOOK_BUNDLE_URL
        URL of ``niivue.umd.js`` relative to the page.

    Returns
    -------
    NiivueViewer
        Displays itself in Jupyter; ``.html`` is the fragment.
    """
    if not overlays:
        raise BrainAgeInputError("'overlays' must hold at least one map.")
    check_choice("colormap", colormap, COLORMAPS)
    if not 0.0 <= float(threshold_percentile) < 100.0:
        raise BrainAgeInputError(
            f"'threshold_percentile' must be in [0, 100); {threshold_percentile!r} was provided."
        )
    sizes: dict[str, int] = {}
    bg_url, sizes["background"] = _data_url(_quantised(background, positive=True))
    maps = []
    for label, img in overlays.items():
        data = np.asarray(img.get_fdata(), dtype=np.float64)
        finite = data[np.isfinite(data)]
        nonzero = finite[finite != 0]
        lo = float(finite.min()) if finite.size else 0.0
        hi = float(finite.max()) if finite.size else 1.0
        thr = float(np.percentile(nonzero, threshold_percentile)) if nonzero.size else lo
        url, sizes[label] = _data_url(_quantised(img))
        maps.append({"label": str(label), "url": url, "min": lo, "max": hi, "threshold": thr})
    truth_spec = None
    if truth is not None:
        mask = (np.asarray(truth.get_fdata()) > 0.5).astype(np.uint8)
        truth_img = nib.Nifti1Image(mask, truth.affine)
        truth_img.header.set_data_dtype(np.uint8)
        url, sizes["truth"] = _data_url(truth_img)
        truth_spec = {"label": "planted ground truth", "url": url}
    uid = f"nv-{uuid.uuid4().hex[:10]}"
    spec = {
        "id": uid,
        "bundle": bundle_url,
        "version": NIIVUE_VERSION,
        "background": bg_url,
        "maps": maps,
        "truth": truth_spec,
        "colormap": colormap,
        "colormaps": list(COLORMAPS),
        "layouts": LAYOUTS,
    }
    return NiivueViewer(html=_render(spec, title=title, height=int(height)), volumes=sizes)


def _quantised(img: nib.Nifti1Image, *, positive: bool = False) -> nib.Nifti1Image:
    """The image as uint8 with a scale slope and intercept (1 byte per voxel)."""
    data = np.asarray(img.get_fdata(), dtype=np.float64)
    data = np.where(np.isfinite(data), data, 0.0)
    if positive:
        data = np.clip(data, 0.0, None)
    lo, hi = float(data.min()), float(data.max())
    scale = (hi - lo) / 255.0 if hi > lo else 1.0
    codes = np.round((data - lo) / scale).astype(np.uint8)
    out = nib.Nifti1Image(codes, img.affine)
    out.header.set_data_dtype(np.uint8)
    out.header.set_slope_inter(scale, lo)
    out.header.set_qform(img.affine, code=4)
    out.header.set_sform(img.affine, code=4)
    return out


def _data_url(img: nib.Nifti1Image) -> tuple[str, int]:
    raw = gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)
    return "data:application/gzip;base64," + base64.b64encode(raw).decode("ascii"), len(raw)


_TEMPLATE = """
<div class="brainage-niivue" id="__ID__" style="max-width: 100%; margin: 0.5em 0 1em 0;">
  <div class="nv-title" style="font-weight: 600; margin-bottom: 0.3em;">__TITLE__</div>
  <div class="nv-controls" style="display: flex; flex-wrap: wrap; gap: 0.8em;
       align-items: center; font-size: 0.9em; margin-bottom: 0.4em;">
    <label>map <select class="nv-map"></select></label>
    <label>threshold <input class="nv-threshold" type="range" min="0" max="1000" value="0"
           style="vertical-align: middle;"> <span class="nv-threshold-value"></span></label>
    <label>colours <select class="nv-colormap"></select></label>
    <label>layout <select class="nv-layout"></select></label>
    <label class="nv-truth-label"><input class="nv-truth" type="checkbox">
           planted ground truth</label>
  </div>
  <div class="nv-canvas-box" style="width: 100%; height: __HEIGHT__px; background: #000;">
    <canvas class="nv-canvas"></canvas>
  </div>
  <div class="nv-status" style="font-size: 0.85em; color: #555; margin-top: 0.3em;"></div>
</div>
<script type="application/json" id="__ID__-spec">__SPEC__</script>
<script>
(() => {
  const root = document.getElementById("__ID__");
  const spec = JSON.parse(document.getElementById("__ID__-spec").textContent);
  const status = root.querySelector(".nv-status");
  root.dataset.state = "loading";
  const fail = (why) => {
    root.dataset.state = "unavailable";
    root.querySelector(".nv-canvas-box").style.display = "none";
    root.querySelector(".nv-controls").style.display = "none";
    status.textContent = "The NiiVue viewer is not available here (" + why +
      "); the plotly slice viewers on this page show the same map.";
  };
  const gl = document.createElement("canvas").getContext("webgl2");
  if (!gl) { fail("this browser has no WebGL2"); return; }
  const start = async () => {
    const nv = new niivue.Niivue({backColor: [0, 0, 0, 1], show3Dcrosshair: true,
                                  isColorbar: true, logLevel: "error",
                                  crosshairColor: [0.2, 0.8, 1, 1]});
    await nv.attachToCanvas(root.querySelector(".nv-canvas"));
    const first = spec.maps[0];
    // Every map is loaded once, hidden but the current one: the menu only swaps opacities.
    const volumes = [{url: spec.background, name: "background.nii.gz", colormap: "gray"}];
    spec.maps.forEach((m, i) => volumes.push({url: m.url, name: "map" + i + ".nii.gz",
      colormap: spec.colormap, cal_min: m.threshold, cal_max: m.max,
      opacity: i === 0 ? 0.85 : 0.0}));
    if (spec.truth) volumes.push({url: spec.truth.url, name: "truth.nii.gz", colormap: "green",
                                  cal_min: 0.5, cal_max: 1, opacity: 0.0});
    await nv.loadVolumes(volumes);
    const show = (idx, opacity) => {  // hidden volumes lose their colour bar too
      nv.volumes[idx].colorbarVisible = opacity > 0;
      nv.setOpacity(idx, opacity);
    };
    nv.volumes.forEach((v, i) => { if (v.opacity === 0) show(i, 0.0); });
    nv.setSliceType(spec.layouts["three planes"]);
    const mapSel = root.querySelector(".nv-map"), thr = root.querySelector(".nv-threshold");
    const thrValue = root.querySelector(".nv-threshold-value");
    const cmSel = root.querySelector(".nv-colormap"), layoutSel = root.querySelector(".nv-layout");
    const truthBox = root.querySelector(".nv-truth");
    spec.maps.forEach((m, i) => mapSel.add(new Option(m.label, i)));
    spec.colormaps.forEach(c => cmSel.add(new Option(c, c)));
    Object.keys(spec.layouts).forEach(k => layoutSel.add(new Option(k, spec.layouts[k])));
    cmSel.value = spec.colormap;
    let index = 0;
    const showThreshold = () => {
      const m = spec.maps[index], v = nv.volumes[1 + index];
      thr.value = Math.round(1000 * (v.cal_min - m.min) / ((m.max - m.min) || 1));
      thrValue.textContent = v.cal_min.toPrecision(3);
    };
    showThreshold();
    thr.addEventListener("input", () => {
      const m = spec.maps[index], v = nv.volumes[1 + index];
      v.cal_min = m.min + (m.max - m.min) * thr.value / 1000;
      v.cal_max = m.max;
      thrValue.textContent = v.cal_min.toPrecision(3);
      nv.updateGLVolume();
    });
    mapSel.addEventListener("change", () => {
      show(1 + index, 0.0);
      index = +mapSel.value;
      nv.setColormap(nv.volumes[1 + index].id, cmSel.value);
      show(1 + index, 0.85);
      showThreshold();
      root.dataset.map = spec.maps[index].label;
    });
    cmSel.addEventListener("change", () => nv.setColormap(nv.volumes[1 + index].id, cmSel.value));
    layoutSel.addEventListener("change", () => nv.setSliceType(+layoutSel.value));
    if (spec.truth) {
      truthBox.addEventListener("change", () => {
        show(nv.volumes.length - 1, truthBox.checked ? 0.6 : 0.0);
        root.dataset.truth = truthBox.checked ? "shown" : "hidden";
      });
      root.dataset.truth = "hidden";
    } else {
      root.querySelector(".nv-truth-label").style.display = "none";
    }
    root.dataset.map = first.label;
    root.dataset.volumes = String(nv.volumes.length);
    root.dataset.state = "ready";
    status.textContent = "NiiVue " + spec.version +
      ": click to move the crosshair, scroll to change the slice, " +
      "right-drag to change the contrast.";
    root.nv = nv;
  };
  const run = () => start().catch(err => { fail("error: " + err); console.error(err); });
  if (window.niivue) { run(); return; }
  let script = document.querySelector("script[data-niivue-bundle]");
  if (!script) {
    script = document.createElement("script");
    script.src = spec.bundle;
    script.dataset.niivueBundle = "1";
    document.head.appendChild(script);
  }
  script.addEventListener("load", run);
  script.addEventListener("error", () => fail("its script " + spec.bundle + " did not load"));
})();
</script>
"""


def _render(spec: dict[str, Any], *, title: str, height: int) -> str:
    text = json.dumps(spec).replace("</", "<\\/")
    return (
        _TEMPLATE.replace("__ID__", spec["id"])
        .replace("__TITLE__", html.escape(title))
        .replace("__HEIGHT__", str(height))
        .replace("__SPEC__", text)
    )
