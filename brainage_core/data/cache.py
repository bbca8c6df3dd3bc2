"""The prepared cohort: preprocessed images in an on-disk array cache.

:func:`prepare_cohort` runs every image of a manifest through
:func:`~brainage_core.data.preprocess.preprocess_image` and streams the results into a float16
memory map, one subject at a time, so a cohort never has to fit in RAM (10,000 subjects
at 2 mm are about 13 GB on disk and a few hundred MB of RAM). Worker processes compute
the arrays; the main process alone writes the map.

Layout of ``cache_dir``::

    <key>/                  a complete cache (published atomically, never modified)
        images.npy          float16 array (N, X, Y, Z), opened as a read-only memmap
        table.tsv           participants in cache order + split (train/val/test)
        skipped.tsv         participants left out (on_error="skip") with the reason
        mask.npy            brain mask of the grid (bool)
        metadata.json       format version, key, grid, affine, parameters, source
    <key>.partial/          work in progress: images.npy, done.tsv, partial.json,
                            compact.json (resumable)
    <key>.lock              serialises concurrent preparations of the same key; records
                            its holder (see :mod:`brainage_core._utils.locks`)

``key`` is a hash of the manifest's contents (every column, plus the size and
modification time of each image file), the parameters and :data:`CACHE_FORMAT_VERSION`.
The work happens in ``<key>.partial/`` and is moved to ``<key>/`` by :func:`os.replace`
only once complete, so an interrupted preparation leaves nothing a later run trusts; a
later run with the same inputs resumes from the subjects recorded in ``done.tsv``.

Each kept image is written once, into its final row of ``<key>.partial/images.npy``
(the number of kept images before it), so a skipped subject (``on_error="skip"``) costs
no rewrite of the array (about 100 GB for 10,000 subjects at 1 mm): the publication
only truncates the file to the kept rows (:func:`set_row_count`). An unfinished
preparation left by an earlier version (one slot per manifest row) is finished as it
was started and its kept rows are moved up in place (:func:`compact_in_place`,
resumable through ``compact.json``).

Reliability: a killed preparation (SIGKILL included) leaves no worker behind and no lock
that blocks the next one (:mod:`brainage_core._utils.workers`, :mod:`brainage_core._utils.locks`);
the next run resumes and publishes a cache identical to an uninterrupted one. Files left
half-written by the kill (temporary files) are removed and a cut compaction resumes
before anything is published; an unfinished ``.partial`` of the same source and grid
whose inputs have changed since (a fixed image, an edited table) is removed with a notice.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import io
import json
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from brainage_core._utils.io import write_json, write_table
from brainage_core._utils.locks import LockBusy, file_lock
from brainage_core._utils.validation import BrainAgeInputError, check_choice, check_positive
from brainage_core._utils.workers import process_pool
from brainage_core.data.manifest import AGE_RANGE, ON_ERROR_CHOICES, skip_hint, validate_manifest
from brainage_core.data.preprocess import preprocess_image, preprocessing_description
from brainage_core.data.qc import intensity_percentiles, preprocess_with_qc
from brainage_core.data.splits import SPLITS, check_split_fractions, make_splits
from brainage_core.data.template import SUPPORTED_RESOLUTIONS, Template, load_template

#: Bump when the layout or the preprocessing changes: old caches are then not reused.
CACHE_FORMAT_VERSION = 1

#: Below this many images to compute, work in-process (starting workers costs seconds).
MIN_IMAGES_FOR_WORKERS = 8

#: Flush the memmap and the done-record after this many images.
FLUSH_EVERY = 32

_SKIPPED_COLUMNS = ["participant_id", "path", "reason"]

#: Files of an unfinished ``<key>.partial/`` that a resumed preparation keeps; anything
#: else there was left half-written by an interruption and is removed.
_PARTIAL_FILES = ("images.npy", "done.tsv", "partial.json", "qc.jsonl", "compact.json")

#: The QC measures of the prepared images (``prepare_cohort(qc=True)``), one JSON line each:
#: ``path``, ``measures`` (:func:`~brainage_core.data.qc.preprocess_with_qc`) and
#: ``profile`` (:func:`~brainage_core.data.qc.intensity_percentiles`).
QC_MEASURES = "qc_measures.jsonl"

#: Progress record of the in-place compaction of ``images.npy`` (skipped subjects).
_COMPACT = "compact.json"

#: Most images moved between two progress records of the compaction.
COMPACT_BATCH = 64

#: The file a finished shard of a sharded preparation writes last.
_SHARD_DONE = "complete.json"

__all__ = [
    "CACHE_FORMAT_VERSION",
    "ImageFileWriter",
    "PreparedCohort",
    "cache_key",
    "compact_in_place",
    "file_lock",
    "prepare_cohort",
    "prepare_shard",
    "set_row_count",
    "shard_folder",
]


class PreparedCohort:
    """A complete, read-only prepared cohort (see the module docstring for the layout).

    Use :meth:`open` on a cache folder, or get one from :func:`prepare_cohort` /
    :func:`brainage_core.data.cohort.load_cohort`.

    Attributes
    ----------
    root : pathlib.Path
        The cache folder.
    table : pandas.DataFrame
        One row per image, in cache order: ``participant_id``, ``path``, ``age``, ``sex``,
        ``site``, any extra manifest column (gap, group, ...) and ``split``.
    images : numpy.memmap
        Read-only float16 array of shape ``(N, X, Y, Z)``.
    mask : numpy.ndarray of bool
        Brain mask on the grid.
    affine : numpy.ndarray of shape (4, 4)
        Voxel-to-MNI affine of the grid.
    resolution : int
        Grid spacing in mm.
    metadata : dict
        Everything in ``metadata.json``; for a synthetic source it holds
        ``source_root`` (the dataset folder) and ``oracle_mae``.
    """

    def __init__(
        self,
        root: Path,
        table: pd.DataFrame,
        images: np.ndarray,
        mask: np.ndarray,
        metadata: dict[str, Any],
    ) -> None:
        self.root = root
        self.table = table
        self.images = images
        self.mask = mask
        self.metadata = metadata
        self.affine = np.asarray(metadata["affine"], dtype=float)
        self.resolution = int(metadata["resolution"])
        self._template: Template | None = None

    def __repr__(self) -> str:
        counts = self.table["split"].value_counts().to_dict()
        return (
            f"PreparedCohort({str(self.root)!r}, n={len(self)}, grid={self.shape}, "
            f"resolution={self.resolution} mm, splits={counts})"
        )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        """Grid shape ``(X, Y, Z)``."""
        return tuple(int(s) for s in self.images.shape[1:])  # type: ignore[return-value]

    @property
    def template(self) -> Template:
        """The template on the cohort's grid."""
        if self._template is None:
            self._template = load_template(self.resolution)
        return self._template

    @property
    def skipped(self) -> pd.DataFrame:
        """Participants left out of the cache, with the reason (may be empty)."""
        return _read_tsv(self.root / "skipped.tsv", _SKIPPED_COLUMNS)

    def qc_measures(self) -> dict[str, dict[str, Any]]:
        """The QC measures taken while the images were prepared, by image path.

        Every image of the manifest that was read (kept or left out by QC) has one,
        ``{"measures": {...}, "profile": [...]}``; empty when the cache was prepared
        without ``qc`` (:func:`prepare_cohort`).
        """
        path = self.root / QC_MEASURES
        if not path.is_file():
            return {}
        out: dict[str, dict[str, Any]] = {}
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                rec = json.loads(line)
                out[rec.pop("path")] = rec
        return out

    def image(self, index: int) -> np.ndarray:
        """Return image ``index`` (cache order) as a float32 array ``(X, Y, Z)``."""
        return np.asarray(self.images[index], dtype=np.float32)

    def indices(self, split: str) -> np.ndarray:
        """Cache positions of the participants in ``split`` ("train", "val" or "test")."""
        check_choice("split", split, SPLITS)
        return np.flatnonzero(self.table["split"].to_numpy() == split)

    def mean_image(self, split: str | None = None) -> np.ndarray:
        """Mean image of a split (or of the whole cohort), streamed one image at a time.

        Returns
        -------
        numpy.ndarray of float32
            Array of shape :attr:`shape`.
        """
        indices = np.arange(len(self)) if split is None else self.indices(split)
        total = np.zeros(self.shape, dtype=np.float64)
        for i in indices:
            total += self.images[i]
        return (total / max(len(indices), 1)).astype(np.float32)

    def to_image(self, data: np.ndarray) -> nib.Nifti1Image:
        """Wrap an array on the cohort's grid into a NIfTI image (MNI affine)."""
        img = nib.Nifti1Image(np.asarray(data), self.affine)
        img.header.set_xyzt_units("mm")
        img.set_qform(self.affine, code=4)
        img.set_sform(self.affine, code=4)
        return img

    @classmethod
    def open(cls, root: str | os.PathLike) -> PreparedCohort:
        """Open a complete cache folder, checking that it is whole and current.

        Parameters
        ----------
        root : str or os.PathLike
            A ``<key>/`` folder written by :func:`prepare_cohort`.

        Raises
        ------
        BrainAgeInputError
            Naming the folder when it is missing, unfinished (``.partial``), of another
            format version, or when its files disagree with each other.
        """
        root = Path(root).expanduser().resolve()
        if root.name.endswith(".partial"):
            raise BrainAgeInputError(
                "this is an unfinished cache (an interrupted prepare); run the preparation "
                "again to resume it",
                root,
            )
        if not root.is_dir():
            raise BrainAgeInputError("prepared cohort folder does not exist", root)
        meta_path = root / "metadata.json"
        if not meta_path.is_file():
            raise BrainAgeInputError("not a prepared cohort: no metadata.json", root)
        try:
            metadata = json.loads(meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise BrainAgeInputError(f"not valid JSON: {err}", meta_path) from err
        version = metadata.get("format_version")
        if version != CACHE_FORMAT_VERSION:
            raise BrainAgeInputError(
                f"cache format version {version!r}; this code reads version "
                f"{CACHE_FORMAT_VERSION}. Prepare the cohort again.",
                root,
            )
        for name in ("images.npy", "table.tsv", "mask.npy"):
            if not (root / name).is_file():
                raise BrainAgeInputError(f"incomplete prepared cohort: {name} is missing", root)
        try:
            images = np.load(root / "images.npy", mmap_mode="r")
        except (ValueError, OSError) as err:
            raise BrainAgeInputError(f"cannot read images.npy: {err}", root) from err
        shape = tuple(metadata["shape"])
        n = int(metadata["n_subjects"])
        if images.shape != (n, *shape) or images.dtype != np.float16:
            raise BrainAgeInputError(
                f"images.npy holds {images.dtype} {images.shape}; metadata.json says float16 "
                f"{(n, *shape)}",
                root,
            )
        table = _read_tsv(root / "table.tsv")
        if len(table) != n or "split" not in table.columns:
            raise BrainAgeInputError(
                f"table.tsv has {len(table)} rows (split column: "
                f"{'split' in table.columns}); expected {n} rows with a split",
                root,
            )
        mask = np.load(root / "mask.npy")
        if mask.shape != shape:
            raise BrainAgeInputError(f"mask.npy has shape {mask.shape}; expected {shape}", root)
        return cls(root, table, images, mask.astype(bool), metadata)


# -- preparation --------------------------------------------------------------------------
def prepare_cohort(
    manifest: pd.DataFrame,
    cache_dir: str | os.PathLike,
    *,
    resolution: int = 2,
    on_error: str = "raise",
    split_fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    n_jobs: int = 2,
    progress: bool = True,
    metadata: dict[str, Any] | None = None,
    age_range: Sequence[float] = AGE_RANGE,
    wait: bool | None = None,
    register: bool = False,
    qc: bool = False,
    reuse: PreparedCohort | None = None,
) -> PreparedCohort:
    """Preprocess every image of a manifest into an on-disk cache (or reuse it).

    Parameters
    ----------
    manifest : pandas.DataFrame
        From :mod:`brainage_core.data.manifest` (``load_bids``, ``load_csv``, ``fetch_oasis``).
    cache_dir : str or os.PathLike
        Folder holding the caches; created if needed.
    resolution : int, default=2
        Grid spacing in mm (one of :data:`~brainage_core.data.template.SUPPORTED_RESOLUTIONS`).
    on_error : {"raise", "skip"}, default="raise"
        What to do with a bad participant (bad manifest row or bad image): stop with an
        error naming the participant, the file and the problem, or leave it out and list
        it, with the reason, in ``skipped.tsv`` (:attr:`PreparedCohort.skipped`).
    split_fractions : sequence of float, default=(0.7, 0.15, 0.15)
        Train, validation and test fractions of the age-stratified split.
    seed : int, default=0
        Seed of the split.
    n_jobs : int, default=2
        Worker processes computing the images (the main process writes the cache).
    progress : bool, default=True
        Show a progress bar (tqdm; silenced by ``TQDM_DISABLE=1``).
    metadata : dict or None, default=None
        Extra metadata stored with the cache; merged over the manifest's own
        ``attrs["metadata"]`` (source, source_root, oracle_mae).
    age_range : (float, float), default=(0, 120)
        Plausible ages in years; an age outside is a bad participant (see
        :func:`~brainage_core.data.manifest.validate_manifest`).
    wait : bool or None, default=None
        When another process prepares the same cache: wait for it (True) or raise
        :class:`~brainage_core._utils.locks.LockBusy` naming it (False); None waits unless
        the environment variable ``BRAINAGE_LOCK_WAIT`` is ``"0"`` (``--no-wait``).
    register : bool, default=False
        Register every image affinely to the MNI template first
        (:mod:`brainage_core.data.register`; part of the cache key).
    qc : bool, default=False
        Also take each image's QC measures in the same pass
        (:func:`~brainage_core.data.qc.preprocess_with_qc`: the image is read once); they
        are kept in the cache (:meth:`PreparedCohort.qc_measures`), not in its key. A cache
        found ready is returned as it is, with or without measures.
    reuse : PreparedCohort or None, default=None
        A cohort prepared earlier from the same files, grid and preprocessing (for
        example the whole manifest, before QC left some images out): the images (and
        measures) of its paths are copied from it instead of being read again.

    Returns
    -------
    PreparedCohort
        The cohort; a second call with the same inputs returns the same cache without
        computing anything.
    """
    check_positive("n_jobs", n_jobs, integer=True)
    clean, manifest_skipped, params, key = _resolve(
        manifest, resolution=resolution, on_error=on_error, split_fractions=split_fractions,
        seed=seed, metadata=metadata, age_range=age_range, register=register)
    cache_dir, final, ready = _cache_entry(cache_dir, key)
    if ready is not None:
        return ready
    with file_lock(cache_dir / f"{key}.lock", wait=wait, what="this cache entry"):
        if (final / "metadata.json").is_file():  # another process finished it meanwhile
            return PreparedCohort.open(final)
        partial = cache_dir / f"{key}.partial"
        _remove_superseded_partials(cache_dir, key, params)
        template = load_template(resolution)
        records = _compute_images(
            clean,
            partial,
            template,
            params=params,
            on_error=on_error,
            n_jobs=n_jobs,
            progress=progress,
            qc=qc,
            reuse=_check_reuse(reuse, params),
        )
        _write_qc_measures(partial / "qc.jsonl", clean["path"].tolist(), range(len(clean)),
                           partial / QC_MEASURES)
        _publish(clean, manifest_skipped, records, partial, final, template, params, key,
                 progress=progress)
    return PreparedCohort.open(final)


def _resolve(
    manifest: pd.DataFrame,
    *,
    resolution: int,
    on_error: str,
    split_fractions: Sequence[float],
    seed: int,
    metadata: dict[str, Any] | None,
    age_range: Sequence[float],
    register: bool = False,
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any], str]:
    """Check the arguments; return the validated manifest, its skipped rows, the
    parameters and the cache key."""
    check_choice("resolution", resolution, SUPPORTED_RESOLUTIONS)
    check_choice("on_error", on_error, ON_ERROR_CHOICES)
    fractions = check_split_fractions(split_fractions)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise BrainAgeInputError(f"'seed' must be an integer; {seed!r} was provided.")
    source_meta = dict(getattr(manifest, "attrs", {}).get("metadata", {}))
    source_meta.update(metadata or {})
    source = str(source_meta.get("source_root") or source_meta.get("source") or "manifest")
    clean = validate_manifest(manifest, source, on_error=on_error, age_range=age_range)
    if len(clean) == 0:
        raise BrainAgeInputError("no usable participant in the manifest", source)
    params = {
        "format_version": CACHE_FORMAT_VERSION,
        "resolution": int(resolution),
        "preprocessing": preprocessing_description(register),
        "on_error": on_error,
        "split_fractions": list(fractions),
        "seed": int(seed),
        "source": source_meta,
    }
    skipped = clean.attrs["skipped"]
    return clean, skipped, params, cache_key(clean, skipped, params)


