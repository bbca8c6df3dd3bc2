"""Data source: a BIDS folder with ``participants.tsv``, indexed with pybids.

Which images enter the study
----------------------------
pybids indexes the anatomical folders (``sub-*/[ses-*/]anat/``) of the dataset; every
``*_T1w.nii[.gz]`` there is a candidate, with its ``subject``, ``session`` and ``run``
entities. Two settings (the config's ``data.bids`` section) choose among them:

``session`` (default ``"first"``)
    ``"first"`` or ``"last"``: one session per subject, the first or last in the order of
    the session labels (natural order: ``ses-2`` before ``ses-10``); ``"all"``: every
    session, as separate rows keyed by subject and session; any other value is a session
    label (``"baseline"`` or ``"ses-baseline"``): only that session, and a subject without
    it is reported as having no image.
``run`` (default ``"first"``)
    The same choice among the runs of one session: ``"first"``, ``"last"`` (by run
    index), ``"all"`` (separate rows keyed by subject, session and run) or a run index.

Images that differ in other entities (``acq-``, ``rec-``, ``ce-``) within one subject,
session and run are ordered by file name and the first is used. With several rows per
subject, the train/validation/test split is drawn per subject
(:func:`brainage_core.data.splits.make_splits` with ``groups``), so that no subject's
sessions straddle train and test.

Ages
----
The age of each row is the session's age from ``sub-<label>/sub-<label>_sessions.tsv``
when that file has an ``age`` column and lists the session (longitudinal datasets record
age per session), otherwise the subject's age from ``participants.tsv``. The column
``age_source`` says which.

Indexing cost and its bound
---------------------------
pybids indexes only the anatomical folders (everything else is ignored) and no JSON
sidecars; with ``database_dir`` the index is written to a SQLite file named by a
fingerprint of the dataset's anatomical files (names, sizes and modification times) and
reused while the dataset is unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from brainage_core._utils.validation import BrainAgeInputError
from brainage_core.data.manifest import lower_known_columns, read_table, to_manifest
from brainage_core.data.sources.base import DataSource, SourceRequest

#: Selection rules of ``data.bids.session`` and ``data.bids.run`` besides a label.
SELECTION_RULES = ("first", "last", "all")

#: Image file extensions that count as a T1w image.
T1W_EXTENSIONS = (".nii.gz", ".nii")

#: pybids ignore pattern: everything but the subject and anatomical folders (and the
#: per-subject sessions.tsv). Paths are relative to the dataset root, starting with "/".
ANAT_ONLY = re.compile(
    r"^/(?!sub-[^/]+/?$|sub-[^/]+/ses-[^/]+/?$|sub-[^/]+/(ses-[^/]+/)?anat(/|$)"
    r"|sub-[^/]+/sub-[^/]+_sessions\.tsv$)"
)

#: Folder of the reusable pybids index databases, under ``data.cache_dir``.
BIDS_INDEX_DIR = "bids_index"

#: File name of pybids' index database inside its folder.
DATABASE_FILE = "layout_index.sqlite"

#: Seconds the BIDS validator command may run.
VALIDATOR_TIMEOUT = 300.0


@dataclass(frozen=True)
class BidsSelection:
    """The ``data.bids`` section: which sessions and runs of a BIDS folder enter the study.

    Attributes
    ----------
    session : str, default="first"
        ``"first"``, ``"last"``, ``"all"`` or a session label (see the module docstring).
    run : str, default="first"
        ``"first"``, ``"last"``, ``"all"`` or a run index.
    """

    session: str = "first"
    run: str = "first"

    def __post_init__(self) -> None:
        object.__setattr__(self, "session", check_selection("data.bids.session", self.session))
        object.__setattr__(self, "run", check_selection("data.bids.run", self.run))

    @classmethod
    def from_dict(cls, section: Mapping[str, Any] | None) -> BidsSelection:
        """Build from the config's ``data.bids`` mapping (unknown keys are an error)."""
        section = dict(section or {})
        unknown = sorted(set(section) - {"session", "run"})
        if unknown:
            raise BrainAgeInputError(
                f"unknown key(s) in config section 'data.bids': {unknown}; it has "
                "['session', 'run']"
            )
        return cls(**{k: v for k, v in section.items() if v is not None})

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def check_selection(name: str, value: Any) -> str:
    """Validate a ``data.bids`` selection rule: "first", "last", "all" or a label.

    Returns
    -------
    str
        The rule, or the bare label (without its ``ses-``/``run-`` prefix).
    """
    if isinstance(value, bool) or value is None or not isinstance(value, (str, int)):
        raise BrainAgeInputError(
            f"'{name}' must be one of {list(SELECTION_RULES)} or a label; {value!r} was provided."
        )
    text = str(value).strip()
    if text in SELECTION_RULES:
        return text
    prefix = "ses-" if name.endswith("session") else "run-"
    label = text[len(prefix):] if text.startswith(prefix) else text
    if not label or not re.fullmatch(r"[A-Za-z0-9]+", label):
        raise BrainAgeInputError(
            f"'{name}' must be one of {list(SELECTION_RULES)} or an alphanumeric BIDS label; "
            f"{value!r} was provided."
        )
    return label


