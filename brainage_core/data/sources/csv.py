"""Data source: a CSV manifest (participant_id, path, age[, sex, site])."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from brainage_core._utils.validation import BrainAgeInputError
from brainage_core.data.manifest import (
    REQUIRED_CSV_COLUMNS,
    lower_known_columns,
    read_table,
    resolve_path,
    to_manifest,
)
from brainage_core.data.sources.base import DataSource


def load_csv(path: str | os.PathLike, *, require_age: bool = True) -> pd.DataFrame:
    """Read a CSV (or ``.tsv``) manifest.

    Parameters
    ----------
    path : str or os.PathLike
        Table with at least ``participant_id``, ``path`` and ``age`` columns; ``sex``,
        ``site`` and any other column are kept. Relative image paths are resolved against
        the folder of the table.
    require_age : bool, default=True
        Whether the ``age`` column is required; without it (``predict`` on subjects of
        unknown age) every age is missing.

    Returns
    -------
    pandas.DataFrame
        The manifest (see module docstring).
    """
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise BrainAgeInputError("manifest file does not exist", path)
    sep = "\t" if path.suffix.lower() == ".tsv" else ","
    table = read_table(path, sep=sep)
    table = table.rename(columns=lower_known_columns(table.columns))
    if not require_age and "age" not in table.columns:
        table["age"] = float("nan")
    missing = [c for c in REQUIRED_CSV_COLUMNS if c not in table.columns]
    if missing:
        raise BrainAgeInputError(
            f"manifest is missing required column(s) {missing}; columns are {list(table.columns)}",
            path,
        )
    table["participant_id"] = table["participant_id"].astype("string")
    table["path"] = [
        "" if pd.isna(p) or str(p).strip() == "" else str(resolve_path(path.parent, str(p)))
        for p in table["path"]
    ]
    if "site" not in table.columns:
        table["site"] = path.stem
    manifest = to_manifest(table)
    manifest.attrs["metadata"] = {"source": "csv", "source_root": str(path)}
    return manifest


SOURCE = DataSource(
    name="csv",
    description="a CSV manifest: participant_id, path, age[, sex, site] (data.path: the file)",
    needs_path=True,
    manifest=lambda request: load_csv(request.path),
)
