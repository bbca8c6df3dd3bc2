"""From a run's ``data`` config section to a prepared cohort, in one call.

Every notebook starts with::

    cohort = load_cohort(RunDir(run_dir).load_config()["data"])

The first call generates the synthetic cohort (if the source is synthetic) and prepares
the cache; later calls with the same section are cheap cache hits. Synthetic data goes
through the same path as real data: a BIDS folder read by
:func:`~brainage_core.data.sources.bids.load_bids`, then
:func:`~brainage_core.data.cache.prepare_cohort`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from brainage_core._utils.validation import BrainAgeInputError, check_choice, check_positive
from brainage_core.data.cache import PreparedCohort, file_lock, prepare_cohort
from brainage_core.data.manifest import ON_ERROR_CHOICES
from brainage_core.data.sources.bids import load_bids
from brainage_core.data.sources.csv import load_csv
from brainage_core.data.sources.oasis import fetch_oasis
from brainage_core.data.splits import check_split_fractions
from brainage_core.data.template import SUPPORTED_RESOLUTIONS

#: Keys of the ``data`` section and their defaults (``brainage_core.study.config`` agrees).
DATA_DEFAULTS: dict[str, Any] = {
    "source": "synthetic",
    "path": None,
    "resolution": 4,
    "cache_dir": ".cache/brainage",
    "on_error": "raise",
    "split_fractions": [0.7, 0.15, 0.15],
    "synthetic": {},
}

#: Data sources.
DATA_SOURCES = ("synthetic", "bids", "csv", "oasis")

#: Seed of the train/val/test split (fixed so that every run of a cohort agrees).
SPLIT_SEED = 0

#: Worker processes used to generate and prepare images.
N_JOBS = 2

#: Seconds allowed for the OASIS download (about 1 GB; instant once downloaded).
OASIS_TIMEOUT = 1800.0


def resolve_data_config(data_config: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a ``data`` section and fill in the defaults.

    Parameters
    ----------
    data_config : mapping
        The ``data`` section of a run's config (see :data:`DATA_DEFAULTS`).

    Returns
    -------
    dict
        A complete copy of the section.
    """
    if not isinstance(data_config, Mapping):
        raise BrainAgeInputError(
            f"the 'data' config section must be a mapping; {data_config!r} was provided."
        )
    if "data" in data_config and "source" not in data_config:
        raise BrainAgeInputError(
            "load_cohort() takes the 'data' section of the config, not the whole config: "
            "use load_cohort(config['data'])."
        )
    unknown = sorted(set(data_config) - set(DATA_DEFAULTS))
    if unknown:
        raise BrainAgeInputError(
            f"unknown key(s) in config section 'data': {unknown}; it has {list(DATA_DEFAULTS)}"
        )
    cfg = {**DATA_DEFAULTS, **{k: v for k, v in data_config.items() if v is not None}}
    cfg["path"] = data_config.get("path")
    check_choice("data.source", cfg["source"], DATA_SOURCES)
    check_choice("data.resolution", cfg["resolution"], SUPPORTED_RESOLUTIONS)
    check_choice("data.on_error", cfg["on_error"], ON_ERROR_CHOICES)
    cfg["split_fractions"] = list(check_split_fractions(cfg["split_fractions"]))
    if cfg["source"] in ("bids", "csv") and not cfg["path"]:
        raise BrainAgeInputError(
            f"'data.path' is required with data.source={cfg['source']!r}: give the BIDS "
            "root or the CSV manifest, e.g. -p data.path /data/my_study"
        )
    if not isinstance(cfg["synthetic"], Mapping):
        raise BrainAgeInputError(
            f"'data.synthetic' must be a mapping; {cfg['synthetic']!r} was provided."
        )
    return cfg