# -- the manifest -------------------------------------------------------------------------
def load_bids(
    root: str | os.PathLike,
    *,
    session: str = "first",
    run: str = "first",
    database_dir: str | os.PathLike | None = None,
    validate: bool = False,
    require_age: bool = True,
) -> pd.DataFrame:
    """Build the manifest of a BIDS folder, indexed with pybids.

    Parameters
    ----------
    root : str or os.PathLike
        Dataset folder holding ``participants.tsv`` and ``sub-*/[ses-*/]anat/*_T1w.nii[.gz]``.
    session, run : str, default="first"
        Which sessions and runs enter the study: ``"first"``, ``"last"``, ``"all"`` or a
        label (see the module docstring).
    database_dir : str or os.PathLike or None, default=None
        Folder where the pybids index is kept and reused while the dataset is unchanged.
    validate : bool, default=False
        Run the BIDS validator (when installed) and put its summary in
        ``manifest.attrs["metadata"]["bids_validation"]``.
    require_age : bool, default=True
        Whether ``participants.tsv`` must have an ``age`` column; without it (``predict``
        on subjects of unknown age) every age is missing.

    Returns
    -------
    pandas.DataFrame
        The manifest (see :mod:`brainage_core.data.manifest`), one row per chosen image and one per
        participant of ``participants.tsv`` without any image (empty ``path``). Rows
        carry ``session`` (with ``age_source``: "sessions.tsv" or "participants.tsv")
        and ``run`` when the dataset has them. An image of a subject missing from
        ``participants.tsv`` gets a missing ``age`` (the subject is listed in
        ``attrs["unlisted"]``): :func:`validate_manifest` reports both.
        ``manifest.attrs["metadata"]`` holds the source description (``source``,
        ``source_root``, ``bids_selection``, and ``oracle_mae`` for a synthetic cohort).
        Without a ``site`` column, the site is the dataset's ``Name``
        (dataset_description.json) or else the folder's name.
    """
    session = check_selection("data.bids.session", session)
    run = check_selection("data.bids.run", run)
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
    if "age" not in participants.columns and not require_age:
        participants["age"] = float("nan")
    if "age" not in participants.columns:
        raise BrainAgeInputError(
            f"missing required column 'age'; columns are {list(participants.columns)}", tsv
        )
    participants["participant_id"] = participants["participant_id"].map(_bids_label)
    participants = participants.drop(columns=["session", "run", "path"], errors="ignore")

    images = select_images(index_t1w(root, database_dir=database_dir), session=session, run=run)
    listed = set(participants["participant_id"].dropna())
    unlisted = sorted(set(images["participant_id"]) - listed)
    without_image = sorted(listed - set(images["participant_id"]))
    rows = pd.concat(
        [images, pd.DataFrame({"participant_id": without_image, "path": ""})], ignore_index=True
    )
    table = rows.merge(participants, on="participant_id", how="left", sort=False)
    table["path"] = table["path"].fillna("")
    # per-session ages (longitudinal datasets) override the participant's age
    table["age_source"] = "participants.tsv"
    for pid in table.loc[table["session"].notna(), "participant_id"].unique():
        ages = read_sessions_ages(root, str(pid))
        if not ages:
            continue
        rows_of = (table["participant_id"] == pid) & table["session"].isin(list(ages))
        table.loc[rows_of, "age"] = table.loc[rows_of, "session"].map(ages)
        table.loc[rows_of, "age_source"] = "sessions.tsv"
    table.loc[table["path"] == "", "age_source"] = None
    if table["session"].isna().all():  # cross-sectional: no session, every age from
        table = table.drop(columns=["session", "age_source"])  # participants.tsv
    if table["run"].isna().all():
        table = table.drop(columns="run")
    metadata = bids_metadata(root)
    metadata["bids_selection"] = {"session": session, "run": run}
    if validate:
        metadata["bids_validation"] = validate_bids(root)
    if "site" not in table.columns:  # one site: the dataset's name
        table["site"] = metadata.get("dataset_name") or root.name
    manifest = to_manifest(table)
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


