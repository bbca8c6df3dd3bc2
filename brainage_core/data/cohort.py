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

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from brainage_core._utils.validation import BrainAgeInputError, check_choice, check_positive
from brainage_core.data.cache import PreparedCohort, prepare_cohort
from brainage_core.data.manifest import AGE_RANGE, ON_ERROR_CHOICES, check_age_range
from brainage_core.data.sources import SOURCES, SourceRequest
from brainage_core.data.sources.bids import BidsSelection
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
    "bids": {},
    "age_range": list(AGE_RANGE),
    "synthetic": {},
    "register": False,
}


#: Seed of the train/val/test split (fixed so that every run of a cohort agrees).
SPLIT_SEED = 0

#: Worker processes used to generate and prepare images.
N_JOBS = 2



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
    check_choice("data.source", cfg["source"], tuple(SOURCES))
    for key in ("cache_dir", "path"):
        value = cfg[key]
        if value is not None and (not isinstance(value, (str, os.PathLike)) or value == ""):
            raise BrainAgeInputError(
                f"'data.{key}' must be a folder or file path (text); {value!r} was provided."
            )
    cfg["age_range"] = list(check_age_range(cfg["age_range"], "data.age_range"))
    check_choice("data.resolution", cfg["resolution"], SUPPORTED_RESOLUTIONS)
    check_choice("data.on_error", cfg["on_error"], ON_ERROR_CHOICES)
    cfg["split_fractions"] = list(check_split_fractions(cfg["split_fractions"]))
    if not isinstance(cfg["register"], bool):
        raise BrainAgeInputError(
            f"'data.register' must be true or false; {cfg['register']!r} was provided.")
    if SOURCES[cfg["source"]].needs_path and not cfg["path"]:
        raise BrainAgeInputError(
            f"'data.path' is required with data.source={cfg['source']!r}: give the BIDS "
            "root or the CSV manifest, e.g. -p data.path /data/my_study"
        )
    if not isinstance(cfg["bids"], Mapping):
        raise BrainAgeInputError(f"'data.bids' must be a mapping; {cfg['bids']!r} was provided.")
    cfg["bids"] = BidsSelection.from_dict(cfg["bids"]).to_dict()
    if not isinstance(cfg["synthetic"], Mapping):
        raise BrainAgeInputError(
            f"'data.synthetic' must be a mapping; {cfg['synthetic']!r} was provided."
        )
    return cfg


def load_cohort(
    data_config: Mapping[str, Any], *, progress: bool = True, n_jobs: int = N_JOBS,
    qc: bool = False,
) -> PreparedCohort:
    """Turn a ``data`` config section into a prepared cohort (generating it if needed).

    Parameters
    ----------
    data_config : mapping
        The config's ``data`` section: ``source`` ("synthetic", "bids", "csv" or
        "oasis"), ``path`` (BIDS root, CSV manifest, or nilearn data folder for OASIS),
        ``bids`` (``session`` and ``run``: which images of a BIDS folder enter, see
        :class:`brainage_core.data.sources.bids.BidsSelection`),
        ``resolution`` (cache grid, mm), ``cache_dir`` (relative to the current
        directory), ``on_error`` ("raise" or "skip"), ``split_fractions``,
        ``age_range`` (plausible ages, default [0, 120]) and ``synthetic``
        (:class:`brainage_core.data.synth.config.SynthConfig` fields) and ``register``
        (affine registration to the MNI template first, default false).
    progress : bool, default=True
        Show progress bars.
    n_jobs : int, default=2
        Worker processes for generation and preparation.
    qc : bool, default=False
        Take each image's QC measures while it is prepared (read once), kept in the cache
        for :func:`cohort_quality`; a cache found ready is used as it is.

    Returns
    -------
    PreparedCohort
        The prepared cohort, cached under ``cache_dir`` (synthetic datasets under
        ``cache_dir/synthetic/<hash of the synthetic config>/``).
    """
    cfg = resolve_data_config(data_config)
    check_positive("n_jobs", n_jobs, integer=True)
    cache_dir = Path(cfg["cache_dir"]).expanduser().resolve()
    request = SourceRequest(
        path=cfg["path"],
        cache_dir=cache_dir,
        synthetic=cfg["synthetic"],
        bids=cfg["bids"],
        n_jobs=n_jobs,
        progress=progress,
    )
    manifest = SOURCES[cfg["source"]].manifest(request)
    return prepare_cohort(
        manifest,
        cache_dir / "prepared",
        resolution=cfg["resolution"],
        on_error=cfg["on_error"],
        split_fractions=cfg["split_fractions"],
        seed=SPLIT_SEED,
        n_jobs=n_jobs,
        progress=progress,
        age_range=cfg["age_range"],
        register=cfg["register"],
        qc=qc,
    )


def cohort_quality(
    cohort: PreparedCohort, data_config: Mapping[str, Any], *, progress: bool = True
) -> pd.DataFrame:
    """QC of a prepared cohort's images (notebook 01), without reading them again.

    The measures taken while the images were prepared (``load_cohort(..., qc=True)``,
    :meth:`PreparedCohort.qc_measures`) are judged against the cohort
    (:func:`~brainage_core.data.qc.cohort_qc`); only an image without measures (a cache
    prepared earlier without them) is read and measured here, registered first if
    ``data.register`` is set, as it was prepared.

    Returns
    -------
    pandas.DataFrame
        As :func:`~brainage_core.data.qc.cohort_qc`, one row per image of the cohort.
    """
    from brainage_core.data.qc import cohort_qc

    cfg = resolve_data_config(data_config)
    return cohort_qc(cohort.table, cohort.template, register=cfg["register"],
                     progress=progress, measured=cohort.qc_measures())





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
