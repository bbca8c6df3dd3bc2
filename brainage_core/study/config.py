"""Study configuration: presets, config files, ``-p KEY VALUE`` overrides and run names.

A configuration is a nested mapping with five top-level keys::

    name: quick            # becomes part of the run name
    seed: 0
    data: {...}            # data source, cache grid and the synthetic cohort
    prediction: {...}      # the brain-age predictor (brainage_core.models.training.TrainConfig)
    maps: {...}            # the noise-model importance maps

It is resolved in three layers, each overriding the one before: a preset shipped with the
package (``quick``, ``default``, ``paper``), an optional YAML file, and dotted-key
overrides such as ``prediction.epochs=3``. The contents of ``prediction``, ``maps`` and
``data.synthetic`` are validated by the modules that use them (their ``from_dict``), so an
unknown or ill-typed key fails here, before any notebook runs.

Examples
--------
>>> config = load_config("quick", overrides=[("prediction.epochs", "3")])
>>> config["prediction"]["epochs"]
3
>>> run_name(config)  # doctest: +SKIP
'quick-1a2b3c4d'
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from importlib import resources
from typing import Any

import yaml

from brainage_core._utils.io import read_yaml_mapping
from brainage_core._utils.validation import BrainAgeInputError, check_choice
from brainage_core.data.cohort import resolve_data_config
from brainage_core.data.sources.bids import BidsSelection
from brainage_core.data.synth import SynthConfig
from brainage_core.models.training import TrainConfig
from brainage_core.study.maps import MapsConfig

#: Presets shipped in ``brainage_core/presets/<name>.yaml``.
PRESETS = ("quick", "default", "paper")

#: Top-level keys of a configuration, in the order ``config.yaml`` lists them.
TOP_LEVEL_KEYS = ("name", "seed", "data", "prediction", "maps")

#: Validators of the sections owned by other modules: dotted section -> a function that
#: raises :class:`BrainAgeInputError` on a bad key or value. Each module declares its own
#: settings once; this table only says which one owns which section.
SECTION_VALIDATORS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "data": resolve_data_config,
    "data.synthetic": SynthConfig.from_dict,
    "data.bids": BidsSelection.from_dict,
    "prediction": TrainConfig.from_dict,
    "maps": MapsConfig.from_dict,
}

_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# -- loading ------------------------------------------------------------------------------
def load_preset(name: str) -> dict[str, Any]:
    """Return a copy of the preset ``name`` (one of :data:`PRESETS`)."""
    check_choice("preset", name, PRESETS)
    text = resources.files("brainage_core").joinpath("presets", f"{name}.yaml").read_text(
        encoding="utf-8"
    )
    return yaml.safe_load(text)


def load_config(
    preset: str | None = None,
    config_file: str | os.PathLike | None = None,
    overrides: Iterable[tuple[str, Any]] = (),
    *,
    validate: bool = True,
) -> dict[str, Any]:
    """Resolve a study configuration from a preset, a YAML file and overrides.

    Parameters
    ----------
    preset : {"quick", "default", "paper"} or None, default=None
        The preset to start from. ``None`` means ``"default"``.
    config_file : str or os.PathLike or None, default=None
        A YAML file whose mapping is merged key by key over the preset. It may be partial
        (for example only ``prediction: {epochs: 5}``).
    overrides : iterable of (str, object), default=()
        Dotted keys and values, applied last, e.g. ``[("prediction.epochs", "3")]``.
        String values are parsed as YAML, so ``"3"`` is an integer, ``"[1, 2]"`` a list
        and ``"null"`` is None.
    validate : bool, default=True
        Check the result with :func:`validate_config`.

    Returns
    -------
    dict
        The resolved configuration (a fresh, plain, JSON-compatible dict).

    Raises
    ------
    BrainAgeInputError
        For an unknown preset, an unreadable file, an unknown key or an invalid value; the
        message names the file or the key.
    """
    config = load_preset("default" if preset is None else preset)
    if config_file is not None:
        config = merge(config, _read_yaml_mapping(config_file), source=os.fspath(config_file))
    for key, value in overrides:
        set_dotted(config, key, parse_value(value))
    config = _plain(config)
    if validate:
        validate_config(config)
    return config


def _read_yaml_mapping(path: str | os.PathLike) -> dict[str, Any]:
    data = read_yaml_mapping(path, what="config sections")
    unknown = sorted(set(data) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise BrainAgeInputError(
            f"unknown top-level key(s) {unknown}; a config has {list(TOP_LEVEL_KEYS)}", path
        )
    return data


def merge(base: Mapping[str, Any], update: Mapping[str, Any], *, source: str = "") -> dict:
    """Return ``base`` with ``update`` merged into it, mapping by mapping.

    Mappings are merged recursively; any other value (lists included) replaces the old one.
    """
    result = copy.deepcopy(dict(base))
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(result.get(key), Mapping):
            result[key] = merge(result[key], value, source=source)
        else:
            result[key] = copy.deepcopy(value)
    return result


def parse_value(value: Any) -> Any:
    """Parse an override value given on the command line as YAML.

    Non-string values (from Python callers) are returned unchanged.
    """
    if not isinstance(value, str):
        return value
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def set_dotted(config: dict[str, Any], key: str, value: Any) -> None:
    """Set ``config[a][b][c] = value`` for the dotted key ``"a.b.c"`` in place.

    The first part must be a known top-level key; a missing intermediate mapping is
    created. Whether the leaf key exists is checked by :func:`validate_config`.
    """
    parts = key.split(".")
    if not key or any(not part for part in parts):
        raise BrainAgeInputError(f"override key {key!r} is not a dotted key like 'maps.epochs'")
    if parts[0] not in TOP_LEVEL_KEYS:
        raise BrainAgeInputError(
            f"unknown config key {key!r}: {parts[0]!r} is not a config section; "
            f"choose one of {list(TOP_LEVEL_KEYS)} (e.g. 'prediction.epochs')"
        )
    node = config
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            raise BrainAgeInputError(
                f"cannot set {key!r}: {where!r} holds the value {child!r}, not a section"
            )
        node = child
    node[parts[-1]] = value


# -- validation ---------------------------------------------------------------------------
def validate_config(config: Mapping[str, Any]) -> None:
    """Check a resolved configuration; raise :class:`BrainAgeInputError` naming the key.

    The top level, the ``data`` section and the seed are checked here; ``prediction``,
    ``maps`` and ``data.synthetic`` are handed to their modules' ``from_dict``.
    """
    if not isinstance(config, Mapping):
        raise BrainAgeInputError(f"a config must be a mapping; {type(config).__name__} given")
    unknown = sorted(set(config) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise BrainAgeInputError(
            f"unknown config key(s) {unknown}; the top level has {list(TOP_LEVEL_KEYS)}"
        )
    missing = [key for key in ("name", "data") if key not in config]
    if missing:
        raise BrainAgeInputError(f"config is missing the key(s) {missing}")
    name = config["name"]
    if not isinstance(name, str) or not _NAME_PATTERN.match(name):
        raise BrainAgeInputError(
            f"'name' must be a short name of letters, digits, '-', '_' or '.' (it names the "
            f"run folder); {name!r} was provided."
        )
    seed = config.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise BrainAgeInputError(f"'seed' must be a non-negative integer; {seed!r} was provided.")
    for section in ("data", "prediction", "maps"):
        value = config.get(section, {})
        if value is not None and not isinstance(value, Mapping):
            raise BrainAgeInputError(
                f"config section {section!r} must be a mapping; {value!r} was provided."
            )
    for section, validator in SECTION_VALIDATORS.items():
        values = _get_dotted(config, section)
        if values is None:
            continue
        try:
            validator(dict(values))
        except BrainAgeInputError as err:
            raise BrainAgeInputError(f"config section {section!r}: {err}") from err
        except (TypeError, ValueError, KeyError) as err:
            raise BrainAgeInputError(f"config section {section!r}: {err}") from err






def _get_dotted(config: Mapping[str, Any], key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _plain(config: Mapping[str, Any]) -> dict[str, Any]:
    """Return a JSON-compatible deep copy (tuples become lists); reject other types."""
    try:
        return json.loads(json.dumps(config))
    except TypeError as err:
        raise BrainAgeInputError(
            f"config values must be YAML scalars, lists or maps: {err}"
        ) from err


# -- run names ----------------------------------------------------------------------------
def config_hash(config: Mapping[str, Any], length: int = 8) -> str:
    """Return a short, stable hash of a configuration (key order does not matter)."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def run_name(config: Mapping[str, Any]) -> str:
    """Return the run folder name ``<name>-<hash>`` of a configuration.

    Two configurations that differ in any value get different names, so a run with other
    parameters never overwrites another.
    """
    return f"{config['name']}-{config_hash(config)}"


def dump_config(config: Mapping[str, Any]) -> str:
    """Return the configuration as YAML, top-level keys in their canonical order."""
    ordered = {key: config[key] for key in TOP_LEVEL_KEYS if key in config}
    return yaml.safe_dump(ordered, sort_keys=False, default_flow_style=None)