def _cache_entry(cache_dir: str | os.PathLike, key: str
                 ) -> tuple[Path, Path, PreparedCohort | None]:
    """The cache folder (created), the entry's final folder, and the entry if published."""
    cache_dir = Path(cache_dir).expanduser().resolve()
    final = cache_dir / key
    if (final / "metadata.json").is_file():
        return cache_dir, final, PreparedCohort.open(final)
    cache_dir.mkdir(parents=True, exist_ok=True)
    return cache_dir, final, None


def _remove_superseded_partials(cache_dir: Path, key: str, params: dict[str, Any]) -> None:
    """Remove the unfinished caches of the same source and grid but other inputs.

    A preparation that stopped (an error, a kill) and whose inputs then changed (a fixed
    image, an edited table) can never be resumed: its key is gone. Partials of other
    sources or grids are left alone (they may still be resumed), and so is one that
    another process is working on.
    """
    if not params["source"].get("source_root"):
        return  # a manifest built by hand: nothing tells its partials apart
    for other in sorted(cache_dir.glob("*.partial")):
        if other.name == f"{key}.partial" or not other.is_dir():
            continue
        try:
            info = json.loads((other / "partial.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # not ours, or from an older version: leave it
        if not isinstance(info, dict) or (
            info.get("source_root"),
            info.get("resolution"),
        ) != (params["source"].get("source_root"), params["resolution"]):
            continue
        other_key = other.name[: -len(".partial")]
        try:
            with file_lock(cache_dir / f"{other_key}.lock", wait=False, notice=lambda _: None):
                size = sum(f.stat().st_size for f in other.rglob("*") if f.is_file())
                shutil.rmtree(other)
                (cache_dir / f"{other_key}.lock").unlink(missing_ok=True)
        except LockBusy:
            continue
        print(
            f"note: removed {other} ({size / 1e6:.1f} MB): an unfinished preparation of the "
            "same source and grid whose inputs have changed since",
            file=sys.stderr,
        )


def cache_key(manifest: pd.DataFrame, skipped: pd.DataFrame, params: dict[str, Any]) -> str:
    """Hash of a validated manifest (contents and file stats), its skipped rows and params.

    Returns
    -------
    str
        24 hexadecimal characters.
    """
    h = hashlib.sha256()
    h.update(json.dumps(params, sort_keys=True, default=str).encode())
    h.update(manifest.to_csv(index=False).encode())
    h.update(skipped.to_csv(index=False).encode())
    for path in manifest["path"]:
        st = os.stat(path)
        h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def _compute_images(
    manifest: pd.DataFrame,
    partial: Path,
    template: Template,
    *,
    params: dict[str, Any],
    on_error: str,
    n_jobs: int,
    progress: bool,
    positions: Sequence[int] | None = None,
    qc: bool = False,
    reuse: PreparedCohort | None = None,
) -> dict[int, str | None]:
    """Fill ``partial/images.npy``; return {index: None (done) or skip reason}.

    Unsharded (``positions`` None), each kept image is written once into its final row:
    the number of kept images before it (layout ``"final-rows"`` in ``partial.json``).
    That number is known once every earlier image is done, so images finished out of
    order wait in memory (at most about twice the workers' window) and the done-record
    grows in manifest order; the file keeps its full size until the publication
    truncates it. With ``positions``, only those manifest rows are prepared, each into
    its own slot ``0..`` of the file (layout ``"slots"``; the indices returned are those
    slots), and so does an unfinished preparation of an earlier version (its kept rows
    are compacted at the publication, :func:`compact_in_place`).
    With ``qc``, each image's QC measures go to ``partial/qc.jsonl`` (keyed by its manifest
    index, or slot) before the image is recorded done.
    """
    if positions is not None:
        manifest = manifest.iloc[list(positions)].reset_index(drop=True)
    n = len(manifest)
    shape = (n, *template.shape)
    partial.mkdir(parents=True, exist_ok=True)
    _clean_partial(partial, keep=(*_PARTIAL_FILES, _SHARD_DONE))
    images_path = partial / "images.npy"
    done_path = partial / "done.tsv"
    qc_path = partial / "qc.jsonl"
    records = _read_done(done_path, n)
    if len(records) == n:  # every image is in place: only the publication is left
        return records
    info_path = partial / "partial.json"
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        info = None
    writer = ImageFileWriter.resume(images_path, shape) if isinstance(info, dict) else None
    if writer is None:  # a new (or unusable) partial
        info = {"source_root": params["source"].get("source_root"),
                "resolution": params["resolution"],
                "layout": "slots" if positions is not None else "final-rows"}
        done_path.unlink(missing_ok=True)
        qc_path.unlink(missing_ok=True)
        (partial / _COMPACT).unlink(missing_ok=True)
        records = {}
        writer = ImageFileWriter.create(images_path, shape)
        write_json(info_path, info)
    final_rows = info.get("layout") == "final-rows"

    todo = [i for i in range(n) if i not in records]
    paths = manifest["path"].tolist()
    ids = manifest["participant_id"].tolist()
    pending: list[tuple[int, str | None, int | None]] = []
    # the next image to place, and its row: every image before it is recorded
    frontier = next((i for i in range(n) if i not in records), n)
    next_row = sum(1 for i in range(frontier) if records[i] is None)
    pending_qc: list[str] = []
    waiting: dict[int, tuple[np.ndarray | None, str | None]] = {}

    def flush() -> None:
        if pending_qc:  # before done.tsv: a slot recorded done has its measures
            with open(qc_path, "a", encoding="utf-8") as fh:
                fh.writelines(pending_qc)
                fh.flush()
                os.fsync(fh.fileno())
            pending_qc.clear()
        if pending:
            writer.flush()
            with open(done_path, "a", encoding="utf-8") as fh:
                for i, reason, row in pending:
                    fh.write(f"{i}\t{'' if reason is None else reason}\t"
                             f"{'' if row is None else row}\n")
                fh.flush()
                os.fsync(fh.fileno())
            for i, reason, _ in pending:
                records[i] = reason
            pending.clear()

    def place(i: int, array: np.ndarray | None, reason: str | None) -> None:
        nonlocal frontier, next_row
        waiting[i] = (array, reason)
        while frontier in waiting or (frontier < n and frontier in records):
            if frontier in records:  # recorded by an earlier run (slots layout)
                frontier += 1
                continue
            array, reason = waiting.pop(frontier)
            if reason is None:
                row = next_row if final_rows else frontier
                writer.write(row, array)
                pending.append((frontier, None, row))
                next_row += 1
            else:
                pending.append((frontier, reason, None))
            frontier += 1

    bar = tqdm(
        total=n,
        initial=n - len(todo),
        desc=f"prepare {template.resolution} mm",
        unit="img",
        **({} if progress else {"disable": True}),  # else TQDM_DISABLE decides
    )
    register = "registration" in params["preprocessing"]
    window = 2 * n_jobs + 2
    results = _iter_results(todo, paths, template.resolution, n_jobs, register, qc=qc,
                            reuse=reuse, may_submit=lambda: len(waiting) < 2 * window)
    try:
        for i, array, error, measures in results:
            if measures is not None:
                pending_qc.append(json.dumps({"slot": i, **measures}) + "\n")
            if error is not None:
                reason, where = error
                if on_error == "raise":
                    raise BrainAgeInputError(
                        f"participant {ids[i]!r}: {reason} ({skip_hint()})", where
                    )
                place(i, None, reason)
            else:
                place(i, array, None)
            if len(pending) >= FLUSH_EVERY:
                flush()
            bar.update(1)
    finally:
        results.close()  # stops the workers now, also on an error or an interrupt
        flush()
        writer.close()
        bar.close()
    return records


def _iter_results(
    todo: list[int], paths: list[str], resolution: int, n_jobs: int, register: bool = False,
    *, qc: bool = False, reuse: PreparedCohort | None = None,
    may_submit: Callable[[], bool] = lambda: True,
) -> Iterator[tuple[int, np.ndarray | None, tuple[str, str] | None, dict[str, Any] | None]]:
    """Yield ``(index, float16 array or None, (reason, file) or None, QC measures or None)``
    as images finish; images of ``reuse`` first, copied from it.

    With workers, at most ``2 * n_jobs + 2`` images are in flight, and a new one starts
    only while ``may_submit()`` (the caller's memory for images finished out of order).
    """
    if reuse is not None:
        where = {str(p): j for j, p in enumerate(reuse.table["path"])}
        measures = reuse.qc_measures() if qc else {}
        copied = [i for i in todo if paths[i] in where and (not qc or paths[i] in measures)]
        for i in copied:
            yield (i, np.asarray(reuse.images[where[paths[i]]], dtype=np.float16), None,
                   measures.get(paths[i]))
        todo = [i for i in todo if i not in set(copied)]
    if n_jobs == 1 or len(todo) < MIN_IMAGES_FOR_WORKERS:
        for i in todo:
            yield _prepare_one(i, paths[i], resolution, register, qc)
        return
    # fork (Linux) starts workers at once, shares the loaded template and, unlike spawn,
    # works from scripts without an ``if __name__ == "__main__"`` guard. The workers die
    # with this process and never hold the cache's lock (see _utils.workers).
    window = 2 * n_jobs + 2
    queue = iter(todo)
    with process_pool(min(n_jobs, len(todo))) as ex:
        running: set[cf.Future] = set()

        def fill() -> None:
            while len(running) < window and (not running or may_submit()):
                nxt = next(queue, None)
                if nxt is None:
                    return
                running.add(ex.submit(_prepare_one, nxt, paths[nxt], resolution, register,
                                      qc))

        try:
            fill()
            while running:
                finished, running = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                for fut in finished:
                    yield fut.result()
                fill()
        finally:
            for fut in running:
                fut.cancel()


def _prepare_one(
    index: int, path: str, resolution: int, register: bool = False, qc: bool = False
) -> tuple[int, np.ndarray | None, tuple[str, str] | None, dict[str, Any] | None]:
    """Preprocess one image (runs in a worker); errors are returned, not raised.

    With ``qc``, the image is preprocessed by
    :func:`~brainage_core.data.qc.preprocess_with_qc` (the same image) and its measures
    come back with it.
    """
    template = load_template(resolution)
    measures = None
    try:
        if qc:
            result = preprocess_with_qc(path, template, register=register)
            array = result.image
            measures = {"measures": result.measures,
                        "profile": intensity_percentiles(array, template.mask).tolist()}
        else:
            array = preprocess_image(path, template, register=register)
    except BrainAgeInputError as err:
        message = str(err)
        prefix = f"{err.path}: " if err.path else ""
        reason = message[len(prefix) :] if prefix and message.startswith(prefix) else message
        return index, None, (reason, err.path or path), None
    return index, array.astype(np.float16), None, measures


def _check_reuse(reuse: PreparedCohort | None, params: dict[str, Any]
                 ) -> PreparedCohort | None:
    """``reuse`` if it was prepared on the same grid with the same preprocessing."""
    if reuse is None:
        return None
    same = (reuse.metadata.get("resolution") == params["resolution"]
            and reuse.metadata.get("preprocessing") == params["preprocessing"])
    if not same:
        raise BrainAgeInputError("'reuse' was prepared on another grid or with another "
                                 "preprocessing", reuse.root)
    return reuse


def _read_qc(path: Path) -> dict[int, dict[str, Any]]:
    """The measures of ``qc.jsonl`` by slot (the last record of a slot wins)."""
    out: dict[int, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut by an interruption
            out[int(rec.pop("slot"))] = rec
    return out


def _write_qc_measures(source: Path | Sequence[Path], paths: Sequence[str],
                       rows: Sequence[int] | Sequence[Sequence[int]], target: Path) -> None:
    """Write :data:`QC_MEASURES` (by image path) from one or several ``qc.jsonl`` (by slot).

    ``rows[k][slot]`` is the manifest row of a slot of ``source[k]`` (one source: ``rows``
    is that source's list).
    """
    sources = [source] if isinstance(source, Path) else list(source)
    row_lists = [rows] if isinstance(source, Path) else list(rows)
    lines = []
    for src, slots in zip(sources, row_lists, strict=True):
        slots = list(slots)
        for slot, rec in sorted(_read_qc(src).items()):
            if slot < len(slots):
                lines.append((slots[slot], rec))
    if not lines:
        return
    lines.sort(key=lambda item: item[0])
    with open(target, "w", encoding="utf-8") as fh:
        for row, rec in lines:
            fh.write(json.dumps({"path": str(paths[row]), **rec}) + "\n")


def _publish(
    manifest: pd.DataFrame,
    manifest_skipped: pd.DataFrame,
    records: dict[int, str | None],
    partial: Path,
    final: Path,
    template: Template,
    params: dict[str, Any],
    key: str,
    compacted: bool = False,
    progress: bool = False,
) -> None:
    """Compact, write the table, splits and metadata, then move ``partial`` to ``final``.

    With ``compacted``, ``partial/images.npy`` already holds only the kept subjects;
    otherwise it has a row per manifest row, in the layout ``partial.json`` names.
    """
    n = len(manifest)
    ok = np.array([records.get(i, "not processed") is None for i in range(n)])
    image_skipped = pd.DataFrame(
        [
            {
                "participant_id": manifest.at[i, "participant_id"],
                "path": manifest.at[i, "path"],
                "reason": records[i],
            }
            for i in range(n)
            if not ok[i]
        ],
        columns=_SKIPPED_COLUMNS,
    )
    skipped = pd.concat([manifest_skipped[_SKIPPED_COLUMNS], image_skipped], ignore_index=True)
    if not ok.any():
        raise BrainAgeInputError(
            f"every participant was skipped; first reasons: {skipped['reason'].head(3).tolist()}",
            params["source"].get("source_root"),
        )
    images_path = partial / "images.npy"
    if not compacted:
        if _layout(partial) == "final-rows":  # the kept images fill the first rows
            set_row_count(images_path, int(ok.sum()))
        elif not ok.all():  # drop the skipped slots, in place
            compact_in_place(images_path, ok, partial / _COMPACT, progress=progress)

    table = manifest.loc[ok].reset_index(drop=True).copy()
    # rows of one subject (sessions, runs) share a split
    table["split"] = make_splits(table["age"].to_numpy(), params["split_fractions"],
                                 params["seed"], groups=table["participant_id"].to_numpy())
    write_table(partial / "table.tsv", table)
    write_table(partial / "skipped.tsv", skipped)
    np.save(partial / "mask.npy", np.asarray(template.mask, dtype=bool))
    counts = {s: int((table["split"] == s).sum()) for s in SPLITS}
    metadata = {
        **params["source"],
        "format_version": CACHE_FORMAT_VERSION,
        "key": key,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "n_subjects": int(ok.sum()),
        "n_skipped": int(len(skipped)),
        "split_counts": counts,
        "resolution": params["resolution"],
        "shape": list(template.shape),
        "affine": np.asarray(template.affine).tolist(),
        "dtype": "float16",
        "preprocessing": params["preprocessing"],
        "on_error": params["on_error"],
        "split_fractions": params["split_fractions"],
        "seed": params["seed"],
    }
    write_json(partial / "metadata.json", metadata)
    # the done-record first: without it a later run never trusts this folder's images
    (partial / "done.tsv").unlink(missing_ok=True)
    _clean_partial(partial, keep=("images.npy", "table.tsv", "skipped.tsv", "mask.npy",
                                  "metadata.json", QC_MEASURES))
    if final.exists():  # a stale, incomplete folder (no metadata.json): replace it
        shutil.rmtree(final)
    os.replace(partial, final)


def compact_in_place(path: Path, keep: np.ndarray, record: Path, *,
                     progress: bool = False) -> None:
    """Drop the rows of a float16 ``.npy`` file where ``keep`` is False, in place.

    Kept row ``i`` moves to row ``j`` (its rank among the kept rows, ``j <= i``); rows
    before the first dropped one stay where they are. Then the header is rewritten with
    the new row count (numpy pads the header so that the first axis can grow or shrink
    without changing its length) and the file is truncated. The result is byte for byte
    the file :class:`ImageFileWriter` writes with the kept rows only, without a second
    copy of the array on disk and with one image in memory.

    The compaction resumes after a kill: ``record`` holds how many kept rows are in
    place. Between two records, the moves ``j0 .. j1 - 1`` read rows ``keep_idx[j0] ..``
    and write rows ``j0 .. j1 - 1``; they are limited to ``j1 <= keep_idx[j0]`` (the gap
    left by the dropped rows so far, and at most :data:`COMPACT_BATCH`), so that no move
    of a batch overwrites a row that the batch reads and replaying a cut batch is exact.

    Parameters
    ----------
    path : pathlib.Path
        The ``.npy`` file of shape ``(len(keep), ...)``, or a partly compacted one with
        its ``record``.
    keep : numpy.ndarray of bool
        The rows to keep, in the original row order.
    record : pathlib.Path
        The progress record (JSON), written atomically after each batch; left in place
        when the compaction is done (the caller removes it with the folder's other files).
    progress : bool, default=False
        Show a progress bar over the rows that move (tqdm).
    """
    keep = np.asarray(keep, dtype=bool)
    kept = np.flatnonzero(keep)
    n, n_kept = int(keep.size), int(kept.size)
    version, file_shape, fortran, dtype, offset = _npy_header(path)
    row_shape = tuple(int(s) for s in file_shape[1:])
    row_bytes = int(np.prod(row_shape)) * np.dtype(dtype).itemsize
    state = {"n": n, "n_kept": n_kept, "moved": int(np.argmin(keep)) if n_kept < n else n}
    try:
        stored = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        stored = None
    if isinstance(stored, dict) and (stored.get("n"), stored.get("n_kept")) == (n, n_kept):
        state = stored
    elif tuple(file_shape) != (n, *row_shape):
        raise BrainAgeInputError(
            f"images.npy holds {tuple(file_shape)} rows; {n} expected and no compaction "
            "record: prepare the cohort again", path)
    fd = os.open(path, os.O_RDWR)
    j = int(state["moved"])
    bar = tqdm(total=n_kept, initial=j, desc="compact (skipped subjects)", unit="img",
               **({} if progress else {"disable": True}))
    try:
        while j < n_kept:
            end = min(n_kept, int(kept[j]), j + COMPACT_BATCH)
            for k in range(j, end):
                if kept[k] != k:
                    data = os.pread(fd, row_bytes, offset + int(kept[k]) * row_bytes)
                    os.pwrite(fd, data, offset + k * row_bytes)
            os.fsync(fd)
            bar.update(end - j)
            j = end
            write_json(record, {**state, "moved": j})
    finally:
        os.close(fd)
        bar.close()
    set_row_count(path, n_kept)


def _npy_header(path: Path) -> tuple[tuple[int, int], tuple[int, ...], bool, Any, int]:
    """``(format version, shape, fortran order, dtype, data offset)`` of a ``.npy`` file."""
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                else np.lib.format.read_array_header_2_0)
        file_shape, fortran, dtype = read(fh)
        return version, file_shape, fortran, dtype, fh.tell()


def set_row_count(path: Path, n_rows: int) -> None:
    """Keep the first ``n_rows`` rows of a ``.npy`` file: rewrite its header, truncate it.

    numpy pads a header so that the length of the first axis can change without changing
    the header's length; the result is byte for byte the file written with ``n_rows``
    rows from the start. Calling it again changes nothing.
    """
    version, file_shape, fortran, dtype, offset = _npy_header(path)
    row_shape = tuple(int(s) for s in file_shape[1:])
    row_bytes = int(np.prod(row_shape)) * np.dtype(dtype).itemsize
    header = io.BytesIO()
    write_header = (np.lib.format.write_array_header_1_0 if version == (1, 0)
                    else np.lib.format.write_array_header_2_0)
    write_header(header, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                          "fortran_order": bool(fortran), "shape": (int(n_rows), *row_shape)})
    if len(header.getvalue()) != offset:  # cannot happen with numpy's padded headers
        raise BrainAgeInputError("the array's header would change length", path)
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, header.getvalue(), 0)
        os.ftruncate(fd, offset + int(n_rows) * row_bytes)
        os.fsync(fd)
    finally:
        os.close(fd)


