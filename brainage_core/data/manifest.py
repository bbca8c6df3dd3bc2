"""Data sources to one manifest: a table of participants and the image of each.

Every source (a BIDS folder, a CSV manifest, nilearn's OASIS VBM fetcher, and the
synthetic cohort, which is a BIDS folder like any other) is turned into the same table:

=================  ==========================================================
``participant_id``  unique participant label (``sub-XXXX`` for BIDS)
``path``            absolute path of the participant's image
``age``             chronological age in years (float)
``sex``             ``"M"``, ``"F"`` or missing
``site``            acquisition site or source name
...                 any extra column of the source (gap, group, mmse, ...)
=================  ==========================================================

:func:`validate_manifest` checks that table and lists each bad row with its reason, so
that the preparation step can either stop at the first problem or skip the participant
and report it (see :mod:`brainage_core.data.cache`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from brainage_core._utils.validation import BrainAgeInputError, check_choice

#: Columns every manifest holds, in this order, before any extra column.
MANIFEST_COLUMNS = ("participant_id", "path", "age", "sex", "site")

#: Columns a CSV manifest must provide (sex and site may be absent).
REQUIRED_CSV_COLUMNS = ("participant_id", "path", "age")

#: Policies for a bad participant: stop with an error, or skip it and report it.
ON_ERROR_CHOICES = ("raise", "skip")

_SEX_CODES = {
    "m": "M",
    "male": "M",
    "man": "M",
    "f": "F",
    "female": "F",
    "woman": "F",
}
_NA_VALUES = ["n/a", "N/A", "NA", "nan", "NaN", ""]


# -- validation ---------------------------------------------------------------------------
def find_manifest_problems(manifest: pd.DataFrame) -> pd.DataFrame:
    """List the rows of a manifest that cannot be used, with the reason.

    Checks, per row: a missing participant id, a missing or non-numeric age, a
    duplicate participant (the later rows), a missing path and a path that does not
    exist.

    Returns
    -------
    pandas.DataFrame
        Columns ``row`` (position in ``manifest``), ``participant_id``, ``path`` and
        ``reason``; empty when every row is usable.
    """
    _check_columns(manifest, "manifest")
    problems = []
    seen: set[str] = set()
    for row, rec in enumerate(manifest.itertuples(index=False)):
        pid = rec.participant_id
        path = rec.path
        reason = None
        if pd.isna(pid) or str(pid).strip() == "":
            reason = "missing participant_id"
        elif str(pid) in seen:
            reason = f"duplicate participant {pid!r}"
        else:
            age = pd.to_numeric(pd.Series([rec.age]), errors="coerce").iloc[0]
            if pd.isna(rec.age):
                reason = "missing age"
            elif pd.isna(age):
                reason = f"non-numeric age {rec.age!r}"
            elif not np.isfinite(age) or age < 0:
                reason = f"invalid age {rec.age!r}"
            elif pd.isna(path) or str(path) == "":
                reason = "no image path (no T1w image found)"
            elif not Path(str(path)).is_file():
                reason = "image file does not exist"
        if not (pd.isna(pid) or str(pid).strip() == ""):
            seen.add(str(pid))
        if reason is not None:
            problems.append(
                {
                    "row": row,
                    "participant_id": None if pd.isna(pid) else str(pid),
                    "path": "" if pd.isna(path) else str(path),
                    "reason": reason,
                }
            )
    return pd.DataFrame(problems, columns=["row", "participant_id", "path", "reason"])


def validate_manifest(
    manifest: pd.DataFrame, source: str = "manifest", *, on_error: str = "raise"
) -> pd.DataFrame:
    """Check a manifest and return a clean copy.

    Parameters
    ----------
    manifest : pandas.DataFrame
        A table from one of the loaders (or built by hand).
    source : str, default="manifest"
        Name of the source (file or folder) used in error messages.
    on_error : {"raise", "skip"}, default="raise"
        ``"raise"`` stops at the first bad row with an error naming the participant,
        the file and the problem; ``"skip"`` drops the bad rows. The dropped rows (with
        their reasons, see :func:`find_manifest_problems`) are in
        ``result.attrs["skipped"]``.

    Returns
    -------
    pandas.DataFrame
        The usable rows with ``age`` as float and ``participant_id``, ``path``, ``sex``,
        ``site`` as strings; index reset.
    """
    check_choice("on_error", on_error, ON_ERROR_CHOICES)
    if not isinstance(manifest, pd.DataFrame):
        raise BrainAgeInputError(
            f"a manifest must be a pandas DataFrame; {type(manifest).__name__} was provided.",
            source,
        )
    _check_columns(manifest, source)
    problems = find_manifest_problems(manifest)
    if len(problems) and on_error == "raise":
        first = problems.iloc[0]
        where = first["path"] or source
        raise BrainAgeInputError(
            f"participant {first['participant_id']!r}: {first['reason']} "
            f"(in {source}; use on_error='skip' to skip such participants)",
            where,
        )
    keep = np.ones(len(manifest), dtype=bool)
    keep[problems["row"].to_numpy(dtype=int)] = False
    clean = manifest.loc[keep].reset_index(drop=True).copy()
    clean["participant_id"] = clean["participant_id"].astype(str)
    clean["path"] = clean["path"].astype(str)
    clean["age"] = pd.to_numeric(clean["age"]).astype(float)
    clean["sex"] = clean["sex"].map(normalise_sex).astype(object)
    clean["site"] = clean["site"].map(lambda s: "unknown" if pd.isna(s) else str(s))
    clean.attrs = {
        "metadata": dict(manifest.attrs.get("metadata", {})),
        "skipped": problems.drop(columns="row").reset_index(drop=True),
    }
    return clean


def normalise_sex(value: Any) -> str | None:
    """Map a sex code to ``"M"``/``"F"`` (None when missing or not recognised)."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return None
    return _SEX_CODES.get(str(value).strip().lower())


# -- helpers ------------------------------------------------------------------------------
def _check_columns(manifest: pd.DataFrame, source: str | os.PathLike) -> None:
    missing = [c for c in MANIFEST_COLUMNS if c not in manifest.columns]
    if missing:
        raise BrainAgeInputError(
            f"manifest is missing required column(s) {missing}; columns are "
            f"{list(manifest.columns)}",
            source,
        )


def to_manifest(table: pd.DataFrame) -> pd.DataFrame:
    table = table.copy()
    if "sex" not in table.columns:
        table["sex"] = None
    table["sex"] = table["sex"].map(normalise_sex).astype(object)
    extra = [c for c in table.columns if c not in MANIFEST_COLUMNS]
    return table[list(MANIFEST_COLUMNS) + extra].reset_index(drop=True)


def read_table(path: Path, sep: str) -> pd.DataFrame:
    try:
        return pd.read_csv(
            path,
            sep=sep,
            na_values=_NA_VALUES,
            keep_default_na=True,
            dtype={"participant_id": "string", "path": "string"},
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise BrainAgeInputError(f"cannot read the table: {err}", path) from err


def lower_known_columns(columns: pd.Index) -> dict[str, str]:
    known = {c: c for c in (*MANIFEST_COLUMNS, "session")}
    return {c: known[c.lower()] for c in columns if isinstance(c, str) and c.lower() in known}


def resolve_path(base: Path, path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else (base / p).resolve()