# -- pybids index ---------------------------------------------------------------------------
def index_t1w(
    root: str | os.PathLike, *, database_dir: str | os.PathLike | None = None
) -> pd.DataFrame:
    """Every T1w image of a BIDS folder, with its entities, through pybids.

    Parameters
    ----------
    root : str or os.PathLike
        The dataset folder.
    database_dir : str or os.PathLike or None, default=None
        Folder of reusable pybids index databases (one per dataset state); None indexes
        in memory every time.

    Returns
    -------
    pandas.DataFrame
        Columns ``participant_id`` (``sub-<label>``), ``session`` (``ses-<label>`` or
        None), ``run`` (int or None) and ``path``; sorted by subject, session, run and
        file name.
    """
    from bids import BIDSLayout
    from bids.layout import BIDSLayoutIndexer

    root = Path(root).expanduser().resolve()
    database = partial = None
    if database_dir is not None:
        database = Path(database_dir).expanduser().resolve() / _fingerprint(root)
    if database is not None and (database / DATABASE_FILE).is_file():
        layout = BIDSLayout(root, validate=False, database_path=database)
    else:
        indexer = BIDSLayoutIndexer(
            validate=False,
            ignore=[ANAT_ONLY, "derivatives", "sourcedata", "code"],
            index_metadata=False,
        )
        # written next to its final place and moved there complete, so that an
        # interrupted indexing is never reused
        if database is not None:
            partial = database.with_name(f"{database.name}.partial-{os.getpid()}")
            shutil.rmtree(partial, ignore_errors=True)
        try:
            layout = BIDSLayout(root, validate=False, indexer=indexer,
                                **({"database_path": partial} if partial else {}))
        except Exception as err:  # pybids raises several types for a broken folder
            raise BrainAgeInputError(f"pybids could not index this folder: {err}", root) from err
    rows = _t1w_rows(layout)
    if database is not None and partial is not None:
        database.parent.mkdir(parents=True, exist_ok=True)
        del layout  # closes the database before it moves
        try:
            os.replace(partial, database)
        except OSError:  # another process published the same index first
            shutil.rmtree(partial, ignore_errors=True)
    table = pd.DataFrame(rows, columns=["participant_id", "session", "run", "path"])
    if len(table):
        table["_ses"] = table["session"].map(_natural_key)
        table["_run"] = table["run"].map(lambda r: -1 if r is None or pd.isna(r) else int(r))
        table["_sub"] = table["participant_id"].map(_natural_key)
        table = table.sort_values(["_sub", "_ses", "_run", "path"]).drop(
            columns=["_ses", "_run", "_sub"]
        )
    table["run"] = table["run"].astype("Int64")
    return table.reset_index(drop=True)


def _t1w_rows(layout: Any) -> list[dict[str, Any]]:
    rows = []
    # file names, then their entities parsed from the name: one query, not one per file
    for path in layout.get(suffix="T1w", extension=list(T1W_EXTENSIONS),
                           return_type="filename"):
        ent = layout.parse_file_entities(path)
        run = ent.get("run")
        rows.append(
            {
                "participant_id": f"sub-{ent['subject']}",
                "session": f"ses-{ent['session']}" if ent.get("session") else None,
                "run": int(run) if run is not None else None,
                "path": str(Path(path).resolve()),
            }
        )
    return rows


def select_images(
    images: pd.DataFrame, *, session: str = "first", run: str = "first"
) -> pd.DataFrame:
    """Apply the session and run rules (see the module docstring) to :func:`index_t1w`'s table.

    Returns
    -------
    pandas.DataFrame
        The chosen images, one row per subject (or per subject and session / run with
        ``"all"``).
    """
    session = check_selection("data.bids.session", session)
    run = check_selection("data.bids.run", run)
    # One image per (subject, session, run): the first by file name (other entities).
    images = images.drop_duplicates(["participant_id", "session", "run"], keep="first")
    images = _choose(images, ["participant_id"], "session", session,
                     lambda v: None if v is None else f"ses-{v}")
    images = _choose(images, ["participant_id", "session"], "run", run,
                     lambda v: int(v) if str(v).isdigit() else v)
    return images.reset_index(drop=True)


def _choose(table: pd.DataFrame, by: list[str], column: str, rule: str, as_value) -> pd.DataFrame:
    if rule == "all" or table.empty:
        return table
    if rule in ("first", "last"):
        # table is sorted; the key of the level is its first or last value per group
        keys = table.groupby(by, dropna=False, sort=False)[column]
        pick = keys.transform("first" if rule == "first" else "last")
        both_na = table[column].isna() & pick.isna()
        return table[(table[column] == pick).fillna(False) | both_na]
    value = as_value(rule)
    return table[table[column].astype(object) == value]


