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
and report it (see :mod:`brainage_core.cache`).
"""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ._validation import BrainAgeInputError, check_choice

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
_T1W_PATTERNS = ("*_T1w.nii.gz", "*_T1w.nii")
_NA_VALUES = ["n/a", "N/A", "NA", "nan", "NaN", ""]


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
        a row in ``participants.tsv`` a missing ``age`` (and is listed in
        ``attrs["unlisted"]``): :func:`validate_manifest` reports both.
        ``manifest.attrs["metadata"]`` holds the source description
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
    participants = _read_table(tsv, sep="\t")
    if "participant_id" not in participants.columns:
        raise BrainAgeInputError(
            f"missing required column 'participant_id'; columns are {list(participants.columns)}",
            tsv,
        )
    participants = participants.rename(columns=_lower_known_columns(participants.columns))
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

    listed = set(participants["participant_id"].dropna())
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
    manifest = _to_manifest(participants)
    manifest.attrs["metadata"] = metadata
    manifest.attrs["unlisted"] = unlisted
    manifest.attrs["participants_file"] = str(tsv)
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


def load_csv(path: str | os.PathLike) -> pd.DataFrame:
    """Read a CSV (or ``.tsv``) manifest.

    Parameters
    ----------
    path : str or os.PathLike
        Table with at least ``participant_id``, ``path`` and ``age`` columns; ``sex``,
        ``site`` and any other column are kept. Relative image paths are resolved against
        the folder of the table.

    Returns
    -------
    pandas.DataFrame
        The manifest (see module docstring).
    """
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise BrainAgeInputError("manifest file does not exist", path)
    sep = "\t" if path.suffix.lower() == ".tsv" else ","
    table = _read_table(path, sep=sep)
    table = table.rename(columns=_lower_known_columns(table.columns))
    missing = [c for c in REQUIRED_CSV_COLUMNS if c not in table.columns]
    if missing:
        raise BrainAgeInputError(
            f"manifest is missing required column(s) {missing}; columns are {list(table.columns)}",
            path,
        )
    table["participant_id"] = table["participant_id"].astype("string")
    table["path"] = [
        "" if pd.isna(p) or str(p).strip() == "" else str(_resolve(path.parent, str(p)))
        for p in table["path"]
    ]
    if "site" not in table.columns:
        table["site"] = path.stem
    manifest = _to_manifest(table)
    manifest.attrs["metadata"] = {"source": "csv", "source_root": str(path)}
    return manifest


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
    manifest = _to_manifest(pd.DataFrame(rows))
    maps = list(bunch.gray_matter_maps)
    root = str(Path(maps[0]).resolve().parents[1]) if maps else ""
    manifest.attrs["metadata"] = {"source": "oasis", "source_root": root}
    return manifest


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
    ``age_range``, a duplicate participant (the later rows), a missing path and a path
    that does not exist.

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


def _to_manifest(table: pd.DataFrame) -> pd.DataFrame:
    table = table.copy()
    if "sex" not in table.columns:
        table["sex"] = None
    table["sex"] = table["sex"].map(normalise_sex).astype(object)
    extra = [c for c in table.columns if c not in MANIFEST_COLUMNS]
    return table[list(MANIFEST_COLUMNS) + extra].reset_index(drop=True)


def _read_table(path: Path, sep: str) -> pd.DataFrame:
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


def _lower_known_columns(columns: pd.Index) -> dict[str, str]:
    known = {c: c for c in (*MANIFEST_COLUMNS, "session")}
    return {c: known[c.lower()] for c in columns if isinstance(c, str) and c.lower() in known}


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


def _resolve(base: Path, path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else (base / p).resolve()
