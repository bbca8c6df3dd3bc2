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

#: Plausible ages in years (inclusive); an age outside is reported as a bad participant.
#: Change it with ``age_range=`` (``--age-range`` on the command line, ``data.age_range``
#: in a study config), e.g. for ages recorded in months.
AGE_RANGE = (0.0, 120.0)

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
def skip_hint() -> str:
    """How to skip bad participants instead of stopping (ends every such error).

    The command line rewrites it into its own spelling (``--on-error skip``,
    ``-p data.on_error skip``), see :mod:`brainage_core.cli`.
    """
    return "use on_error='skip' to skip such participants"


def find_manifest_problems(
    manifest: pd.DataFrame, *, age_range: tuple[float, float] | list[float] = AGE_RANGE
) -> pd.DataFrame:
    """List the rows of a manifest that cannot be used, with the reason.

    Checks, per row: a missing participant id, a participant of a BIDS folder not
    listed in its ``participants.tsv``, a missing or non-numeric age, an age outside
    ``age_range``, a duplicate participant (the later rows; with ``session``/``run``
    columns, a duplicate subject, session and run), a missing path and a path that does
    not exist.

    Parameters
    ----------
    manifest : pandas.DataFrame
        The manifest.
    age_range : (float, float), default=(0, 120)
        Plausible ages in years, bounds included.

    Returns
    -------
    pandas.DataFrame
        Columns ``row`` (position in ``manifest``), ``participant_id``, ``path`` and
        ``reason``; empty when every row is usable.
    """
    _check_columns(manifest, "manifest")
    low, high = check_age_range(age_range)
    unlisted = set(manifest.attrs.get("unlisted", ()))
    listing = manifest.attrs.get("participants_file", "participants.tsv")
    problems = []
    seen: set[str] = set()
    labels = image_labels(manifest)
    for row, rec in enumerate(manifest.itertuples(index=False)):
        pid = rec.participant_id
        path = rec.path
        reason = None
        if pd.isna(pid) or str(pid).strip() == "":
            reason = "missing participant_id"
        elif labels[row] in seen:
            reason = (f"duplicate participant {pid!r}" if labels[row] == str(pid)
                      else f"duplicate image {labels[row]!r}")
        else:
            age = pd.to_numeric(pd.Series([rec.age]), errors="coerce").iloc[0]
            if pd.isna(rec.age) and str(pid) in unlisted:
                reason = f"has an image but is not listed in {listing}, so it has no age"
            elif pd.isna(rec.age):
                reason = "missing age"
            elif pd.isna(age):
                reason = f"non-numeric age {rec.age!r}"
            elif not np.isfinite(age) or not low <= age <= high:
                reason = (
                    f"age {_num(age)} is outside the plausible range [{_num(low)}, "
                    f"{_num(high)}] years, set by age_range=(low, high)"
                )
            elif pd.isna(path) or str(path) == "":
                reason = "no image path (no T1w image found)"
            elif not Path(str(path)).is_file():
                reason = "image file does not exist"
        if not (pd.isna(pid) or str(pid).strip() == ""):
            seen.add(labels[row])
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
    manifest: pd.DataFrame,
    source: str = "manifest",
    *,
    on_error: str = "raise",
    age_range: tuple[float, float] | list[float] = AGE_RANGE,
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
    age_range : (float, float), default=(0, 120)
        Plausible ages in years, bounds included (see :data:`AGE_RANGE`).

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
    problems = find_manifest_problems(manifest, age_range=age_range)
    if len(problems) and on_error == "raise":
        first = problems.iloc[0]
        where = first["path"] or source
        raise BrainAgeInputError(
            f"participant {first['participant_id']!r}: {first['reason']} "
            f"(in {source}; {skip_hint()})",
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


def image_labels(table: pd.DataFrame) -> list[str]:
    """The key of each row: ``sub-<label>[_ses-<label>][_run-<index>]``.

    The participant id alone when the table has no ``session`` and ``run`` columns (or
    they are empty), so that cross-sectional cohorts keep their participant ids as keys.
    Used for per-image file names (maps) and the uniqueness check.
    """
    ids = ["" if pd.isna(p) else str(p) for p in table["participant_id"]]
    for column in ("session", "run"):
        if column not in table.columns:
            continue
        prefix = "ses-" if column == "session" else "run-"
        ids = [
            key if pd.isna(v) or str(v) == "" else
            f"{key}_{v if str(v).startswith(prefix) else prefix + str(v)}"
            for key, v in zip(ids, table[column], strict=True)
        ]
    return ids


def normalise_sex(value: Any) -> str | None:
    """Map a sex code to ``"M"``/``"F"`` (None when missing or not recognised)."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return None
    return _SEX_CODES.get(str(value).strip().lower())


def check_age_range(age_range: Any, name: str = "age_range") -> tuple[float, float]:
    """Return ``age_range`` as ``(low, high)`` floats, or raise naming ``name``."""
    ok = (
        isinstance(age_range, (list, tuple))
        and len(age_range) == 2
        and all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in age_range)
        and all(np.isfinite(a) for a in age_range)
        and age_range[0] < age_range[1]
    )
    if not ok:
        raise BrainAgeInputError(
            f"'{name}' must be two finite numbers (low, high) with low < high; "
            f"{age_range!r} was provided."
        )
    return float(age_range[0]), float(age_range[1])


# -- helpers ------------------------------------------------------------------------------
def _num(x: float) -> str:
    return f"{x:g}"


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
    known = {c: c for c in (*MANIFEST_COLUMNS, "session", "run")}
    return {c: known[c.lower()] for c in columns if isinstance(c, str) and c.lower() in known}


def resolve_path(base: Path, path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else (base / p).resolve()
