"""Model-parameter randomisation test of an attribution method (Adebayo et al., 2018).

An importance map that explains the *model* must change when the model's learned weights
are destroyed. :func:`cascading_randomisation` re-initialises the predictor's layers one
at a time from the output down to the input (cumulatively), explains the same images
with each damaged copy, and records the Spearman rank correlation of each map with the
map of the trained model. A map that barely changes after every layer is randomised
(an edge detector, a map of the image itself) says nothing about the model:
:func:`sanity_verdict` flags it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.stats import rankdata
from torch import nn

from brainage_core._utils.validation import BrainAgeInputError, check_fraction
from brainage_core.explain.protocol import attribute_each

#: Leaf layers whose parameters are re-initialised with the layer before them (a
#: convolution and its normalisation form one level of the cascade).
_FOLLOWERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.InstanceNorm3d)


def randomisation_levels(model: nn.Module) -> list[tuple[str, list[str]]]:
    """The cascade's levels, top (output) first: ``(name, [module names])``.

    Each level is a leaf module with parameters, with any normalisation layer that
    follows it; their order is the order in which the modules were registered.
    """
    levels: list[tuple[str, list[str]]] = []
    for name, module in model.named_modules():
        if next(module.children(), None) is not None:
            continue
        if not any(True for _ in module.parameters(recurse=False)):
            continue
        if isinstance(module, _FOLLOWERS) and levels:
            levels[-1][1].append(name)
        else:
            levels.append((name, [name]))
    if not levels:
        raise BrainAgeInputError(
            f"the predictor {type(model).__name__} has no layer with parameters to randomise."
        )
    return levels[::-1]


def _reinitialise(module: nn.Module) -> None:
    if hasattr(module, "reset_parameters"):
        module.reset_parameters()
    if hasattr(module, "reset_running_stats"):
        module.reset_running_stats()
    if isinstance(module, _FOLLOWERS) and getattr(module, "weight", None) is not None:
        with torch.no_grad():  # norms reset to the identity: give them random scales too
            module.weight.normal_(1.0, 0.5)
            module.bias.normal_(0.0, 0.5)


def spearman_within(a: Any, b: Any, brain: Any = None) -> float:
    """Spearman rank correlation of two maps over the brain's voxels (NaN if one is flat)."""
    x = np.asarray(a, dtype=np.float64).reshape(np.shape(a)[-3:])
    y = np.asarray(b, dtype=np.float64).reshape(np.shape(b)[-3:])
    keep = np.ones(x.shape, bool) if brain is None else np.asarray(brain).astype(bool)
    x, y = x[keep], y[keep]
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(np.corrcoef(rankdata(x), rankdata(y))[0, 1])


def cascading_randomisation(
    predictor: nn.Module,
    explain: Callable[[nn.Module], Any],
    images: Any,
    brain: Any = None,
    *,
    seed: int = 0,
    original: Any = None,
) -> pd.DataFrame:
    """Spearman correlation of each map with the trained model's, layers randomised top-down.

    Parameters
    ----------
    predictor : torch.nn.Module
        The trained predictor (never modified: the cascade works on copies).
    explain : callable
        ``explain(model) -> explainer`` with ``attribute(images)`` (the method under test,
        built around the given model). Amortised explainers must be refitted inside it.
    images : torch.Tensor of shape (N, 1, X, Y, Z)
        Images explained at every level.
    brain : array-like of bool or None, default=None
        The correlation is computed over these voxels.
    seed : int, default=0
        Seeds the re-initialisation.
    original : torch.Tensor or None, default=None
        The trained model's maps of ``images``, if already computed.

    Returns
    -------
    pandas.DataFrame
        One row per level (0 = trained model): ``level``, ``layer`` (the last layer
        randomised), ``spearman`` (mean over images), ``spearman_min`` and
        ``spearman_max``.
    """
    layers, values = cascade_spearman(predictor, explain, images, brain, seed=seed,
                                      original=original)
    return cascade_table(layers, values)


def cascade_spearman(
    predictor: nn.Module,
    explain: Callable[[nn.Module], Any],
    images: Any,
    brain: Any = None,
    *,
    seed: int = 0,
    original: Any = None,
    positions: Any = None,
) -> tuple[list[str], np.ndarray]:
    """Per-image correlations of :func:`cascading_randomisation`.

    The predictor's copy is randomised the same way whatever the images, and
    ``explain(model)`` is called at every level even when ``images`` is empty (so an
    explainer built collectively, such as a noise model refitted by every process of a
    ``torchrun`` job, is built by every process). With ``positions`` (the images' places
    in the whole compared set), each image is explained alone under
    :func:`~brainage_core._utils.torch.seeded` ``(seed, level, position)``, so random
    methods give a shard of the images the rows of the whole set.

    Returns
    -------
    layers : list of str
        The last layer randomised at each level after the trained model (level 1 first).
    values : numpy.ndarray of shape (N, levels)
        Spearman correlation of each image's map at each level with its original map.
    """
    x = torch.as_tensor(images, dtype=torch.float32)
    n = x.shape[0]

    def attribute(explainer: Any, level: int) -> Any:
        if positions is None:
            return explainer.attribute(x) if n else x
        return attribute_each(explainer, x, positions, seed, level)

    if original is None:
        original = attribute(explain(predictor), 0)
    original = torch.as_tensor(original)
    model = copy.deepcopy(predictor).eval()
    modules = dict(model.named_modules())
    layers, columns = [], []
    for level, (name, members) in enumerate(randomisation_levels(model), start=1):
        torch.manual_seed(seed + level)
        for member in members:
            _reinitialise(modules[member])
        maps = attribute(explain(model), level)
        layers.append(name)
        columns.append([spearman_within(maps[i], original[i], brain) for i in range(n)])
    return layers, np.asarray(columns, dtype=np.float64).reshape(len(layers), n).T


def cascade_table(layers: list[str], values: Any) -> pd.DataFrame:
    """The table of :func:`cascading_randomisation` from :func:`cascade_spearman`'s output."""
    values = np.asarray(values, dtype=np.float64).reshape(-1, len(layers))
    rows = [{"level": 0, "layer": "none", "spearman": 1.0, "spearman_min": 1.0,
             "spearman_max": 1.0}]
    for level, name in enumerate(layers, start=1):
        column = values[:, level - 1]
        finite = np.isfinite(column).any()
        rows.append(
            {
                "level": level,
                "layer": name,
                "spearman": float(np.nanmean(column)) if finite else 0.0,
                "spearman_min": float(np.nanmin(column)) if finite else 0.0,
                "spearman_max": float(np.nanmax(column)) if finite else 0.0,
            }
        )
    return pd.DataFrame(rows)


def sanity_verdict(table: pd.DataFrame, threshold: float = 0.5) -> dict[str, Any]:
    """Pass or fail of a :func:`cascading_randomisation` table.

    A method fails when its map, with *every* layer randomised, still has a mean Spearman
    correlation of at least ``threshold`` with the trained model's map.

    Returns
    -------
    dict
        ``sanity_spearman_top`` (after the output layer alone), ``sanity_spearman_all``
        (after every layer), ``sanity_pass`` (bool).
    """
    check_fraction("threshold", threshold)
    last = float(table["spearman"].iloc[-1])
    top = float(table["spearman"].iloc[1]) if len(table) > 1 else float("nan")
    return {
        "sanity_spearman_top": top,
        "sanity_spearman_all": last,
        "sanity_pass": bool(abs(last) < threshold),
    }
