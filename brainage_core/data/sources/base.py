"""What a data source is: a name, whether it needs a path, and a manifest builder."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd


@dataclass(frozen=True)
class SourceRequest:
    """What a source gets from a study's ``data`` config section.

    Attributes
    ----------
    path : str or None
        ``data.path``: the BIDS root, the CSV manifest, or a download folder.
    cache_dir : pathlib.Path
        ``data.cache_dir``, resolved: where generated or downloaded data may be kept.
    synthetic : mapping
        ``data.synthetic``: the generator's settings (synthetic source only).
    bids : mapping
        ``data.bids``: which sessions and runs of a BIDS folder enter (BIDS source only).
    n_jobs : int
        Worker processes allowed.
    progress : bool
        Show progress bars.
    """

    path: str | None
    cache_dir: Path
    synthetic: Mapping[str, Any] = field(default_factory=dict)
    bids: Mapping[str, Any] = field(default_factory=dict)
    n_jobs: int = 1
    progress: bool = True


@dataclass(frozen=True)
class DataSource:
    """A data source of the study.

    Attributes
    ----------
    name : str
        Its name in the config (``data.source``).
    description : str
        One line for the docs and error messages.
    needs_path : bool
        Whether ``data.path`` is required.
    manifest : callable
        ``manifest(request: SourceRequest) -> pandas.DataFrame``, the source's manifest
        (see :mod:`brainage_core.data.manifest`).
    """

    name: str
    description: str
    needs_path: bool
    manifest: Callable[[SourceRequest], pd.DataFrame]
