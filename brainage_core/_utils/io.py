"""File I/O shared by the package: atomic output, and reading YAML settings files.

Every writer goes through :func:`atomic_path`: the content is written to a temporary file
in the destination folder and moved into place with :func:`os.replace`, which is atomic on
POSIX file systems. An interrupted run leaves either the old file or the new one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import pandas as pd
import yaml

from brainage_core._utils.validation import BrainAgeInputError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it onto ``path`` on success.

    The temporary file keeps the destination's suffixes (``.nii.gz``, ``.csv``) so that
    libraries which infer the format from the name write the right one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented JSON to ``path`` atomically."""
    text = json.dumps(data, indent=2, default=_json_default)
    return write_text(path, text + "\n")


def write_table(path: str | os.PathLike, table: pd.DataFrame, *, index: bool = False) -> Path:
    """Write a table atomically: tab-separated for ``.tsv``, comma-separated otherwise."""
    sep = "\t" if str(path).endswith(".tsv") else ","
    with atomic_path(path) as tmp:
        table.to_csv(tmp, sep=sep, index=index, na_rep="n/a" if sep == "\t" else "")
    return Path(path)


def save_nifti(img: nib.spatialimages.SpatialImage, path: str | os.PathLike) -> Path:
    """Save a NIfTI image atomically."""
    with atomic_path(path) as tmp:
        nib.save(img, tmp)
    return Path(path)


def read_yaml_mapping(path: str | os.PathLike, *, what: str) -> dict[str, Any]:
    """Read a YAML file that must hold a mapping (an empty file is an empty mapping).

    Parameters
    ----------
    path : str or os.PathLike
        The file.
    what : str
        What the mapping holds, for the error message (e.g. "config sections").

    Raises
    ------
    BrainAgeInputError
        The file is missing, is not valid YAML, or holds something else than a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise BrainAgeInputError("config file does not exist", path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise BrainAgeInputError(f"not valid YAML: {err}", path) from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise BrainAgeInputError(
            f"must hold a mapping of {what}; a {type(data).__name__} was found", path
        )
    return data


def _json_default(obj: Any) -> Any:
    """Make numpy scalars, arrays and paths JSON-serialisable."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serialisable")
