"""Data source: a BIDS folder with ``participants.tsv``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd

from brainage_core._utils.validation import BrainAgeInputError
from brainage_core.data.manifest import (
    lower_known_columns,
    read_table,
    to_manifest,
)
from brainage_core.data.sources.base import DataSource

#: File patterns of T1-weighted images inside ``sub-*/[ses-*/]anat``.
_T1W_PATTERNS = ("*_T1w.nii.gz", "*_T1w.nii")


# -- sources ------------------------------------------------------------------------------
def load_bids(root: str | os.PathLike) -> pd.DataFrame:
    """Build the manifest of a BIDS folder.

    Parameters
    ----------
    root : str or os.PathLike
        Dataset folder holding ``participants.tsv`` and ``sub-*/[ses-*/]anat/*_T1w.nii[.gz]``.

    Returns
    -------
    pandas.DataFrame
        The manifest (see module docstring), one row per participant listed in
        ``participants.tsv`` or holding an image. When a participant has several T1w
        images (sessions, runs), the first in sorted order is used and its ``session``
        recorded. A participant without an image gets an empty ``path`` and one without
        a row in ``participants.tsv`` a missing ``age``: :func:`validate_manifest`
        reports both. ``manifest.attrs["metadata"]`` holds the source description
        (``source``, ``source_root``, and ``oracle_mae`` for a synthetic cohort). Without
        a ``site`` column, the site is the dataset's ``Name`` (dataset_description.json)
        or else the folder's name.
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise BrainAgeInputError("BIDS folder does not exist", root)
    tsv = root / "participants.tsv"
    if not tsv.is_file():
        raise BrainAgeInputError("no participants.tsv in this BIDS folder", root)
    participants = read_table(tsv, sep="\t")
    if "participant_id" not in participants.columns:
        raise BrainAgeInputError(
            f"missing required column 'participant_id'; columns are {list(participants.columns)}",
            tsv,
        )
    participants = participants.rename(columns=lower_known_columns(participants.columns))
    if "age" not in participants.columns:
        raise BrainAgeInputError(
            f"missing required column 'age'; columns are {list(participants.columns)}", tsv
        )
    participants["participant_id"] = participants["participant_id"].map(_bids_label)

    images: dict[str, tuple[str, str | None]] = {}
    for path in _find_t1w(root):
        rel = path.relative_to(root).parts
        label = rel[0]
        session = rel[1] if len(rel) > 1 and rel[1].startswith("ses-") else None
        images.setdefault(label, (str(path), session))

    listed = set(participants["participant_id"])
    unlisted = sorted(set(images) - listed)
    if unlisted:
        participants = pd.concat(
            [participants, pd.DataFrame({"participant_id": unlisted})], ignore_index=True
        )
    participants["path"] = participants["participant_id"].map(
        lambda p: images.get(p, ("", None))[0]
    )
    if any(s is not None for _, s in images.values()):
        participants["session"] = participants["participant_id"].map(
            lambda p: images.get(p, ("", None))[1]
        )
    metadata = bids_metadata(root)
    if "site" not in participants.columns:  # one site: the dataset's name
        participants["site"] = metadata.get("dataset_name") or root.name
    manifest = to_manifest(participants)
    manifest.attrs["metadata"] = metadata
    return manifest



def bids_metadata(root: str | os.PathLike) -> dict[str, Any]:
    """Describe a BIDS folder from its ``dataset_description.json``.

    Returns
    -------
    dict
        ``source`` ("bids" or "synthetic"), ``source_root``, ``dataset_name``, and for a
        synthetic cohort (key ``"SyntheticCohort"``) its ``oracle_mae``.
    """
    root = Path(root).expanduser().resolve()
    meta: dict[str, Any] = {"source": "bids", "source_root": str(root)}
    desc_path = root / "dataset_description.json"
    if desc_path.is_file():
        try:
            desc = json.loads(desc_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise BrainAgeInputError(f"not valid JSON: {err}", desc_path) from err
        if "Name" in desc:
            meta["dataset_name"] = desc["Name"]
        synth = desc.get("SyntheticCohort")
        if isinstance(synth, dict):
            meta["source"] = "synthetic"
            if synth.get("oracle_mae") is not None:
                meta["oracle_mae"] = float(synth["oracle_mae"])
    return meta


def _bids_label(value: Any) -> Any:
    if pd.isna(value):
        return value
    value = str(value).strip()
    return value if value.startswith("sub-") else f"sub-{value}"


def _find_t1w(root: Path) -> list[Path]:
    found: list[Path] = []
    for anat in ("sub-*/anat", "sub-*/ses-*/anat"):
        for pattern in _T1W_PATTERNS:
            found.extend(root.glob(f"{anat}/{pattern}"))
    return sorted(set(found))


SOURCE = DataSource(
    name="bids",
    description="a BIDS folder with participants.tsv (data.path: its root)",
    needs_path=True,
    manifest=lambda request: load_bids(request.path),
)