def read_sessions_ages(root: Path, participant_id: str) -> dict[str, float]:
    """Ages by session from ``sub-X/sub-X_sessions.tsv`` (empty when absent or without age)."""
    path = root / participant_id / f"{participant_id}_sessions.tsv"
    if not path.is_file():
        return {}
    table = read_table(path, sep="\t")
    if "session_id" not in table.columns:
        raise BrainAgeInputError(
            f"missing required column 'session_id'; columns are {list(table.columns)}", path
        )
    ages = {c.lower(): c for c in table.columns}
    if "age" not in ages:
        return {}
    out: dict[str, float] = {}
    for ses, age in zip(table["session_id"], table[ages["age"]], strict=True):
        if pd.isna(ses):
            continue
        label = str(ses).strip()
        label = label if label.startswith("ses-") else f"ses-{label}"
        value = pd.to_numeric(pd.Series([age]), errors="coerce").iloc[0]
        if pd.isna(age):
            continue
        if pd.isna(value):
            raise BrainAgeInputError(f"non-numeric age {age!r} for session {label!r}", path)
        out[label] = float(value)
    return out


def validate_bids(root: str | os.PathLike, *, timeout: float = VALIDATOR_TIMEOUT) -> dict[str, Any]:
    """Run a BIDS validator when one is installed and summarise its findings.

    The ``bids-validator`` command (the reference validator, from npm or deno) is used
    when it is on the PATH; otherwise the Python ``bids_validator`` package (installed
    with pybids), which checks every file name against the BIDS schema. Neither is
    required: without both the summary says so. Findings never stop the study.

    Returns
    -------
    dict
        ``tool`` (what ran, or None), ``n_errors``, ``n_warnings`` and ``issues`` (up to
        10 short descriptions).
    """
    root = Path(root).expanduser().resolve()
    command = shutil.which("bids-validator")
    if command:
        return _run_validator_command(command, root, timeout)
    try:
        from bids_validator import BIDSValidator
    except ImportError:
        return {"tool": None, "n_errors": 0, "n_warnings": 0,
                "issues": ["no BIDS validator installed (pip install bids-validator)"]}
    validator = BIDSValidator()
    bad = []
    for path in sorted(root.rglob("*")):
        rel = "/" + path.relative_to(root).as_posix()
        if path.is_dir() or rel.split("/")[1] in ("derivatives", "sourcedata", "code"):
            continue
        if rel.split("/")[-1].startswith("."):
            continue
        if not validator.is_bids(rel):
            bad.append(rel)
    from importlib import metadata

    return {
        "tool": f"bids_validator {metadata.version('bids-validator')} (file names only)",
        "n_errors": len(bad),
        "n_warnings": 0,
        "issues": [f"not a BIDS file name: {p}" for p in bad[:10]],
    }


def _run_validator_command(command: str, root: Path, timeout: float) -> dict[str, Any]:
    try:
        proc = subprocess.run([command, "--json", str(root)], capture_output=True, text=True,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"tool": command, "n_errors": 0, "n_warnings": 0,
                "issues": [f"the validator did not finish within {timeout:.0f} s"]}
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
        return {"tool": command, "n_errors": 0, "n_warnings": 0,
                "issues": [f"unreadable validator output (exit {proc.returncode}): {tail[0]}"]}
    issues = report.get("issues", {})
    if isinstance(issues, dict) and "issues" in issues:  # the schema validator's layout
        items = issues["issues"]
        errors = [i for i in items if i.get("severity") == "error"]
        warnings = [i for i in items if i.get("severity") == "warning"]
        text = [f"{i.get('severity')}: {i.get('code')} {i.get('location', '')}".strip()
                for i in errors + warnings]
    else:  # the legacy validator's layout
        errors, warnings = issues.get("errors", []), issues.get("warnings", [])
        text = [f"error: {i.get('key')} ({len(i.get('files', []))} files)" for i in errors]
        text += [f"warning: {i.get('key')} ({len(i.get('files', []))} files)" for i in warnings]
    return {"tool": command, "n_errors": len(errors), "n_warnings": len(warnings),
            "issues": text[:10]}


def _fingerprint(root: Path) -> str:
    """Hash of the dataset's anatomical files (name, size, mtime) and its root path."""
    h = hashlib.sha256(str(root).encode())
    for pattern in ("sub-*/anat/*", "sub-*/ses-*/anat/*", "sub-*/*_sessions.tsv"):
        for path in sorted(root.glob(pattern)):
            st = path.stat()
            h.update(f"{path.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def _natural_key(value: Any) -> tuple:
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return ()
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t)
                 for t in re.split(r"(\d+)", str(value)) if t)


def _bids_label(value: Any) -> Any:
    if pd.isna(value):
        return value
    value = str(value).strip()
    return value if value.startswith("sub-") else f"sub-{value}"


def _manifest(request: SourceRequest) -> pd.DataFrame:
    selection = BidsSelection.from_dict(request.bids)
    return load_bids(request.path, session=selection.session, run=selection.run,
                     database_dir=request.cache_dir / BIDS_INDEX_DIR)


SOURCE = DataSource(
    name="bids",
    description="a BIDS folder with participants.tsv (data.path: its root; data.bids: which "
                "sessions and runs)",
    needs_path=True,
    manifest=_manifest,
)
