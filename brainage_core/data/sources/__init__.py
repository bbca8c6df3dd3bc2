"""Data sources: each turns a dataset into one manifest (participant, path, age, sex, site).

A source is one module that defines a :class:`DataSource` named ``SOURCE``, and one line in
:data:`SOURCES`. The study config (``data.source``), its validation and the docs read the
registry::

    SOURCES["bids"].manifest(SourceRequest(path="/data/my_study", ...))

Every source feeds the same validation, preprocessing and cache
(:func:`brainage_core.data.cache.prepare_cohort`): the synthetic cohort takes no short cut.
"""

from __future__ import annotations

from brainage_core.data.sources import bids, csv, oasis, synthetic
from brainage_core.data.sources.base import DataSource, SourceRequest

#: The data sources by their name in the config (``data.source``).
SOURCES: dict[str, DataSource] = {
    source.name: source
    for source in (synthetic.SOURCE, bids.SOURCE, csv.SOURCE, oasis.SOURCE)
}

__all__ = ["SOURCES", "DataSource", "SourceRequest"]
