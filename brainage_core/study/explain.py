"""The importance-map steps of a study run, as the notebooks call them.

A run folder (:class:`~brainage_core.study.rundir.RunDir`) holds the configuration, the trained
predictor and everything the map steps write:

* ``checkpoints/noise_model.pt``: the amortised noise model (resumable);
* ``tables/lambda_calibration.csv``: the MAE–noise trade-off curve, if lambda was
  calibrated;
* ``maps/sub-XXXX_importance.nii.gz``: per-subject maps (template space), indexed by
  ``tables/subject_maps.csv``;
* ``maps/population_importance.nii.gz`` and ``population_age-<lo>-<hi>_importance.nii.gz``;
* ``tables/regions.csv``, ``tables/method_comparison.csv``, ``tables/deletion_curves.csv``;
* ``metrics.json`` sections ``maps`` ({method: {localisation_auroc, relevance_mass,
  deletion_auc, ms_per_subject, ...}}) and ``regions`` ({"top": [...]}).

Each function here is one step of notebooks ``03_explain``, ``04_average`` and
``06_compare_methods``; they hold no computation of their own beyond wiring.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from dataclasses import dataclass, replace
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from brainage_core._utils.io import save_nifti, write_json, write_table
from brainage_core._utils.validation import BrainAgeInputError
from brainage_core.data.cache import check_shard
from brainage_core.explain.noise.amortised import NoiseMapExplainer, read_checkpoint
from brainage_core.explain.noise.calibration import calibrate_lambda
from brainage_core.explain.noise.per_subject import PerSubjectNoiseMap
from brainage_core.study.maps import (
    NOISE,
    NOISE_PER_SUBJECT,
    MapsStudy,
    merge_metrics,
)


# -- 03: fit the noise model ---------------------------------------------------------------
@dataclass
class FitResult:
    """Outcome of :func:`fit_noise_model`.

    Attributes
    ----------
    explainer : NoiseMapExplainer
        The trained amortised explainer.
    calibration : pandas.DataFrame or None
        The lambda trade-off curve, if lambda was calibrated.
    train_seconds : float
        Total training time of the noise model (all epochs, resumed ones included).
    """

    explainer: NoiseMapExplainer
    calibration: pd.DataFrame | None
    train_seconds: float


def fit_noise_model(study: MapsStudy, *, progress: bool = True) -> FitResult:
    """Fit (or resume, or load) the amortised noise model of the run.

    If ``maps.calibrate`` is true, lambda is first calibrated on the training and
    validation splits (once: the curve is kept in ``tables/lambda_calibration.csv`` and
    reused). The model trains on the training split with the validation split monitored,
    checkpointing to ``checkpoints/noise_model.pt`` after every epoch; a complete
    checkpoint with the same settings is loaded instead. A checkpoint with other settings
    (the config changed) is replaced, with a warning.
    """
    s = study.settings
    noise = s.noise
    curve = None
    if s.calibrate:
        curve = _calibration_curve(study, progress=progress)
        noise = replace(noise, lam=float(curve.loc[curve["chosen"], "lam"].iloc[0]))
    explainer = NoiseMapExplainer(
        study.predictor, noise, mask=study.cohort.mask, **s.network_kwargs()
    )
    resume = True
    if study.noise_checkpoint.is_file():
        try:
            stored = read_checkpoint(study.noise_checkpoint)["settings"]
        except BrainAgeInputError as err:  # an older layout, or a damaged file
            stored = str(err)
        if not explainer.matches(stored):
            warnings.warn(
                f"{study.noise_checkpoint}: trained with {stored}, the config now asks for "
                f"{explainer.settings()}; training a new noise model.",
                stacklevel=2,
            )
            resume = False
    explainer.fit(
        study.subset("train", s.max_train_subjects),
        study.subset("val", s.max_val_subjects),
        epochs=s.epochs,
        batch_size=s.batch_size,
        lr=s.lr,
        checkpoint_path=study.noise_checkpoint,
        resume=resume,
        progress=progress,
        num_workers=s.num_workers,
        amp=s.amp,
    )
    seconds = float(explainer.history_["seconds"].sum())
    if not _is_main_process():  # under torchrun, rank 0 alone writes the run's files
        return FitResult(explainer=explainer, calibration=curve, train_seconds=seconds)
    study.run.update_metrics(
        "maps",
        {
            NOISE: {
                **study.run.read_metrics().get("maps", {}).get(NOISE, {}),
                "lam": explainer.noise.lam,
                "epochs": explainer.epochs_trained,
                "train_seconds": seconds,
                "target": explainer.noise.target,
            }
        },
    )
    return FitResult(explainer=explainer, calibration=curve, train_seconds=seconds)


def load_noise_model(study: MapsStudy) -> NoiseMapExplainer:
    """The trained noise model of the run (``checkpoints/noise_model.pt``)."""
    if not study.noise_checkpoint.is_file():
        raise BrainAgeInputError(
            "no trained noise model: run notebooks/03_explain.ipynb first", study.noise_checkpoint
        )
    return NoiseMapExplainer.load(study.noise_checkpoint, study.predictor, mask=study.cohort.mask)


def _calibration_curve(study: MapsStudy, *, progress: bool) -> pd.DataFrame:
    path = study.run.table("lambda_calibration")
    s = study.settings
    if path.is_file():
        curve = pd.read_csv(path)
        same = sorted(curve["lam"].tolist()) == sorted(float(v) for v in s.lambdas)
        if same and "tolerance" in curve and float(curve["tolerance"].iloc[0]) == s.tolerance:
            return curve
    result = calibrate_lambda(
        study.predictor,
        study.subset("train", s.max_train_subjects),
        study.subset("val", s.max_val_subjects),
        lambdas=s.lambdas,
        tolerance=s.tolerance,
        settings=s.noise,
        explainer_kwargs={"mask": study.cohort.mask, **s.network_kwargs()},
        fit_kwargs={"epochs": s.calibration_epochs, "batch_size": s.batch_size, "lr": s.lr},
        progress=progress,
    )
    curve = result.curve.assign(tolerance=s.tolerance)
    if _is_main_process():
        write_table(path, curve)
    return curve


def _is_main_process() -> bool:
    """False in the processes of a ``torchrun`` job but rank 0."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def write_subject_maps(
    study: MapsStudy,
    explainer: Any,
    *,
    split: str = "test",
    shard: tuple[int, int] | None = None,
    resume: bool = True,
    progress: bool = True,
) -> pd.DataFrame:
    """Explain every subject of a split and save the maps as NIfTI in template space.

    The step is resumable and can be sharded. Every map records in its own NIfTI header
    (``descrip``: ``noise_model:<sha256>``) the SHA-256 of the
    ``checkpoints/noise_model.pt`` that made it. With ``resume``, a subject whose map
    exists and records the current noise model is not explained again, so an interrupted
    run picks up where it stopped; a map of another (or unknown) origin is made again.
    With ``shard=(i, n)``, only every ``n``-th subject starting at ``i`` is explained:
    start ``n`` processes (or ``torchrun`` ranks) with ``i = 0 .. n-1`` once the noise
    model is trained, at the same moment if you like, then call once more without
    ``shard`` to collect the index. Shards never delete a file, so they cannot undo each
    other's work; only the unsharded call removes the maps of another noise model and
    records the current one in ``maps/.maps_source.json`` (for people reading the folder).

    Parameters
    ----------
    study : MapsStudy
        The run.
    explainer : object with ``attribute(x)``
        The run's trained noise model (or any captum-like explainer, with
        ``resume=False``).
    split : str, default="test"
        The split to explain.
    shard : tuple of (int, int) or None, default=None
        ``(index, count)`` of this worker's share; None explains (or collects) all.
    resume : bool, default=True
        Keep the existing maps of the run's noise model; False explains every subject
        again (needed when ``explainer`` is not the noise model of
        ``checkpoints/noise_model.pt``).
    progress : bool, default=True
        Show a progress bar.

    Returns
    -------
    pandas.DataFrame
        ``participant_id``, ``age``, ``split``, ``path`` (relative to the run folder) of
        the subjects of this call; without ``shard`` also written to
        ``tables/subject_maps.csv``.
    """
    indices = study.indices(split)
    if shard is not None:
        index, count = check_shard(shard)
        indices = indices[index::count]
    digest = _noise_model_digest(study)
    if resume:
        source = digest
        if shard is None:
            _remove_stale_maps(study, digest)
    else:  # maps of unknown origin: a later resume must not trust them
        if shard is None:
            study.run.maps_source.unlink(missing_ok=True)
        source = None
    todo = [i for i in indices if not _map_is_current(study, i, source)]
    batch = study.settings.batch_size
    for start in tqdm(
        range(0, len(todo), batch), desc=f"maps ({split})", disable=None if progress else True
    ):
        chunk = np.asarray(todo[start : start + batch])
        maps = explainer.attribute(study.images(chunk))
        for pid, arr in zip(study.participant_ids(chunk), maps[:, 0].numpy(), strict=True):
            image = study.cohort.to_image(arr.astype(np.float32))
            image.header["descrip"] = _source_tag(source)
            save_nifti(image, study.run.subject_map(pid))
    table = pd.DataFrame(
        {
            "participant_id": study.participant_ids(indices),
            "age": [float(a) for a in study.ages(indices)],
            "split": split,
            "path": [
                os.path.relpath(study.run.subject_map(pid), study.run.root)
                for pid in study.participant_ids(indices)
            ],
        },
        columns=["participant_id", "age", "split", "path"],
    )
    if shard is None:
        write_table(study.run.table("subject_maps"), table)
    return table


