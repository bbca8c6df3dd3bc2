"""One run = one folder: the layout every notebook and command agrees on.

::

    runs/<name>/
        config.yaml          the resolved configuration of the run
        notebooks/           executed notebooks, NN_step.ipynb
        checkpoints/         predictor and noise-model checkpoints
        maps/                NIfTI importance maps (template space)
        tables/              CSV tables (predictions, regions, ...)
        figures/             static figures
        metrics.json         {"data": {...}, "prediction": {...}, "maps": {...}, "regions": {...}}
        qc/reference.npz     the training cohort's QC reference (intensities, OOD features)
        index.json           what ``predict`` needs: files (relative, with SHA-256), grid,
                             preprocessing, bias correction, QC reference figures

Notebooks, steps and benchmarks find each other's artefacts through this class (for
example :attr:`RunDir.predictor_checkpoint`, :meth:`RunDir.table`), never through typed
paths.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any

import yaml

from brainage_core._utils.io import write_json, write_text
from brainage_core._utils.validation import BrainAgeInputError
from brainage_core.analysis.population import POPULATION_FILE

#: The run's tables by name (``tables/<file>``): one place that spells their file names.
TABLES = {
    "participants": "participants.csv",
    "qc": "qc.csv",
    "predictions": "predictions.csv",
    "lambda_calibration": "lambda_calibration.csv",
    "subject_maps": "subject_maps.csv",
    "regions": "regions.csv",
    "effect_reliance": "effect_reliance.csv",
    "method_comparison": "method_comparison.csv",
    "deletion_curves": "deletion_curves.csv",
    "sanity_checks": "sanity_checks.csv",
    "region_rank_intervals": "region_rank_intervals.csv",
}


#: Files ``predict`` needs, by name, relative to the run folder (listed in ``index.json``).
PREDICT_FILES = {
    "config": "config.yaml",
    "predictor": "checkpoints/predictor.pt",
    "qc_reference": "qc/reference.npz",
}

#: Files ``predict --maps`` needs besides :data:`PREDICT_FILES`.
MAPS_FILES = {"noise_model": "checkpoints/noise_model.pt"}


class RunDir:
    """Paths and shared state of one study run.

    Parameters
    ----------
    root : str or os.PathLike
        The run folder. It is created on first write, not on construction.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    # -- layout ---------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.json"

    def subdir(self, name: str) -> Path:
        """Return ``root/name``, created if needed."""
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def notebooks(self) -> Path:
        return self.subdir("notebooks")

    @property
    def checkpoints(self) -> Path:
        return self.subdir("checkpoints")

    @property
    def maps(self) -> Path:
        return self.subdir("maps")

    @property
    def tables(self) -> Path:
        return self.subdir("tables")

    @property
    def figures(self) -> Path:
        return self.subdir("figures")

    @property
    def logs(self) -> Path:
        """``logs/``: the output of the steps run under ``torchrun`` (``launch-<step>.log``)."""
        return self.subdir("logs")

    # -- named artefacts ------------------------------------------------------------------
    @property
    def predictor_checkpoint(self) -> Path:
        """``checkpoints/predictor.pt``: the trained predictor (step 02)."""
        return self.checkpoints / "predictor.pt"

    @property
    def noise_checkpoint(self) -> Path:
        """``checkpoints/noise_model.pt``: the amortised noise model (step 03)."""
        return self.checkpoints / "noise_model.pt"

    @property
    def index_path(self) -> Path:
        """``index.json``: the files and settings ``predict`` needs (portable run)."""
        return self.root / "index.json"

    @property
    def qc_reference(self) -> Path:
        """``qc/reference.npz``: the training cohort's QC reference."""
        return self.root / PREDICT_FILES["qc_reference"]

    def read_index(self) -> dict[str, Any]:
        """Read ``index.json``; a missing or malformed index is a clear error."""
        if not self.index_path.is_file():
            raise BrainAgeInputError(
                "no index.json in this run folder: it is written by notebooks/02_train.ipynb "
                "(or call brainage_core.study.predict.write_predict_index on the run)",
                self.root,
            )
        try:
            index = json.loads(self.index_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise BrainAgeInputError(f"not valid JSON: {err}", self.index_path) from err
        if not isinstance(index, dict) or "files" not in index:
            raise BrainAgeInputError("not a run index (no 'files')", self.index_path)
        return index

    def subject_map(self, participant_id: str) -> Path:
        """``maps/<participant_id>_importance.nii.gz``: one subject's importance map."""
        return self.maps / f"{participant_id}_importance.nii.gz"

    @property
    def population_map(self) -> Path:
        """``maps/population_importance.nii.gz``: the population map (step 04)."""
        return self.maps / POPULATION_FILE

    def method_map(self, method: str) -> Path:
        """``maps/method-<method>_mean.nii.gz``: a compared method's mean map (step 06)."""
        return self.maps / f"method-{method}_mean.nii.gz"

    def method_subject_map(self, method: str) -> Path:
        """``maps/method-<method>_subject.nii.gz``: a compared method's map of the first
        compared subject (step 06)."""
        return self.maps / f"method-{method}_subject.nii.gz"

    @property
    def maps_source(self) -> Path:
        """``maps/.maps_source.json``: which noise model made the subject maps."""
        return self.maps / ".maps_source.json"

    def table(self, name: str) -> Path:
        """``tables/<file>`` of the table ``name`` (a key of :data:`TABLES`)."""
        if name not in TABLES:
            raise BrainAgeInputError(
                f"'name' must be one of {sorted(TABLES)}; {name!r} was provided."
            )
        return self.tables / TABLES[name]

    # -- configuration --------------------------------------------------------------------
    def load_config(self) -> dict[str, Any]:
        """Read ``config.yaml``; a missing or malformed file is a clear error."""
        if not self.config_path.is_file():
            raise BrainAgeInputError(
                "no config.yaml in this run folder; create the run with "
                "'brainage-study run' or write one with RunDir.write_config().",
                self.root,
            )
        try:
            config = yaml.safe_load(self.config_path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise BrainAgeInputError(f"not valid YAML: {err}", self.config_path) from err
        if not isinstance(config, dict):
            raise BrainAgeInputError("must hold a mapping at the top level", self.config_path)
        return config

    def write_config(self, config: dict[str, Any]) -> Path:
        """Write the resolved configuration atomically."""
        return write_text(self.config_path, yaml.safe_dump(config, sort_keys=False))

    # -- metrics --------------------------------------------------------------------------
    def read_metrics(self) -> dict[str, Any]:
        """Return ``metrics.json`` as a dict (empty if the run has none yet)."""
        if not self.metrics_path.is_file():
            return {}
        return json.loads(self.metrics_path.read_text(encoding="utf-8"))

    def update_metrics(self, section: str, values: dict[str, Any]) -> dict[str, Any]:
        """Merge ``values`` into ``metrics[section]`` and write the file atomically.

        A lock file serialises concurrent writers (for example several map-extraction
        workers), so no update is lost.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".metrics.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            metrics = self.read_metrics()
            metrics.setdefault(section, {}).update(values)
            write_json(self.metrics_path, metrics)
        return metrics