def _layout(partial: Path) -> str:
    """How an unfinished preparation placed its images: "final-rows" or "slots"."""
    try:
        info = json.loads((partial / "partial.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        info = None
    return str(info.get("layout", "slots")) if isinstance(info, dict) else "slots"


class ImageFileWriter:
    """Write images one by one into a float16 ``.npy`` file, by offset.

    The main process writes each image with :func:`os.pwrite` at its place in the file
    instead of mapping the whole array, so its memory stays that of one image however
    large the cohort (the written pages live in the page cache, not in the process).

    Use :meth:`create` for a new file, :meth:`resume` to continue an existing one.
    """

    def __init__(self, path: Path, shape: tuple[int, ...], offset: int) -> None:
        self.path = path
        self.shape = shape
        self.offset = offset
        self.image_bytes = int(np.prod(shape[1:])) * 2
        self._fd = os.open(path, os.O_RDWR)

    @classmethod
    def create(cls, path: Path, shape: tuple[int, ...]) -> ImageFileWriter:
        """Create (or overwrite) ``path`` as a sparse float16 array of ``shape``."""
        header = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=shape)
        offset = int(header.offset)
        del header
        return cls(path, shape, offset)

    @classmethod
    def resume(cls, path: Path, shape: tuple[int, ...]) -> ImageFileWriter | None:
        """Reopen ``path`` if it is a float16 array of ``shape``; None otherwise."""
        if not path.is_file():
            return None
        try:
            with open(path, "rb") as fh:
                version = np.lib.format.read_magic(fh)
                read = (
                    np.lib.format.read_array_header_1_0
                    if version == (1, 0)
                    else np.lib.format.read_array_header_2_0
                )
                file_shape, fortran, dtype = read(fh)
                offset = fh.tell()
        except (ValueError, OSError):
            return None
        expected = offset + int(np.prod(shape)) * 2
        if (
            tuple(file_shape) != tuple(shape)
            or fortran
            or dtype != np.float16
            or path.stat().st_size != expected
        ):
            return None
        return cls(path, shape, offset)

    def write(self, index: int, array: np.ndarray) -> None:
        """Write image ``index``."""
        data = np.ascontiguousarray(array, dtype=np.float16)
        if data.shape != self.shape[1:]:
            raise ValueError(f"image of shape {data.shape}; expected {self.shape[1:]}")
        os.pwrite(self._fd, data.tobytes(), self.offset + index * self.image_bytes)

    def flush(self) -> None:
        """Make the written images durable (fsync)."""
        os.fsync(self._fd)

    def close(self) -> None:
        """Flush and close the file."""
        if self._fd >= 0:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1


# -- helpers ------------------------------------------------------------------------------
def _clean_partial(partial: Path, keep: Sequence[str] = _PARTIAL_FILES) -> None:
    """Remove from ``partial`` every file but ``keep`` (leftovers of an interruption)."""
    for path in partial.iterdir():
        if path.name in keep:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def _read_done(path: Path, n: int) -> dict[int, str | None]:
    records: dict[int, str | None] = {}
    if not path.is_file():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        idx, _, rest = line.partition("\t")
        reason = rest.partition("\t")[0]  # then the row the image went to, if kept
        if idx.isdigit() and int(idx) < n:
            records[int(idx)] = reason or None
    return records


def _read_tsv(path: Path, columns: list[str] | None = None) -> pd.DataFrame:
    if not path.is_file():
        return pd.DataFrame(columns=columns or [])
    table = pd.read_csv(
        path,
        sep="\t",
        na_values=["n/a"],
        keep_default_na=False,
        dtype={"participant_id": str, "path": str, "sex": object, "site": str},
    )
    return table


# -- sharded preparation --------------------------------------------------------------------
def shard_folder(cache_dir: str | os.PathLike, key: str, shard: tuple[int, int]) -> Path:
    """``<cache_dir>/<key>.shard-<i>-of-<n>/``: the part of one shard."""
    return Path(cache_dir) / f"{key}.shard-{shard[0]}-of-{shard[1]}"


def prepare_shard(
    manifest: pd.DataFrame,
    cache_dir: str | os.PathLike,
    *,
    shard: tuple[int, int],
    resolution: int = 2,
    on_error: str = "raise",
    split_fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    n_jobs: int = 1,
    progress: bool = True,
    metadata: dict[str, Any] | None = None,
    age_range: Sequence[float] = AGE_RANGE,
    register: bool = False,
    qc: bool = False,
) -> PreparedCohort | None:
    """Prepare one shard of a cohort; the shard that completes the set publishes it.

    Start ``n`` processes (or ``torchrun`` ranks, or the tasks of a scheduler's job array,
    on one node or many sharing the cache folder) with ``shard=(i, n)``, ``i = 0..n-1``
    and otherwise the same arguments as :func:`prepare_cohort`. Shard ``i`` preprocesses
    manifest rows ``i, i + n, i + 2n, ...`` into its own folder
    ``<key>.shard-<i>-of-<n>/`` (resumable as an unsharded preparation is), with no
    shared lock: no two shards write the same file. Whichever shard finds every shard
    complete publishes the cache: it claims the publication by creating the folder
    ``<key>.publishing/`` (an atomic ``mkdir``, which network file systems honour where
    ``flock`` may fail), writes the final ``images.npy`` once, with the kept subjects
    only (a skipped subject is simply not copied), and moves the cache into place with
    one :func:`os.replace`. The published cache is the one :func:`prepare_cohort` makes
    from the same inputs, byte for byte. Publishing removes the shards' folders, and also
    those left by an abandoned attempt with another number of shards.

    Parameters
    ----------
    shard : (int, int)
        ``(index, count)`` with ``0 <= index < count``.
    n_jobs : int, default=1
        Worker processes of this shard (one process per shard is the usual layout).
    qc : bool, default=False
        Each shard takes the QC measures of its own rows only, in the same pass; the
        publishing shard gathers them into the cache.
    Other parameters
        As :func:`prepare_cohort`.

    Returns
    -------
    PreparedCohort or None
        The cohort once published (by this call or an earlier one); None while other
        shards are unfinished, or while another process publishes.
    """
    index, count = check_shard(shard)
    check_positive("n_jobs", n_jobs, integer=True)
    clean, manifest_skipped, params, key = _resolve(
        manifest, resolution=resolution, on_error=on_error, split_fractions=split_fractions,
        seed=seed, metadata=metadata, age_range=age_range, register=register)
    cache_dir, _, ready = _cache_entry(cache_dir, key)
    if ready is not None:
        return ready
    template = load_template(resolution)
    part = shard_folder(cache_dir, key, (index, count))
    positions = range(index, len(clean), count)
    if not (part / _SHARD_DONE).is_file():
        records = _compute_images(clean, part, template, params=params, on_error=on_error,
                                  n_jobs=n_jobs, progress=progress, positions=positions,
                                  qc=qc)
        write_json(part / _SHARD_DONE, {"shard": [index, count], "n_rows": len(positions),
                                        "n_done": len(records)})
    return _publish_shards(clean, manifest_skipped, cache_dir, key, count, template, params)


def check_shard(shard: Any) -> tuple[int, int]:
    """``(index, count)`` of a shard, checked: ``0 <= index < count``."""
    ok = (
        isinstance(shard, (tuple, list))
        and len(shard) == 2
        and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in shard)
        and shard[1] >= 1
        and 0 <= shard[0] < shard[1]
    )
    if not ok:
        raise BrainAgeInputError(
            f"'shard' must be (index, count) with 0 <= index < count; {shard!r} was provided."
        )
    return int(shard[0]), int(shard[1])


