"""Data source: nilearn's OASIS VBM fetcher (needs the network)."""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from brainage_core._utils.validation import BrainAgeInputError
from brainage_core.data.manifest import to_manifest
from brainage_core.data.sources.base import DataSource, SourceRequest


def fetch_oasis(
    data_dir: str | os.PathLike | None = None,
    n_subjects: int | None = None,
    timeout: float = 30.0,
) -> pd.DataFrame:
    """Download OASIS-1 VBM grey-matter maps with nilearn and build their manifest.

    Needs the network the first time (nilearn caches the files under ``data_dir``).
    The images are DARTEL-normalised, modulated grey-matter maps, not raw T1 images.

    Parameters
    ----------
    data_dir : str or os.PathLike or None, default=None
        nilearn data folder (``~/nilearn_data`` by default).
    n_subjects : int or None, default=None
        Number of subjects (all 403 when None).
    timeout : float, default=30.0
        Seconds to wait for the fetch before giving up with a clear error.

    Returns
    -------
    pandas.DataFrame
        The manifest; the OASIS covariates (mmse, cdr, educ, ...) are kept as columns.
    """
    from nilearn import datasets

    result: dict[str, Any] = {}

    def _fetch() -> None:
        try:
            result["bunch"] = datasets.fetch_oasis_vbm(
                n_subjects=n_subjects, data_dir=data_dir, verbose=0
            )
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            result["error"] = err

    thread = threading.Thread(target=_fetch, name="fetch_oasis_vbm", daemon=True)
    thread.start()
    thread.join(timeout)
    where = data_dir if data_dir is not None else "~/nilearn_data"
    if thread.is_alive():
        raise BrainAgeInputError(
            f"fetching OASIS VBM did not finish within {timeout} s (no network?); "
            "download it once on a connected machine or raise 'timeout'",
            where,
        )
    if "error" in result:
        err = result["error"]
        raise BrainAgeInputError(f"fetching OASIS VBM failed: {err}", where) from err
    return oasis_to_manifest(result["bunch"])


def oasis_to_manifest(bunch: Any) -> pd.DataFrame:
    """Turn the Bunch of :func:`nilearn.datasets.fetch_oasis_vbm` into a manifest.

    Parameters
    ----------
    bunch : sklearn.utils.Bunch
        With ``gray_matter_maps`` (paths) and ``ext_vars`` (DataFrame with ``id``,
        ``mf``, ``age``, ...). Rows are matched to images by the OASIS id in the file name.

    Returns
    -------
    pandas.DataFrame
        The manifest, site ``"OASIS-1"``.
    """
    ext = pd.DataFrame(bunch.ext_vars).copy()
    ext.columns = [str(c).lower() for c in ext.columns]
    if "id" not in ext.columns or "age" not in ext.columns:
        raise BrainAgeInputError(
            f"OASIS covariates need 'id' and 'age' columns; got {list(ext.columns)}"
        )
    ext["id"] = ext["id"].astype(str)
    by_id = ext.set_index("id")
    rows = []
    for gm in bunch.gray_matter_maps:
        match = re.search(r"OAS1_\d{4}_MR\d", Path(gm).name)
        if match is None:
            raise BrainAgeInputError("cannot find an OASIS id (OAS1_XXXX_MRn) in the name", gm)
        oid = match.group(0)
        row = by_id.loc[oid].to_dict() if oid in by_id.index else {"age": np.nan}
        row.update({"participant_id": oid, "path": str(Path(gm).resolve())})
        row["sex"] = row.pop("mf", None)
        row["site"] = "OASIS-1"
        rows.append(row)
    manifest = to_manifest(pd.DataFrame(rows))
    maps = list(bunch.gray_matter_maps)
    root = str(Path(maps[0]).resolve().parents[1]) if maps else ""
    manifest.attrs["metadata"] = {"source": "oasis", "source_root": root}
    return manifest


#: Seconds allowed for the OASIS download in a study run (about 1 GB; instant once there).
STUDY_TIMEOUT = 1800.0


def _manifest(request: SourceRequest) -> pd.DataFrame:
    return fetch_oasis(data_dir=request.path, timeout=STUDY_TIMEOUT)


SOURCE = DataSource(
    name="oasis",
    description="nilearn's OASIS VBM fetcher (needs the network; data.path: download folder)",
    needs_path=False,
    manifest=_manifest,
)