#: How a map's NIfTI header names the noise model that made it (``descrip``, 80 bytes).
_SOURCE_PREFIX = "noise_model:"


def _source_tag(source: str | None) -> bytes:
    return (_SOURCE_PREFIX + source).encode() if source else b"unknown origin"


def _noise_model_digest(study: MapsStudy) -> str | None:
    """SHA-256 of the run's noise-model checkpoint (None before one exists)."""
    ckpt = study.noise_checkpoint
    if not ckpt.is_file():
        return None
    h = hashlib.sha256()
    with open(ckpt, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _map_source(path: os.PathLike) -> str | None:
    """The noise-model digest a map's header records (None: unknown or unreadable)."""
    try:
        tag = nib.load(path).header["descrip"].item().rstrip(b"\0").decode("ascii")
    except Exception:  # noqa: BLE001 - a truncated or foreign file has no known source
        return None
    return tag[len(_SOURCE_PREFIX):] if tag.startswith(_SOURCE_PREFIX) else None


def _remove_stale_maps(study: MapsStudy, digest: str | None) -> None:
    """Unsharded calls only: delete subject maps of another noise model, then record the
    current one in ``maps/.maps_source.json``.

    Maps made by another noise model (or an unknown one) are never reused in any case
    (each map's header names its source); this keeps the folder free of them.
    """
    if digest is None:
        return
    record = study.run.maps_source
    try:
        previous = json.loads(record.read_text(encoding="utf-8")).get("noise_model_sha256")
    except (OSError, ValueError, AttributeError):
        previous = None
    if previous == digest:
        return
    for stale in study.run.maps.glob("*_importance.nii.gz"):
        if not stale.name.startswith("population") and _map_source(stale) != digest:
            stale.unlink(missing_ok=True)
    write_json(record, {"noise_model_sha256": digest})


def _map_is_current(study: MapsStudy, index: int, source: str | None) -> bool:
    if source is None:
        return False
    path = study.run.subject_map(study.participant_ids([index])[0])
    if not path.is_file():
        return False
    try:
        image = nib.load(path)
        shape = tuple(image.shape)
        tag = image.header["descrip"].item().rstrip(b"\0").decode("ascii")
    except Exception:  # noqa: BLE001 - a truncated or foreign file: explain it again
        return False
    return shape == tuple(study.cohort.mask.shape) and tag == _SOURCE_PREFIX + source


def time_methods(
    study: MapsStudy, explainer: NoiseMapExplainer, *, n_subjects: int | None = None
) -> pd.DataFrame:
    """Milliseconds per subject: one amortised forward pass vs per-subject optimisation.

    Both explain the same first ``n_subjects`` test subjects, one at a time. The figures
    go to ``metrics.json`` (``maps.<method>.ms_per_subject``).
    """
    n = study.settings.timing_subjects if n_subjects is None else int(n_subjects)
    indices = study.indices("test", n)
    if len(indices) == 0:
        return pd.DataFrame(columns=["method", "ms_per_subject", "n_subjects"])
    images = study.images(indices)
    per_subject = per_subject_explainer(study, explainer, images)
    rows = []
    for name, method in ((NOISE, explainer), (NOISE_PER_SUBJECT, per_subject)):
        method.attribute(images[:1])  # warm-up (allocations, lazy initialisation)
        start = time.perf_counter()
        for i in range(len(indices)):
            method.attribute(images[i : i + 1])
        ms = 1000.0 * (time.perf_counter() - start) / len(indices)
        rows.append({"method": name, "ms_per_subject": ms, "n_subjects": len(indices)})
        merge_metrics(study, name, {"ms_per_subject": ms})
    return pd.DataFrame(rows)


def per_subject_explainer(
    study: MapsStudy,
    explainer: NoiseMapExplainer,
    images: torch.Tensor | None = None,
    *,
    predictor: torch.nn.Module | None = None,
    mean_b: float | None = None,
) -> PerSubjectNoiseMap:
    """The per-subject mode with the amortised model's settings and operating point.

    It shares the amortised model's :class:`NoiseSettings` (the perturbation included) and
    reference image. With ``maps.per_subject_match_mean_b`` and ``images``, the
    per-subject maps are held at the amortised model's mean B on those images
    (:func:`mean_noise_levels`), so both modes spend the same budget; ``mean_b`` gives
    that mean directly (a process of a sharded job holds only its share of the images).
    ``predictor`` replaces the study's predictor (the sanity check explains randomised
    copies).
    """
    s = study.settings
    if not s.per_subject_match_mean_b:
        mean_b = None
    elif mean_b is None and images is not None:
        mean_b = float(mean_noise_levels(study, explainer.noise_level(images)).mean())
    if mean_b is not None:
        mean_b = min(max(float(mean_b), 0.01), 0.99)
    return PerSubjectNoiseMap(
        study.predictor if predictor is None else predictor,
        explainer.noise,
        mask=study.cohort.mask,
        reference=explainer.reference,
        steps=s.per_subject_steps,
        lr=s.per_subject_lr,
        coarse=s.per_subject_coarse,
        fixed_noise=s.per_subject_fixed_noise,
        mean_b=mean_b,
        patience=s.per_subject_patience,
    )


def mean_noise_levels(study: MapsStudy, levels: torch.Tensor) -> np.ndarray:
    """Each image's mean noise level in the brain, ``(N,)``, from its levels B
    (``(N, 1, X, Y, Z)``, for example the amortised model's ``noise_level(images)``)."""
    if len(levels) == 0:
        return np.zeros(0)
    mask = torch.as_tensor(study.cohort.mask, dtype=torch.float32)
    b = levels[:, 0].cpu()
    return ((b * mask).flatten(1).sum(1) / mask.sum()).double().numpy()
