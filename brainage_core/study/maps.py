"""The shared state of the map steps (notebooks 03, 04 and 06): a run's maps study."""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from torch import nn

from brainage_core._utils.validation import (
    BrainAgeInputError,
    check_choice,
    check_fraction,
    check_positive,
)
from brainage_core.analysis.truth import GridTruth, truth_on_cohort_grid
from brainage_core.explain.captum import CAPTUM_METHODS
from brainage_core.explain.noise.settings import NoiseSettings
from brainage_core.explain.noise.settings import field_names as noise_field_names
from brainage_core.models.distributed import check_num_workers
from brainage_core.study.rundir import RunDir

#: Names of the methods in tables and in ``metrics.json``.
NOISE = "noise"
NOISE_PER_SUBJECT = "noise_per_subject"
#: The model-free ceiling map |corr(intensity, age)| over the training split.
CEILING = "ceiling_age_correlation"
CEILING_MAP = "ceiling_age_correlation.nii.gz"
#: The random map (the floor).
RANDOM = "random"
#: The reference maps: scored like the methods, but they look at no model.
REFERENCES = (RANDOM, CEILING)



@dataclass
class MapsConfig:
    """Settings of the importance-map steps: the ``maps`` section of a study config.

    Attributes
    ----------
    noise : NoiseSettings
        The noise model's objective, declared in
        :class:`~brainage_core.explain.noise.settings.NoiseSettings`. In the config its
        fields are keys of the ``maps`` section itself: ``maps.lam`` (used as is unless
        ``calibrate`` is true), ``maps.s_min``, ``maps.s_max``, ``maps.target``,
        ``maps.perturbation``, ``maps.noise_sd``, ``maps.blur_sigma``, ``maps.loss`` and
        ``maps.seed`` (None or absent: the study's top-level ``seed``).
    channels, depth : int, default=8, 2
        Width and depth of the U-Net noise model.
    downsample : int, default=1
        The U-Net runs on the image pooled by this factor (see :class:`NoiseMapExplainer`).
    epochs, batch_size, lr : default=10, 8, 1e-2
        Training of the noise model (Adam).
    max_train_subjects : int or None, default=None
        Train the noise model on at most this many training subjects (a seeded random
        subset); None uses the whole training split.
    max_val_subjects : int or None, default=64
        Validation subjects evaluated after each epoch (None: all).
    num_threads : int or None, default=None
        Torch CPU threads of the map steps (None: leave torch's setting).
    device : str, default="auto"
        Where the map steps compute (the predictor, the noise model and the comparison
        methods): ``"auto"`` (the GPU of this process's ``LOCAL_RANK`` when CUDA is
        present, else the CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    amp : bool, default=True
        Mixed precision when the noise model trains on a GPU (bfloat16 where native,
        float16 with a gradient scaler elsewhere); ignored on the CPU.
    num_workers : int or "auto", default="auto"
        DataLoader worker processes feeding the noise model's training and validation
        (reading, float16 -> float32 conversion and batching off the main process; pinned
        memory on CUDA). ``"auto"``: 0 on the CPU, ``min(8, cpus per local process - 1)``
        on CUDA (:func:`~brainage_core.models.distributed.resolve_num_workers`).
    calibrate : bool, default=False
        Pick lambda with
        :func:`brainage_core.explain.noise.calibration.calibrate_lambda` before training.
    lambdas : list of float, default=[0.1, 0.3, 1, 3, 10, 30]
        Candidates of the calibration.
    tolerance : float, default=1.0
        Allowed mean shift ``|f(x~) - f(x)|`` (years) of the predictor on perturbed
        validation images.
    calibration_epochs : int, default=3
        Epochs per candidate lambda (each from the same initial weights).
    per_subject_steps, per_subject_lr : default=100, 0.1
        Optimisation of the per-subject (meaningful-perturbation style) maps: most steps,
        Adam learning rate.
    per_subject_coarse : int, default=2
        The per-subject logits live on a grid this many times coarser (upsampled).
    per_subject_fixed_noise : bool, default=True
        One noise draw for all steps (a deterministic objective).
    per_subject_match_mean_b : bool, default=True
        Hold the per-subject maps at the amortised model's mean B (its operating point
        on the explained images) instead of the paper's regulariser.
    per_subject_patience : int, default=20
        Stopping rule: steps without an improvement of the objective by 0.01 y.
    faithfulness_draws : int, default=4
        Noise draws averaged in the like-for-like faithfulness test.
    timing_subjects : int, default=3
        Subjects on which the amortised and per-subject modes are timed.
    age_band_width : float, default=10
        Width in years of the age bands of the population maps (decades).
    age_band_min_subjects : int, default=3
        Age bands with fewer test subjects get no map.
    min_region_voxels : int, default=3
        Regions with fewer voxels on the cohort's grid are left out of the region table.
    top_regions : int, default=10
        Length of the ranked list stored in ``metrics.json`` under ``regions.top``.
    baselines : list of str, default=every name of ``CAPTUM_METHODS``
        captum methods compared with the noise maps (see
        :data:`brainage_core.explain.captum.CAPTUM_METHODS`).
    ig_steps : int, default=50
        Integration steps of integrated gradients.
    shap_samples : int, default=16
        Noisy copies of SmoothGrad and samples of GradientShap.
    occlusion_mm : float, default=40
        Edge of the cubic occlusion window in mm (rounded to whole voxels of the grid).
    sanity_subjects : int, default=2
        Test subjects of the sanity check (cascading randomisation), of the robustness
        test and of the ROAD curves' first images (0 skips the sanity check and the
        robustness test).
    sanity_threshold : float, default=0.5
        A method fails the sanity check when its maps, with every layer of the predictor
        randomised, keep at least this mean Spearman correlation with the trained
        model's maps.
    sanity_epochs, sanity_train_subjects : int, default=2, 32
        The amortised noise model is refitted to each randomised predictor (and, for the
        reference map, to the trained one) for this many epochs on this many training
        subjects.
    robustness_noise : float, default=0.02
        Input noise of the robustness test, as a share of the intensity range.
    road_subjects : int, default=2
        Subjects of the ROAD curves (noisy linear imputation is the costly part).
    bootstrap : int, default=200
        Bootstrap resamples over subjects of the interval of each method's AUROC and of
        the region ranks (0 skips them).
    compare_subjects : int, default=8
        Test subjects on which all methods are compared (and the per-subject mode run).
    deletion_steps : int, default=10
        Points of the deletion curve.
    faithfulness_fraction : float, default=0.5
        Share of brain voxels noised in the fixed-noise faithfulness column (the first
        version's test: noise of ``s_max`` on that share, a harsher regime than the maps
        were trained for).
    weak_tail : float, default=0.05
        Truth voxels whose planted intensity change is below this are left out of the
        core scores (neither planted nor unplanted).
    region_coverage : float, default=0.5
        A region counts as planted when at least this share of its voxels is in the
        truth (coverage-based region truth).
    reliance_subjects : int, default=16
        Test subjects re-rendered to measure the predictor's reliance on each planted
        effect (synthetic cohorts only; see :mod:`brainage_core.analysis.reliance`; 0 skips it).
    reliance_delta : float, default=10.0
        Years by which each effect is aged in that measurement.
    allow_untrained_predictor : bool, default=False
        Run the map steps even though ``metrics.json`` records that the predictor did not
        learn (``prediction.learned: false``). Off by default: maps of a model that knows
        nothing about age explain nothing.
    """

    noise: NoiseSettings = field(default_factory=NoiseSettings)
    channels: int = 8
    depth: int = 2
    downsample: int = 1
    epochs: int = 10
    batch_size: int = 8
    lr: float = 1e-2
    max_train_subjects: int | None = None
    max_val_subjects: int | None = 64
    num_threads: int | None = None
    device: str = "auto"
    amp: bool = True
    num_workers: int | str = "auto"
    calibrate: bool = False
    lambdas: list[float] = field(default_factory=lambda: [0.1, 0.3, 1.0, 3.0, 10.0, 30.0])
    tolerance: float = 1.0
    calibration_epochs: int = 3
    per_subject_steps: int = 100
    per_subject_lr: float = 0.1
    per_subject_coarse: int = 2
    per_subject_fixed_noise: bool = True
    per_subject_match_mean_b: bool = True
    per_subject_patience: int = 20
    faithfulness_draws: int = 4
    weak_tail: float = 0.05
    region_coverage: float = 0.5
    timing_subjects: int = 3
    age_band_width: float = 10.0
    age_band_min_subjects: int = 3
    min_region_voxels: int = 3
    top_regions: int = 10
    baselines: list[str] = field(default_factory=lambda: list(CAPTUM_METHODS))
    ig_steps: int = 50
    shap_samples: int = 16
    occlusion_mm: float = 40.0
    sanity_subjects: int = 2
    sanity_threshold: float = 0.5
    sanity_epochs: int = 2
    sanity_train_subjects: int = 32
    robustness_noise: float = 0.02
    road_subjects: int = 2
    bootstrap: int = 200
    compare_subjects: int = 8
    deletion_steps: int = 10
    faithfulness_fraction: float = 0.5
    reliance_subjects: int = 16
    reliance_delta: float = 10.0
    allow_untrained_predictor: bool = False

    def __post_init__(self) -> None:
        check_positive("maps.tolerance", self.tolerance, allow_zero=True)
        check_positive("maps.weak_tail", self.weak_tail, allow_zero=True)
        check_fraction("maps.region_coverage", self.region_coverage, allow_one=True)
        for name in ("per_subject_fixed_noise", "per_subject_match_mean_b"):
            if not isinstance(getattr(self, name), bool):
                raise BrainAgeInputError(
                    f"'maps.{name}' must be true or false; {getattr(self, name)!r} was provided."
                )
        for name in ("lr", "per_subject_lr", "age_band_width", "reliance_delta"):
            check_positive(f"maps.{name}", getattr(self, name))
        for name in ("max_train_subjects", "max_val_subjects", "num_threads"):
            if getattr(self, name) is not None:
                check_positive(f"maps.{name}", getattr(self, name), integer=True)
        for name in (
            "channels",
            "depth",
            "downsample",
            "epochs",
            "batch_size",
            "calibration_epochs",
            "per_subject_steps",
            "timing_subjects",
            "age_band_min_subjects",
            "min_region_voxels",
            "top_regions",
            "ig_steps",
            "compare_subjects",
            "deletion_steps",
            "reliance_subjects",
            "per_subject_coarse",
            "per_subject_patience",
            "faithfulness_draws",
            "shap_samples",
            "sanity_subjects",
            "sanity_epochs",
            "sanity_train_subjects",
            "road_subjects",
            "bootstrap",
        ):
            check_positive(
                f"maps.{name}",
                getattr(self, name),
                integer=True,
                allow_zero=name
                in ("depth", "timing_subjects", "reliance_subjects", "sanity_subjects",
                    "road_subjects", "bootstrap"),
            )
        check_positive("maps.occlusion_mm", self.occlusion_mm)
        check_fraction("maps.sanity_threshold", self.sanity_threshold)
        check_fraction("maps.robustness_noise", self.robustness_noise)
        check_fraction("maps.faithfulness_fraction", self.faithfulness_fraction, allow_one=True)
        if not isinstance(self.device, str) or not (
            self.device in ("auto", "cpu") or self.device.startswith("cuda")
        ):
            raise BrainAgeInputError(
                f"'maps.device' must be 'auto', 'cpu' or 'cuda[:N]'; {self.device!r} was "
                "provided."
            )
        self.num_workers = check_num_workers("maps.num_workers", self.num_workers)
        for name in ("calibrate", "allow_untrained_predictor", "amp"):
            if not isinstance(getattr(self, name), bool):
                raise BrainAgeInputError(
                    f"'maps.{name}' must be true or false; {getattr(self, name)!r} was provided."
                )
        if not isinstance(self.lambdas, (list, tuple)) or not self.lambdas:
            raise BrainAgeInputError(
                f"'maps.lambdas' must be a non-empty list; {self.lambdas!r} was provided."
            )
        for lam in self.lambdas:
            check_positive("maps.lambdas", lam)

        if not isinstance(self.baselines, (list, tuple)):
            raise BrainAgeInputError(
                f"'maps.baselines' must be a list; {self.baselines!r} was provided."
            )
        for method in self.baselines:
            check_choice("maps.baselines", method, tuple(CAPTUM_METHODS))

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, *, seed: int | None = None) -> MapsConfig:
        """Build from the config's ``maps`` mapping; unknown keys are a clear error.

        Parameters
        ----------
        d : dict or None
            The section (None or {} gives the defaults).
        seed : int or None, default=None
            The study's top-level seed, used when the section sets none.
        """
        d = dict(d or {})
        noise_keys = noise_field_names()
        known = {f.name for f in fields(cls) if f.name != "noise"} | set(noise_keys)
        unknown = sorted(set(d) - known)
        if unknown:
            raise BrainAgeInputError(
                f"unknown key(s) in config section 'maps': {unknown}; it has {sorted(known)}"
            )
        noise = {k: d.pop(k) for k in noise_keys if k in d}
        if noise.get("seed") is None:
            noise["seed"] = 0 if seed is None else seed
        for name in ("lam", "s_min", "s_max", "noise_sd", "blur_sigma"):
            if isinstance(noise.get(name), int) and not isinstance(noise.get(name), bool):
                noise[name] = float(noise[name])
        d["noise"] = NoiseSettings.from_dict(noise, prefix="maps.")
        for name in (
            "lr",
            "per_subject_lr",
            "tolerance",
            "age_band_width",
            "faithfulness_fraction",
            "reliance_delta",
            "occlusion_mm",
            "sanity_threshold",
            "robustness_noise",
        ):
            if isinstance(d.get(name), int) and not isinstance(d.get(name), bool):
                d[name] = float(d[name])
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the settings, flat as in the config (YAML/JSON-ready)."""
        d = asdict(self)
        return {**d.pop("noise"), **d}

    def network_kwargs(self) -> dict[str, Any]:
        """The noise model's architecture: arguments of :class:`NoiseMapExplainer`."""
        return {"channels": self.channels, "depth": self.depth, "downsample": self.downsample}