def load_cohort(
    data_config: Mapping[str, Any], *, progress: bool = True, n_jobs: int = N_JOBS
) -> PreparedCohort:
    """Turn a ``data`` config section into a prepared cohort (generating it if needed).

    Parameters
    ----------
    data_config : mapping
        The config's ``data`` section: ``source`` ("synthetic", "bids", "csv" or
        "oasis"), ``path`` (BIDS root, CSV manifest, or nilearn data folder for OASIS),
        ``resolution`` (cache grid, mm), ``cache_dir`` (relative to the current
        directory), ``on_error`` ("raise" or "skip"), ``split_fractions`` and
        ``synthetic`` (:class:`brainage_core.data.synth.config.SynthConfig` fields).
    progress : bool, default=True
        Show progress bars.
    n_jobs : int, default=2
        Worker processes for generation and preparation.

    Returns
    -------
    PreparedCohort
        The prepared cohort, cached under ``cache_dir`` (synthetic datasets under
        ``cache_dir/synthetic/<hash of the synthetic config>/``).
    """
    cfg = resolve_data_config(data_config)
    check_positive("n_jobs", n_jobs, integer=True)
    cache_dir = Path(cfg["cache_dir"]).expanduser().resolve()
    source = cfg["source"]
    if source == "synthetic":
        root = ensure_synthetic_cohort(
            cfg["synthetic"], cache_dir / "synthetic", n_jobs=n_jobs, progress=progress
        )
        manifest = load_bids(root)
    elif source == "bids":
        manifest = load_bids(cfg["path"])
    elif source == "csv":
        manifest = load_csv(cfg["path"])
    else:
        manifest = fetch_oasis(data_dir=cfg["path"], timeout=OASIS_TIMEOUT)
    return prepare_cohort(
        manifest,
        cache_dir / "prepared",
        resolution=cfg["resolution"],
        on_error=cfg["on_error"],
        split_fractions=cfg["split_fractions"],
        seed=SPLIT_SEED,
        n_jobs=n_jobs,
        progress=progress,
    )


def ensure_synthetic_cohort(
    synthetic: Mapping[str, Any],
    out_root: str | os.PathLike,
    *,
    n_jobs: int = N_JOBS,
    progress: bool = True,
) -> Path:
    """Generate the synthetic cohort of a config once; return its BIDS folder.

    The dataset lives in ``out_root/<hash>/``, where the hash covers the complete
    generator config (``SynthConfig.from_dict(synthetic).to_dict()``). It is generated in
    ``<hash>.partial/`` and moved into place only when complete, so an interrupted
    generation is never mistaken for a dataset (the next call resumes it).

    Parameters
    ----------
    synthetic : mapping
        Fields of :class:`brainage_core.data.synth.config.SynthConfig`.
    out_root : str or os.PathLike
        Folder holding the generated datasets.
    n_jobs : int, default=2
        Worker processes of the generator.
    progress : bool, default=True
        Show a progress bar.

    Returns
    -------
    pathlib.Path
        The dataset folder.
    """
    from brainage_core.data import synth

    config = synth.SynthConfig.from_dict(dict(synthetic))
    key = synth_config_hash({"config": config.to_dict(), "version": _package_version()})
    out_root = Path(out_root).expanduser().resolve()
    final = out_root / key
    if (final / "dataset_description.json").is_file():
        return final
    out_root.mkdir(parents=True, exist_ok=True)
    with file_lock(out_root / f"{key}.lock"):
        if (final / "dataset_description.json").is_file():
            return final
        partial = out_root / f"{key}.partial"
        # An interrupted generation left a partial folder with the same config: the
        # generator resumes it (it regenerates missing or unreadable subjects).
        synth.generate_cohort(config, partial, n_jobs=n_jobs, progress=progress)
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
    return final


def synth_config_hash(config: Mapping[str, Any]) -> str:
    """Short stable hash of a synthetic-cohort config (16 hexadecimal characters)."""
    text = json.dumps(dict(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _package_version() -> str:
    from brainage_core import __version__

    return str(__version__)


def data_summary(cohort: PreparedCohort) -> dict[str, Any]:
    """The ``data`` section of ``metrics.json`` for a prepared cohort.

    Returns
    -------
    dict
        ``source``, ``source_root``, ``n_subjects``, ``n_train``, ``n_val``, ``n_test``,
        ``n_skipped``, ``resolution``, ``grid_shape``, ``age_min``, ``age_max``,
        ``oracle_mae`` (None for real data) and ``cache`` (the cache folder).
    """
    table = cohort.table
    counts = table["split"].value_counts()
    return {
        "source": cohort.metadata.get("source"),
        "source_root": cohort.metadata.get("source_root"),
        "n_subjects": len(cohort),
        "n_train": int(counts.get("train", 0)),
        "n_val": int(counts.get("val", 0)),
        "n_test": int(counts.get("test", 0)),
        "n_skipped": int(cohort.metadata.get("n_skipped", 0)),
        "resolution": cohort.resolution,
        "grid_shape": list(cohort.shape),
        "age_min": float(table["age"].min()),
        "age_max": float(table["age"].max()),
        "oracle_mae": cohort.metadata.get("oracle_mae"),
        "cache": str(cohort.root),
    }


def participants_table(cohort: PreparedCohort) -> pd.DataFrame:
    """Participants with their split, in cache order, without machine-specific paths."""
    return cohort.table.drop(columns=["path"], errors="ignore").copy()
