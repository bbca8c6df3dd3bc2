"""Shared fixtures of the data-layer tests: tiny BIDS folders and CSV manifests.

The images are the MNI template at 8 mm with a seeded, subject-specific intensity
scale, offset and noise, so that each subject's preprocessed array differs. They do not
depend on the synthetic-cohort generator (tested on its own).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from brainage_core.data.template import load_template

#: Resolution (mm) of the test images and caches.
RES = 8


def make_image(seed: int, resolution: int = RES) -> nib.Nifti1Image:
    """A template-like T1 image on the template grid with seeded scale, offset and noise."""
    tpl = load_template(resolution)
    rng = np.random.default_rng(seed)
    data = tpl.t1 * rng.uniform(50, 150) + rng.uniform(0, 20)
    data = data + rng.normal(0, 2.0, tpl.shape)
    return nib.Nifti1Image(data.astype(np.float32), tpl.affine)


def make_bids(
    root: Path,
    n: int = 6,
    *,
    seed: int = 0,
    sessions: bool = False,
    synthetic_oracle: float | None = None,
) -> Path:
    """Write a tiny BIDS folder of ``n`` subjects; return its root."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ids = [f"sub-{k + 1:02d}" for k in range(n)]
    ages = np.round(rng.uniform(45, 82, n), 1)
    sexes = ["male" if k % 2 else "F" for k in range(n)]
    pd.DataFrame({"participant_id": ids, "age": ages, "sex": sexes, "group": "control"}).to_csv(
        root / "participants.tsv", sep="\t", index=False
    )
    desc = {"Name": "tiny", "BIDSVersion": "1.8.0"}
    if synthetic_oracle is not None:
        desc["SyntheticCohort"] = {"config": {}, "oracle_mae": synthetic_oracle}
    (root / "dataset_description.json").write_text(json.dumps(desc))
    for k, pid in enumerate(ids):
        anat = root / pid / ("ses-01/anat" if sessions else "anat")
        anat.mkdir(parents=True, exist_ok=True)
        name = f"{pid}_ses-01_T1w.nii.gz" if sessions else f"{pid}_T1w.nii.gz"
        nib.save(make_image(seed * 1000 + k), anat / name)
    return root


def t1w_path(root: Path, pid: str) -> Path:
    """Path of a subject's T1w image in a folder written by :func:`make_bids`."""
    return next((root / pid).rglob("*_T1w.nii.gz"))


def truncate_gzip(path: Path) -> None:
    """Cut a ``.nii.gz`` file in the middle of its compressed stream (header intact)."""
    raw = path.read_bytes()
    header = gzip.compress(gzip.decompress(raw)[:400])  # still a valid gzip header start
    path.write_bytes(raw[: max(len(raw) // 2, len(header))])


def save_with_raw_affine(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    """Save ``data`` with ``affine`` written verbatim into the sform (even if degenerate).

    nibabel refuses to build an image from a degenerate affine, but such files exist in
    the wild; this writes one by setting the header fields directly.
    """
    img = nib.Nifti1Image(np.asarray(data, dtype=np.float32), np.eye(4))
    hdr = img.header
    for key, row in zip(("srow_x", "srow_y", "srow_z"), np.asarray(affine)[:3], strict=True):
        hdr[key] = row
    hdr["sform_code"] = 1
    hdr["qform_code"] = 0
    nib.save(nib.Nifti1Image(img.dataobj, None, header=hdr), path)
    return path


def make_longitudinal_bids(
    root: Path,
    n: int = 2,
    sessions: tuple[str, ...] = ("01", "02"),
    *,
    years_between: float = 2.5,
    sessions_tsv: bool = True,
) -> Path:
    """A BIDS folder of ``n`` subjects scanned at every session, with per-session ages.

    ``participants.tsv`` holds the age at the first session; ``sub-X_sessions.tsv`` the
    age at each session (``years_between`` apart). Returns the root.
    """
    root.mkdir(parents=True, exist_ok=True)
    ids = [f"sub-{k + 1:02d}" for k in range(n)]
    baseline = [50.0 + 7.0 * k for k in range(n)]
    pd.DataFrame({"participant_id": ids, "age": baseline, "sex": "F"}).to_csv(
        root / "participants.tsv", sep="\t", index=False
    )
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": "longitudinal", "BIDSVersion": "1.8.0"})
    )
    for k, pid in enumerate(ids):
        for j, ses in enumerate(sessions):
            anat = root / pid / f"ses-{ses}" / "anat"
            anat.mkdir(parents=True, exist_ok=True)
            nib.save(make_image(100 * k + j), anat / f"{pid}_ses-{ses}_T1w.nii.gz")
        if sessions_tsv:
            pd.DataFrame(
                {
                    "session_id": [f"ses-{s}" for s in sessions],
                    "age": [baseline[k] + years_between * j for j in range(len(sessions))],
                }
            ).to_csv(root / pid / f"{pid}_sessions.tsv", sep="\t", index=False)
    return root
