"""Data source: the embedded synthetic ageing cohort, generated once per configuration.

The generator writes a BIDS folder (:func:`brainage_core.data.synth.generate_cohort`),
which is then read like any other BIDS folder.
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

from brainage_core._utils.locks import file_lock
from brainage_core.data.sources.base import DataSource, SourceRequest
from brainage_core.data.sources.bids import BIDS_INDEX_DIR, load_bids


def ensure_synthetic_cohort(
    synthetic: Mapping[str, Any],
    out_root: str | os.PathLike,
    *,
    n_jobs: int = 2,
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
    with file_lock(out_root / f"{key}.lock", what="this synthetic cohort"):
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



def _manifest(request: SourceRequest) -> pd.DataFrame:
    root = ensure_synthetic_cohort(
        request.synthetic,
        request.cache_dir / "synthetic",
        n_jobs=request.n_jobs,
        progress=request.progress,
    )
    return load_bids(root, database_dir=request.cache_dir / BIDS_INDEX_DIR)


SOURCE = DataSource(
    name="synthetic",
    description="the embedded synthetic ageing cohort (generated offline, with known truth)",
    needs_path=False,
    manifest=_manifest,
)
