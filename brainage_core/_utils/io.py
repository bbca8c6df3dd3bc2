"""File I/O shared by the package: atomic output, and reading YAML settings files.

Every writer goes through :func:`atomic_path`: the content is written to a temporary file
in the destination folder and moved into place with :func:`os.replace`, which is atomic on
POSIX file systems. An interrupted run leaves either the old file or the new one, and at
worst a hidden temporary file (``.<name>.<random>.tmp<suffix>``) that
:func:`remove_temporary_files` recognises. Written files get the mode the user's umask
gives a new file (0644 under the usual umask 022), like their neighbours.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
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
        os.chmod(tmp_path, new_file_mode())  # mkstemp makes 0600; match the neighbours
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


#: Names of the temporary files of :func:`atomic_path`.
_TEMPORARY_NAME = re.compile(r"^\..+\.tmp(\.[A-Za-z0-9]+)*$")


def is_temporary_file(path: str | os.PathLike) -> bool:
    """True if ``path`` is named like a temporary file of :func:`atomic_path`."""
    return bool(_TEMPORARY_NAME.match(Path(path).name))


def remove_temporary_files(folder: str | os.PathLike) -> int:
    """Remove the temporary files an interrupted writer left under ``folder``.

    Returns
    -------
    int
        How many were removed.
    """
    removed = 0
    for path in Path(folder).rglob(".*.tmp*"):
        if path.is_file() and is_temporary_file(path):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def new_file_mode() -> int:
    """The mode ``open()`` gives a new file under the current umask (0o666 & ~umask)."""
    mask = None
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                mask = int(line.split()[1], 8)
    if mask is None:  # no /proc: read it by setting it (not thread-safe, but brief)
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


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
        The file is missing, is a folder, is not a readable text file, is not valid YAML,
        or holds something else than a mapping.
    """
    path = Path(path)
    if path.is_dir():
        raise BrainAgeInputError("this is a folder; a config file (YAML) was expected", path)
    if not path.is_file():
        raise BrainAgeInputError("config file does not exist", path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise BrainAgeInputError(
            f"not a text file (byte {err.start} is not UTF-8); a YAML config file was expected",
            path,
        ) from err
    except OSError as err:
        raise BrainAgeInputError(f"cannot read the config file: {err.strerror}", path) from err
    if "\x00" in text:
        raise BrainAgeInputError(
            "not a text file (it holds NUL bytes); a YAML config file was expected", path
        )
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise BrainAgeInputError(f"not valid YAML: {err}", path) from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise BrainAgeInputError(
            f"must hold a mapping of {what}; a {type(data).__name__} was found", path
        )
    return data


def check_output_folder(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Check that ``path`` is, or can become, a folder this process can write in.

    Parameters
    ----------
    path : str or os.PathLike
        The folder (it need not exist yet).
    what : str, default="output folder"
        How the error names it (e.g. "--run-dir").

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    BrainAgeInputError
        ``path`` or one of its parents is a file, or the nearest existing folder is not
        writable (read-only file system or permissions).
    """
    path = Path(path).expanduser()
    probe = path
    while not probe.exists():
        if probe.is_symlink():
            raise BrainAgeInputError(f"{what}: a broken symbolic link", probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        where = "is a file" if probe == path else f"cannot be created: {probe} is a file"
        raise BrainAgeInputError(f"{what} {where}, not a folder", path)
    if not os.access(probe, os.W_OK | os.X_OK):
        raise BrainAgeInputError(
            f"{what} is not writable: permission denied or read-only file system in {probe}",
            path,
        )
    return path


def _json_default(obj: Any) -> Any:
    """Make numpy scalars, arrays and paths JSON-serialisable."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serialisable")