# -- the study a map step works on ------------------------------------------------------------
@dataclass
class MapsStudy:
    """Everything a map step needs, opened from a run folder.

    Attributes
    ----------
    run : RunDir
        The run folder.
    config : dict
        Its resolved configuration.
    settings : MapsConfig
        The ``maps`` section.
    cohort : PreparedCohort
        The prepared cohort of the ``data`` section.
    predictor : torch.nn.Module
        The trained predictor (eval mode).
    """

    run: RunDir
    config: dict[str, Any]
    settings: MapsConfig
    cohort: Any
    predictor: nn.Module
    truth: GridTruth | None = None

    @classmethod
    def open(
        cls,
        run_dir: str | os.PathLike,
        *,
        overrides: dict[str, Any] | None = None,
        progress: bool = True,
    ) -> MapsStudy:
        """Open the run: read the config, load the cohort and the trained predictor.

        Parameters
        ----------
        run_dir : str or os.PathLike
            The run folder (with ``config.yaml`` and ``checkpoints/predictor.pt``).
        overrides : dict or None, default=None
            ``maps`` settings replacing the config's (notebook knobs); None values are
            ignored.
        progress : bool, default=True
            Show progress bars while the cohort is loaded.
        """
        from brainage_core.data.cohort import load_cohort
        from brainage_core.models.distributed import init_distributed
        from brainage_core.models.training import load_predictor

        run = RunDir(run_dir)
        config = run.load_config()
        section = dict(config.get("maps") or {})
        section.update({k: v for k, v in (overrides or {}).items() if v is not None})
        settings = MapsConfig.from_dict(section, seed=config.get("seed", 0))
        check_predictor_learned(run, settings)  # before the (slow) cohort load
        if settings.num_threads is not None:
            torch.set_num_threads(settings.num_threads)
        cohort = load_cohort(config["data"], progress=progress)
        ckpt = run.predictor_checkpoint
        if not ckpt.is_file():
            raise BrainAgeInputError(
                "no trained predictor: run notebooks/02_train.ipynb first", ckpt
            )
        # under torchrun this joins the process group; every process on its own device
        device = init_distributed(settings.device).device
        predictor = load_predictor(ckpt, map_location=device)
        return cls(run=run, config=config, settings=settings, cohort=cohort, predictor=predictor)

    # -- data -------------------------------------------------------------------------------
    def dataset(self, split: str) -> Any:
        """The :class:`~brainage_core.data.datasets.CohortDataset` of one split."""
        from brainage_core.data.datasets import CohortDataset

        return CohortDataset(self.cohort, split=split)

    def subset(self, split: str, n: int | None) -> Any:
        """A dataset of at most ``n`` subjects of a split (a seeded random subset)."""
        from brainage_core.data.datasets import CohortDataset

        idx = self.indices(split)
        if n is not None and len(idx) > n:
            rng = np.random.default_rng(self.settings.noise.seed)
            idx = np.sort(rng.choice(idx, size=int(n), replace=False))
        return CohortDataset(self.cohort, indices=idx)

    def indices(self, split: str = "test", n: int | None = None) -> np.ndarray:
        """Cohort positions of a split's subjects (the first ``n`` if given)."""
        idx = np.asarray(self.cohort.indices(split))
        return idx if n is None else idx[: int(n)]

    def images(self, indices: Any) -> torch.Tensor:
        """Images of the given subjects as a float32 tensor ``(N, 1, X, Y, Z)``."""
        arr = np.stack([self.cohort.image(int(i)) for i in indices]).astype(np.float32)
        return torch.from_numpy(arr)[:, None]

    def ages(self, indices: Any) -> np.ndarray:
        return self.cohort.table["age"].to_numpy(dtype=float)[np.asarray(indices, dtype=int)]

    def participant_ids(self, indices: Any) -> list[str]:
        """Keys of the given rows: ``sub-<label>``, with ``_ses-``/``_run-`` when the
        cohort keeps several sessions or runs per subject (map file names use them)."""
        from brainage_core.data.manifest import image_labels

        ids = image_labels(self.cohort.table)
        return [ids[int(i)] for i in indices]

    @property
    def noise_checkpoint(self) -> Path:
        return self.run.noise_checkpoint

    def atlas(self) -> Any:
        """The Harvard–Oxford atlas on the cohort's grid."""
        from brainage_core.data.atlas import load_atlas

        return load_atlas(self.cohort.resolution)