def _publish_shards(
    manifest: pd.DataFrame,
    manifest_skipped: pd.DataFrame,
    cache_dir: Path,
    key: str,
    count: int,
    template: Template,
    params: dict[str, Any],
) -> PreparedCohort | None:
    """Publish the cache if every shard is complete and nobody else is publishing it."""
    final = cache_dir / key
    parts = [shard_folder(cache_dir, key, (i, count)) for i in range(count)]
    if not all((part / _SHARD_DONE).is_file() for part in parts):
        return None
    claim = cache_dir / f"{key}.publishing"
    if not _claim(claim):
        return PreparedCohort.open(final) if (final / "metadata.json").is_file() else None
    try:
        if (final / "metadata.json").is_file():
            return PreparedCohort.open(final)
        n = len(manifest)
        records: dict[int, str | None] = {}
        for i, part in enumerate(parts):
            local = _read_done(part / "done.tsv", len(range(i, n, count)))
            records.update({i + k * count: reason for k, reason in local.items()})
        ok = np.array([records.get(i, "not processed") is None for i in range(n)])
        folder = claim / "cohort"
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir()
        if ok.any():
            sources = [np.load(part / "images.npy", mmap_mode="r") for part in parts]
            writer = ImageFileWriter.create(folder / "images.npy",
                                            (int(ok.sum()), *template.shape))
            try:
                for j, i in enumerate(np.flatnonzero(ok)):
                    writer.write(j, sources[i % count][i // count])
            finally:
                writer.close()
            del sources
        _write_qc_measures([part / "qc.jsonl" for part in parts], manifest["path"].tolist(),
                           [range(i, n, count) for i in range(count)], folder / QC_MEASURES)
        _publish(manifest, manifest_skipped, records, folder, final, template, params, key,
                 compacted=True)
        # this count's parts, and those of an abandoned attempt with another shard count
        for part in {*parts, *cache_dir.glob(f"{key}.shard-*-of-*")}:
            shutil.rmtree(part, ignore_errors=True)
    finally:
        shutil.rmtree(claim, ignore_errors=True)
    return PreparedCohort.open(final)


def _claim(claim: Path) -> bool:
    """Create ``claim`` (atomic); take over a claim whose holder on this host is gone."""
    from brainage_core._utils.locks import LockHolder

    for _ in range(2):
        try:
            claim.mkdir()
        except FileExistsError:
            try:
                holder = LockHolder(**json.loads((claim / "holder.json").read_text("utf-8")))
            except (OSError, ValueError, TypeError):
                return False  # being created just now, or unreadable: leave it
            alive = holder.is_alive()
            if alive is not False:
                # Publishing now, or a holder on another host that cannot be checked from
                # here: if that job is gone, nobody else will publish; say how to go on.
                warnings.warn(
                    f"{claim}: the cache is being published by {holder.describe()}"
                    + ("" if alive else "; that host cannot be checked from here")
                    + ". If that process is gone, remove this folder and run any shard "
                    "again: it publishes the cache from the finished shards.",
                    stacklevel=3,
                )
                return False
            shutil.rmtree(claim, ignore_errors=True)  # its holder died: take over
            continue
        write_json(claim / "holder.json", asdict(LockHolder.current()))
        return True
    return False