# -- 03: per-subject maps ------------------------------------------------------------------

def read_subject_maps(study: MapsStudy) -> pd.DataFrame:
    """The index of per-subject maps written by :func:`write_subject_maps` (absolute paths)."""
    path = study.run.table("subject_maps")
    if not path.is_file():
        raise BrainAgeInputError("no per-subject maps: run notebooks/03_explain.ipynb first", path)
    table = pd.read_csv(path)
    table["path"] = [str(study.run.root / p) for p in table["path"]]
    return table


def merge_metrics(study: MapsStudy, method: str, values: dict[str, Any]) -> None:
    current = study.run.read_metrics().get("maps", {}).get(method, {})
    study.run.update_metrics("maps", {method: {**current, **values}})


# -- 04: population maps, regions, ground truth -------------------------------------------
def load_truth(study: MapsStudy) -> GridTruth | None:
    """The ground truth of the run's cohort on its grid; None for real data.

    ``study.truth``, when set, is returned as is.
    """
    if study.truth is not None:
        return study.truth
    return truth_on_cohort_grid(study.cohort, weak_tail=study.settings.weak_tail)


def check_predictor_learned(run: RunDir, settings: MapsConfig) -> None:
    """Refuse a predictor that did not learn, unless the settings allow it.

    Parameters
    ----------
    run : RunDir
        The run folder; its ``metrics.json`` ``prediction.learned`` is read (a run written
        before that key existed passes).
    settings : MapsConfig
        The ``maps`` section (``allow_untrained_predictor``).

    Raises
    ------
    BrainAgeInputError
        Naming ``metrics.json``, if ``prediction.learned`` is false and
        ``maps.allow_untrained_predictor`` is not true.
    """
    prediction = run.read_metrics().get("prediction") or {}
    if prediction.get("learned") is not False:
        return
    if settings.allow_untrained_predictor:
        warnings.warn(
            "the predictor did not learn (metrics.json prediction.learned: false); its maps "
            "are made only because maps.allow_untrained_predictor is true.",
            stacklevel=2,
        )
        return
    raise BrainAgeInputError(
        f"the predictor did not learn (validation MAE {prediction.get('val_mae')} y, not below "
        f"0.8 x {prediction.get('mean_predictor_val_mae')} y of predicting the mean age), so "
        "its maps would explain nothing; retrain it, or set "
        "-p maps.allow_untrained_predictor true to make them anyway.",
        run.metrics_path,
    )


def truth_mask_image(run_dir: str | os.PathLike) -> nib.Nifti1Image | None:
    """The planted ground-truth mask of a run's synthetic cohort (its own grid); None for
    real data or before the data step has run."""
    root = RunDir(run_dir).read_metrics().get("data", {}).get("source_root")
    if not root or not (Path(root) / "derivatives" / "ground_truth").is_dir():
        return None
    from brainage_core.data.synth.cohort import load_ground_truth

    return load_ground_truth(root).mask_img


def population_images(run_dir: str | os.PathLike) -> dict[str, nib.Nifti1Image]:
    """A run's population map and age-band maps, labelled for a viewer's menu."""
    run = RunDir(run_dir)
    maps = run.maps
    out: dict[str, nib.Nifti1Image] = {}
    population = run.population_map
    if population.is_file():
        out["population (all test subjects)"] = nib.load(population)
    bands = []
    for path in maps.glob("population_age-*_importance.nii.gz"):
        lo, hi = path.name[len("population_age-"):-len("_importance.nii.gz")].split("-")
        bands.append((float(lo), lo, hi, path))
    for _, lo, hi, path in sorted(bands):
        out[f"age {lo}-{hi}"] = nib.load(path)
    return out
