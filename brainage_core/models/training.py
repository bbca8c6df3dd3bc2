"""Training of the brain-age predictor: configuration, loop, checkpoints and resume.

One function, :func:`train_predictor`, trains a :class:`~brainage_core.models.cnn.BrainAgeCNN`
on a training dataset with early stopping on the validation MAE. After every epoch it
writes a checkpoint atomically (model, optimiser, scheduler, gradient scaler, RNG states,
epoch, best weights and history). Re-running it with the same checkpoint path continues
where an interrupted run stopped and reaches the same final weights as an uninterrupted
run; re-running a finished run only loads it.

The same code runs on one CPU, one GPU (mixed precision) or several processes launched by
``torchrun`` (DistributedDataParallel, see :mod:`brainage_core.models.distributed`).
"""

from __future__ import annotations

import math
import os
import random
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from tqdm.auto import tqdm

from brainage_core._utils.io import atomic_path
from brainage_core._utils.validation import (
    BrainAgeInputError,
    check_choice,
    check_fraction,
    check_positive,
)
from brainage_core.data.datasets import SPLITS, Augmentation, CohortDataset
from brainage_core.data.protocol import Cohort
from brainage_core.models.baseline import RIDGE_SOLVERS
from brainage_core.models.batchnorm import recalibrate_batchnorm
from brainage_core.models.cnn import HEADS, NORMS, POOLS, BrainAgeCNN
from brainage_core.models.distributed import (
    DistContext,
    all_reduce_sum,
    amp_dtype,
    barrier,
    broadcast_float,
    check_num_workers,
    gather_shards,
    init_distributed,
    resolve_num_workers,
    shard_positions,
)
from brainage_core.models.evaluation import predict
from brainage_core.models.registry import ARCHITECTURES, architecture_name, build_model

#: Version tag written into every checkpoint.
CHECKPOINT_FORMAT = "brainage-predictor/1"

#: Settings that change how fast a run goes but not what it computes; a checkpoint may be
#: resumed with other values for these.
RUNTIME_KEYS = ("device", "amp", "num_threads", "num_workers", "preload", "channels_last",
                "eval_batch_size", "batch_scope", "sync_batchnorm", "baseline_solver")

#: What ``batch_size`` counts under ``torchrun``.
BATCH_SCOPES = ("global", "per_process")


@dataclass
class TrainConfig:
    """Settings of the predictor: the ``prediction`` section of a study config.

    Parameters
    ----------
    architecture : str, default="cnn"
        The network, by its name in :data:`~brainage_core.models.registry.ARCHITECTURES`.
    head : {"regression", "soft_label"}, default="regression"
        Output head of :class:`~brainage_core.models.cnn.BrainAgeCNN`.
    channels : list of int, default=[8, 16, 32, 64]
        Channels per convolutional block (its length is the depth). The default is the
        benchmarked setting at 4 mm on 2 CPU cores; SFCN-like widths such as
        [32, 64, 128, 256, 256] suit 1-2 mm grids on a GPU.
    norm : {"batch", "group", "instance", "none"}, default="batch"
        Normalisation layer of each block. Under ``torchrun`` this is the trade-off of
        ``sync_batchnorm``: "group" (and "instance") normalise each subject on its own, so
        the result does not depend on how the batch is split between processes, at no
        communication cost; "batch" needs ``sync_batchnorm`` for that.
    sync_batchnorm : bool, default=True
        Under ``torchrun`` on GPUs, turn BatchNorm into SyncBatchNorm: batch statistics
        over the global batch (as one process would compute them) at the cost of one
        all-reduce per layer and step. PyTorch has no SyncBatchNorm on the CPU, so with
        gloo (and with False) each process normalises over its own share of the batch:
        the results then depend on the number of processes, and a per-process share of 1
        or 2 subjects makes batch statistics noisy. ``norm: group`` avoids the question.
    dropout : float, default=0.0
        Dropout before the head.
    pool : {"avg", "octants", "flatten"}, default="avg"
        Global average pool (SFCN), an average per octant of the last feature map, or its
        flattening. The flattened,
        location-specific head (the default until issue 11, chosen on the embedded cohort)
        did not learn on new one-region cohorts of 400 subjects: the validation MAE stayed
        at that of predicting the mean age for 13 epochs on an 8 mm putamen cohort (and
        early stopping ended such runs at their first epoch), while the global pool, which
        is tolerant to where a structure sits in each subject, learned (issue 11's note).
    bin_width : float, default=1.0
        Age-bin width in years (soft-label head).
    soft_label_sigma : float, default=1.0
        Standard deviation in years of the soft labels (soft-label head).
    loss : {"mae", "mse"}, default="mae"
        Loss of the regression head (the soft-label head uses the KL divergence).
    epochs : int, default=30
        Maximum number of epochs.
    batch_size : int, default=8
        Subjects per optimisation step; what it counts under ``torchrun`` is
        ``batch_scope``. On 2 CPU cores at 4 mm, 8 trains 1.15-1.25x more subjects per
        second than 16 or 32.
    batch_scope : {"global", "per_process"}, default="global"
        ``"global"``: ``batch_size`` is the step's batch over all processes, divided
        between them (it must be divisible by their number); the optimisation is the same
        whatever the number of GPUs. ``"per_process"``: each process takes
        ``batch_size`` subjects, so the global batch grows with the number of GPUs (the
        usual choice to fill each GPU's memory; scale ``learning_rate`` with it). The
        global batch is printed at the start and recorded in ``summary()``; a checkpoint
        resumes with another number of processes when the global batch is the same.
    learning_rate : float, default=1e-3
        Peak learning rate of AdamW. On the issue-11 cohort (400 subjects, shape-based
        ageing, 4 mm) 3e-3 did not learn (test MAE 8.04 y against ridge 5.97 y) and 1e-3
        did (5.48 y, with ``batchnorm_recalibration``); the presets ``quick`` and
        ``default`` keep the 3e-3 they were measured with.
    weight_decay : float, default=1e-4
        AdamW weight decay.
    schedule : {"cosine", "constant"}, default="cosine"
        Learning-rate schedule per step after the warm-up: cosine decay to zero over
        ``epochs``, or constant.
    warmup_epochs : float, default=0.5
        Linear warm-up length in epochs (0 for none).
    batchnorm_recalibration : int, default=128
        Before each validation, re-estimate the BatchNorm running statistics on this many
        training images with the current weights (0: keep the running averages of training;
        :func:`~brainage_core.models.batchnorm.recalibrate_batchnorm`). With the running
        averages, the validation MAE of one run on the issue-11 cohort jumped between 5.2
        and 61 y from epoch to epoch, so early stopping picked epochs by chance; recalibrated,
        it fell smoothly (10.2 -> 5.2 y). It costs one forward pass over these images per
        epoch, and nothing without BatchNorm layers.
    patience : int, default=10
        Early stopping: stop when the validation MAE has not improved for this many
        epochs. The returned model holds the best epoch's weights.
    min_epochs : int or None, default=None
        Never stop early before this many epochs (None: half of ``epochs``). A CNN often
        sits at the mean-age plateau for several epochs before it finds the age signal;
        stopping there returns a model that learned nothing.
    min_steps : int or None, default=None
        Train for at least this many optimiser steps: when ``epochs`` epochs of the
        training set give fewer steps, every length set in epochs (``epochs``,
        ``patience``, ``min_epochs``, ``warmup_epochs``) is stretched by the same factor,
        so a small cohort gets the learning-rate schedule, in steps, of a larger one
        (:meth:`TrainResult.summary` records the epochs planned). None: ``epochs`` as
        given. Measured on a 400-subject putamen cohort at 4 mm (issue 11): 12 epochs of
        batches of 4 (840 steps) did not learn (8.17 y against ridge 6.56 y), 30 epochs
        (2,100 steps) did (5.40 y).
    augment : dict, default={}
        :class:`~brainage_core.data.datasets.Augmentation` settings (``shift``, ``flip``,
        ``noise``, ``intensity``, ``erase``), all off by default.
    seed : int, default=0
        Seed of initialisation, shuffling and augmentation.
    device : str, default="auto"
        ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``. Under
        ``torchrun``, ``"auto"`` and ``"cuda"`` give each process the GPU of its
        ``LOCAL_RANK``.
    amp : bool, default=True
        Mixed precision (``torch.autocast``) on CUDA: bfloat16 on GPUs of compute
        capability 8.0 or newer, float16 with a gradient scaler on older ones (see
        :func:`~brainage_core.models.distributed.amp_dtype`); the outputs are cast to
        float32 before the loss and the metrics. Ignored on the CPU.
    num_threads : int or None, default=None
        Torch CPU threads during training (None: leave torch's setting, one per core).
        2 threads train 1.6x faster than 1 on an idle 2-core machine, but slower than 1
        when other processes compete for the cores.
    num_workers : int or "auto", default="auto"
        DataLoader worker processes of training, validation and the BatchNorm
        re-estimation; they read each subject from the float16 memmap, convert it to
        float32, augment it and build the batches while the model computes (0: all of
        that in the training process). ``"auto"``
        (:func:`~brainage_core.models.distributed.resolve_num_workers`): 0 on the CPU,
        where workers only take cores from the computation, and
        ``min(8, cpus per local process - 1)`` on CUDA, with pinned memory. The
        number of workers never changes the result (augmentations are seeded per subject
        and epoch).
    preload : bool, default=False
        Convert the training and validation volumes to float32 in memory once, instead
        of reading the float16 memmap each epoch. Measured on 2 CPU cores at 4 mm
        (``bench predict --sweep``): a memmap read costs about 0.45 ms per subject against
        about 10 ms of training compute, so preloading would save at most 4 % while
        holding the cohort in memory (2.6 GB per 1,000 subjects at 2 mm); it is off.
    channels_last : bool, default=True
        Use the ``channels_last_3d`` memory format (inputs and weights). Measured on 2 CPU
        cores at 4 mm: 1.26x (2 threads) to 1.41x (1 thread) more subjects per second.
    eval_batch_size : int, default=32
        Batch size of validation and prediction.
    baseline_downsample : int, default=2
        Downsampling factor of the ridge baseline's voxels
        (:func:`brainage_core.models.baseline.fit_ridge_baseline`).
    baseline_solver : {"auto", "sklearn", "torch"}, default="auto"
        Solver of the ridge baseline: "auto" fits it with torch on the predictor's device
        when that is a GPU, with scikit-learn (float64, CPU) otherwise; both choose the
        same penalty by leave-one-out (:mod:`brainage_core.models.baseline`).
    """

    architecture: str = "cnn"
    head: str = "regression"
    channels: list[int] = field(default_factory=lambda: [8, 16, 32, 64])
    norm: str = "batch"
    dropout: float = 0.0
    pool: str = "avg"
    bin_width: float = 1.0
    soft_label_sigma: float = 1.0
    loss: str = "mae"
    epochs: int = 30
    batch_size: int = 8
    batch_scope: str = "global"
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    warmup_epochs: float = 0.5
    batchnorm_recalibration: int = 128
    patience: int = 10
    min_epochs: int | None = None
    min_steps: int | None = None
    augment: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    num_threads: int | None = None
    num_workers: int | str = "auto"
    preload: bool = False
    channels_last: bool = True
    sync_batchnorm: bool = True
    eval_batch_size: int = 32
    baseline_downsample: int = 2
    baseline_solver: str = "auto"

    def __post_init__(self) -> None:
        check_choice("architecture", self.architecture, tuple(ARCHITECTURES))
        check_choice("head", self.head, HEADS)
        check_choice("norm", self.norm, NORMS)
        check_choice("pool", self.pool, POOLS)
        check_choice("loss", self.loss, ("mae", "mse"))
        check_choice("schedule", self.schedule, ("cosine", "constant"))
        check_choice("batch_scope", self.batch_scope, BATCH_SCOPES)
        check_choice("baseline_solver", self.baseline_solver, RIDGE_SOLVERS)
        if not isinstance(self.channels, (list, tuple)) or not self.channels or not all(
            isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in self.channels
        ):
            raise BrainAgeInputError(
                f"'channels' must be a non-empty list of positive integers; "
                f"{self.channels!r} was provided."
            )
        self.channels = [int(c) for c in self.channels]
        check_fraction("dropout", self.dropout)
        check_positive("bin_width", self.bin_width)
        check_positive("soft_label_sigma", self.soft_label_sigma)
        for name in ("epochs", "batch_size", "patience", "eval_batch_size",
                     "baseline_downsample"):
            check_positive(name, getattr(self, name), integer=True)
        check_positive("learning_rate", self.learning_rate)
        if self.min_epochs is not None:
            check_positive("min_epochs", self.min_epochs, integer=True, allow_zero=True)
        if self.min_steps is not None:
            check_positive("min_steps", self.min_steps, integer=True)
        check_positive("weight_decay", self.weight_decay, allow_zero=True)
        check_positive("batchnorm_recalibration", self.batchnorm_recalibration, integer=True,
                       allow_zero=True)
        check_positive("warmup_epochs", self.warmup_epochs, allow_zero=True)
        self.num_workers = check_num_workers("num_workers", self.num_workers)
        if self.num_threads is not None:
            check_positive("num_threads", self.num_threads, integer=True)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise BrainAgeInputError(f"'seed' must be an integer; {self.seed!r} was provided.")
        for name in ("amp", "preload", "channels_last", "sync_batchnorm"):
            if not isinstance(getattr(self, name), bool):
                raise BrainAgeInputError(
                    f"'{name}' must be true or false; {getattr(self, name)!r} was provided."
                )
        if not isinstance(self.device, str) or not (
            self.device in ("auto", "cpu") or self.device.startswith("cuda")
        ):
            raise BrainAgeInputError(
                f"'device' must be 'auto', 'cpu' or 'cuda[:N]'; {self.device!r} was provided."
            )
        self.augment = Augmentation.from_dict(self.augment).to_dict()

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> TrainConfig:
        """Build from the ``prediction`` config section; unknown keys are an error.

        Parameters
        ----------
        d : dict or None
            Keys are the parameters of this class; missing keys take their defaults.
        """
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise BrainAgeInputError(
                f"unknown 'prediction' key(s) {unknown}; known keys are {sorted(known)}."
            )
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping (YAML/JSON-serialisable) of the settings."""
        return asdict(self)

    def model_kwargs(self, input_shape: tuple[int, ...], ages: np.ndarray) -> dict[str, Any]:
        """Constructor arguments of the model for this grid and these training ages."""
        ages = np.asarray(ages, dtype=float)
        margin = 3 * self.soft_label_sigma + self.bin_width
        lo = math.floor(ages.min() - margin)
        hi = math.ceil(ages.max() + margin)
        return {
            "input_shape": [int(s) for s in input_shape],
            "channels": list(self.channels),
            "head": self.head,
            "norm": self.norm,
            "dropout": self.dropout,
            "pool": self.pool,
            "age_mean": float(ages.mean()),
            "age_std": float(max(ages.std(), 1e-3)),
            "age_range": [float(lo), float(hi)],
            "bin_width": self.bin_width,
            "soft_label_sigma": self.soft_label_sigma,
        }


@dataclass
class TrainResult:
    """What :func:`train_predictor` returns.

    Attributes
    ----------
    model : BrainAgeCNN
        The model with the best epoch's weights, in eval mode, on the device it trained
        on (predict with it there; ``.cpu()`` to move it).
    history : list of dict
        One row per epoch: ``epoch``, ``train_loss``, ``val_mae``, ``lr``,
        ``train_seconds``, ``val_seconds``.
    best_epoch : int
        Epoch (0-based) with the lowest validation MAE.
    best_val_mae : float
        That validation MAE, in years.
    stopped_early : bool
        Whether early stopping ended the run.
    resumed_from : int
        Epochs already done when this call started (0 for a fresh run).
    epochs_planned : int
        Epochs the run was set to make (``epochs``, stretched by ``min_steps``).
    steps_per_epoch : int
        Optimiser steps per epoch.
    """

    model: BrainAgeCNN
    history: list[dict[str, float]]
    best_epoch: int
    best_val_mae: float
    stopped_early: bool
    resumed_from: int
    global_batch_size: int = 0
    processes: int = 1
    epochs_planned: int = 0
    steps_per_epoch: int = 0

    @property
    def seconds_per_epoch(self) -> float:
        """Mean wall time of an epoch (training and validation)."""
        if not self.history:
            return float("nan")
        return float(np.mean([h["train_seconds"] + h["val_seconds"] for h in self.history]))

    @property
    def subjects_per_second(self) -> float:
        """Training throughput (subjects per second of training time, all processes)."""
        if not self.history:
            return float("nan")
        return float(np.mean([h["subjects_per_second"] for h in self.history]))

    def summary(self) -> dict[str, float | int | bool]:
        """Training figures for ``metrics.json``: epochs, best epoch, speed."""
        return {
            "epochs_run": len(self.history),
            "epochs_planned": self.epochs_planned,
            "optimiser_steps": len(self.history) * self.steps_per_epoch,
            "best_epoch": self.best_epoch,
            "best_val_mae": self.best_val_mae,
            "stopped_early": self.stopped_early,
            "seconds_per_epoch": self.seconds_per_epoch,
            "subjects_per_second": self.subjects_per_second,
            "global_batch_size": int(self.history[-1].get("global_batch_size",
                                                          self.global_batch_size)
                                     if self.history else self.global_batch_size),
            "processes": int(self.history[-1].get("processes", self.processes)
                             if self.history else self.processes),
            "train_minutes": float(sum(h["train_seconds"] + h["val_seconds"]
                                       for h in self.history)) / 60.0,
        }


def train_predictor(
    config: TrainConfig | dict[str, Any],
    train_data: Dataset,
    val_data: Dataset,
    *,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = True,
    progress: bool = True,
) -> TrainResult:
    """Train a brain-age CNN with early stopping on the validation MAE.

    Parameters
    ----------
    config : TrainConfig or dict
        Settings (a dict goes through :meth:`TrainConfig.from_dict`).
    train_data, val_data : CohortDataset
        Items ``(x (1, X, Y, Z), age)``; ``train_data`` needs an ``ages`` tensor and a
        ``shape`` (as :class:`~brainage_core.data.datasets.CohortDataset` has).
    checkpoint : str or os.PathLike or None, default=None
        Checkpoint file written atomically after every epoch. If it exists and
        ``resume`` is true, training continues from it (or, if it is finished, the saved
        model is returned without training).
    resume : bool, default=True
        Continue from an existing ``checkpoint``; with False it is overwritten.
    progress : bool, default=True
        Show a tqdm bar (running training loss and last validation MAE).

    Returns
    -------
    TrainResult

    Notes
    -----
    Under ``torchrun`` (``WORLD_SIZE`` > 1) or inside an initialised process group, the
    model is wrapped in DistributedDataParallel and each process trains on its shard of
    every global batch; validation is sharded between the processes and gathered; only
    rank 0 writes the checkpoint. The checkpoint holds no per-device state, so a run
    started on N processes resumes on M (with the same global batch).
    """
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    ctx = init_distributed(cfg.device)
    if cfg.batch_scope == "global" and cfg.batch_size % ctx.world_size:
        raise BrainAgeInputError(
            f"'batch_size' ({cfg.batch_size}) must be divisible by the number of "
            f"processes ({ctx.world_size}) with batch_scope 'global'; set a multiple, or "
            "batch_scope 'per_process'."
        )
    if len(train_data) == 0 or len(val_data) == 0:
        raise BrainAgeInputError(
            f"training needs subjects in both sets; got {len(train_data)} training and "
            f"{len(val_data)} validation subjects."
        )
    old_threads = torch.get_num_threads()
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    try:
        return _Trainer(cfg, ctx, train_data, val_data, checkpoint, resume, progress).run()
    finally:
        torch.set_num_threads(old_threads)


def cohort_datasets(cohort: Cohort, config: TrainConfig | dict[str, Any]
                    ) -> dict[str, CohortDataset]:
    """The train, val and test datasets of a cohort, set up as ``config`` asks.

    Only the training set is augmented; ``config.preload`` decides whether the training
    and validation volumes are held in memory as float32.

    Parameters
    ----------
    cohort : PreparedCohort
        The prepared cohort, with a ``split`` column.
    config : TrainConfig or dict
        Predictor settings.

    Returns
    -------
    dict
        ``{"train": ..., "val": ..., "test": ...}``.
    """
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    return {
        split: CohortDataset(cohort, split=split,
                             augment=cfg.augment if split == "train" else None,
                             preload=cfg.preload and split != "test", seed=cfg.seed)
        for split in SPLITS
    }


def load_predictor(path: str | os.PathLike, map_location: str | torch.device = "cpu"
                   ) -> BrainAgeCNN:
    """Load a trained predictor from a checkpoint, in eval mode.

    Parameters
    ----------
    path : str or os.PathLike
        Checkpoint written by :func:`train_predictor`.
    map_location : str or torch.device, default="cpu"
        Where to put the weights (checkpoints saved on a GPU load on a CPU).

    Returns
    -------
    BrainAgeCNN
        The best epoch's weights, in eval mode.
    """
    ckpt = _read_checkpoint(path, map_location)
    # Checkpoints record their architecture's name; those written before the registry
    # existed hold the CNN.
    model = build_model(ckpt.get("architecture", "cnn"), **ckpt["model_config"])
    model.load_state_dict(ckpt["state_dict"])
    return model.to(map_location).eval()


# -- internals ---------------------------------------------------------------------------
class _RawOutput(torch.nn.Module):
    """Training view of the model: forward returns the head's raw output (for the loss)."""

    def __init__(self, model: BrainAgeCNN) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.raw(x)


class _Trainer:
    """State of one training run (kept in one place so that it can be checkpointed)."""

    def __init__(self, cfg: TrainConfig, ctx: DistContext, train_data: Dataset,
                 val_data: Dataset, checkpoint: str | os.PathLike | None, resume: bool,
                 progress: bool) -> None:
        self.cfg, self.ctx = cfg, ctx
        self.train_data, self.val_data = train_data, val_data
        self.checkpoint = None if checkpoint is None else Path(checkpoint)
        self.resume, self.progress = resume, progress
        self.device = ctx.device
        self.amp_dtype = amp_dtype(self.device, cfg.amp)
        ages = train_data.ages.numpy() if hasattr(train_data, "ages") else np.array(
            [float(train_data[i][1]) for i in range(len(train_data))])
        self.data_id = {"n_train": len(train_data), "n_val": len(val_data),
                        "train_age_sum": round(float(np.sum(ages)), 3)}
        if hasattr(train_data, "fingerprint") and hasattr(val_data, "fingerprint"):
            # the images themselves: the same subjects prepared otherwise are other data
            self.data_id["images"] = [train_data.fingerprint(), val_data.fingerprint()]
        _seed_everything(cfg.seed)
        self.model = build_model(
            cfg.architecture, **cfg.model_kwargs(train_data.shape, ages)
        ).to(self.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last_3d)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.learning_rate,
                                           weight_decay=cfg.weight_decay)
        per_rank = (cfg.batch_size // ctx.world_size if cfg.batch_scope == "global"
                    else cfg.batch_size)
        self.per_rank_batch = per_rank
        self.global_batch = per_rank * ctx.world_size
        self.sampler = DistributedSampler(train_data, num_replicas=ctx.world_size,
                                          rank=ctx.rank, shuffle=True, seed=cfg.seed)
        self.num_workers = resolve_num_workers(cfg.num_workers, self.device)
        self.loader = DataLoader(train_data, batch_size=per_rank, sampler=self.sampler,
                                 num_workers=self.num_workers,
                                 pin_memory=self.device.type == "cuda",
                                 persistent_workers=self.num_workers > 0)
        self.steps_per_epoch = len(self.loader)
        self.stretch = _epoch_stretch(cfg, self.steps_per_epoch)
        self.epochs = int(math.ceil(cfg.epochs * self.stretch))
        self.patience = int(math.ceil(cfg.patience * self.stretch))
        self.min_epochs = (self.epochs // 2 if cfg.min_epochs is None
                           else int(math.ceil(cfg.min_epochs * self.stretch)))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.epoch = 0
        self.best_val_mae = float("inf")
        self.best_epoch = -1
        self.best_state: dict[str, torch.Tensor] | None = None
        self.history: list[dict[str, float]] = []
        self.finished = False
        self.stopped_early = False

    # -- schedule ---------------------------------------------------------------------
    def _lr_factor(self, step: int) -> float:
        warmup = self.cfg.warmup_epochs * self.stretch * self.steps_per_epoch
        if warmup and step < warmup:
            return (step + 1) / warmup
        if self.cfg.schedule == "constant":
            return 1.0
        total = max(self.epochs * self.steps_per_epoch - warmup, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min((step - warmup) / total, 1.0)))

    # -- main loop --------------------------------------------------------------------
    def run(self) -> TrainResult:
        resumed_from = self._maybe_resume()
        net: torch.nn.Module = _RawOutput(self.model)
        synced = False
        if self.ctx.distributed:
            if self.cfg.sync_batchnorm and self.device.type == "cuda":
                # in place: the model's BatchNorm layers become SyncBatchNorm layers that
                # keep the same parameters and buffers (and state_dict keys)
                net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
                synced = True
            net = DistributedDataParallel(
                net, device_ids=[self.device] if self.device.type == "cuda" else None)
        if self.ctx.distributed and not synced and self.cfg.norm == "batch" and self.ctx.is_main:
            warnings.warn(
                "norm 'batch' under torchrun without SyncBatchNorm (the CPU has none, or "
                "sync_batchnorm is false): each process normalises its own share of the "
                "batch, so the result depends on the number of processes; norm 'group' "
                "does not.", stacklevel=2)
        if self.ctx.is_main and self.ctx.distributed:  # also when quiet: one line
            print(f"global batch {self.global_batch} = {self.per_rank_batch} per process x "
                  f"{self.ctx.world_size} processes on {self.device.type}"
                  + (" (SyncBatchNorm)" if synced else "")
                  + f", {self.num_workers} loader worker(s) per process", flush=True)
        quiet = {} if self.progress and self.ctx.is_main else {"disable": True}
        if self.ctx.is_main and self.stretch > 1 and (self.progress or self.ctx.distributed):
            print(f"min_steps {self.cfg.min_steps}: {self.epochs} epochs of "
                  f"{self.steps_per_epoch} steps instead of {self.cfg.epochs} "
                  f"(patience {self.patience})", flush=True)
        bar = tqdm(total=self.epochs * self.steps_per_epoch,
                   initial=self.epoch * self.steps_per_epoch, unit="batch",
                   desc="training predictor", mininterval=1.0, **quiet)
        try:
            while not self.finished and self.epoch < self.epochs:
                self._train_epoch(net, bar)
                if (self.epoch >= self.min_epochs
                        and self.epoch - 1 - self.best_epoch >= self.patience):
                    self.stopped_early = True
                    self.finished = True
                self.finished = self.finished or self.epoch >= self.epochs
                self._save()
        finally:
            bar.close()
        model = self.model
        if synced:  # give back plain BatchNorm layers (SyncBatchNorm needs a process group)
            model = build_model(architecture_name(self.model), **self.model.config)
            model.load_state_dict(self.model.state_dict())
            model = model.to(self.device)
        if self.best_state is not None:
            model.load_state_dict(self.best_state)
        model = model.to(memory_format=torch.contiguous_format).eval()
        return TrainResult(model=model, history=list(self.history), best_epoch=self.best_epoch,
                           best_val_mae=self.best_val_mae, stopped_early=self.stopped_early,
                           resumed_from=resumed_from, global_batch_size=self.global_batch,
                           processes=self.ctx.world_size, epochs_planned=self.epochs,
                           steps_per_epoch=self.steps_per_epoch)

    def _train_epoch(self, net: torch.nn.Module, bar: Any) -> None:
        cfg = self.cfg
        self.sampler.set_epoch(self.epoch)
        if hasattr(self.train_data, "set_epoch"):
            self.train_data.set_epoch(self.epoch)
        net.train()
        t0 = time.perf_counter()
        total, count = 0.0, 0
        for x, age in self.loader:
            x = x.to(self.device, non_blocking=True)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last_3d)
            age = age.to(self.device, non_blocking=True)
            with torch.autocast(self.device.type, dtype=self.amp_dtype,
                                enabled=self.amp_dtype is not None):
                raw = net(x)
            loss = self.model.loss(raw.float(), age, cfg.loss)  # fp32 loss under autocast
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            total += float(loss.detach()) * len(age)
            count += len(age)
            bar.set_postfix(loss=f"{total / count:.4f}", val_mae=self._last_val_mae(),
                            refresh=False)
            bar.update(1)
        train_seconds = time.perf_counter() - t0
        if self.ctx.distributed:  # the epoch's loss over every process's subjects
            sums = all_reduce_sum([total, float(count)], self.ctx)
            total, count = sums[0], int(round(sums[1]))
        t1 = time.perf_counter()
        if cfg.batchnorm_recalibration:
            recalibrate_batchnorm(self.model, self.train_data,
                                  n_images=cfg.batchnorm_recalibration,
                                  batch_size=cfg.eval_batch_size, device=self.device,
                                  channels_last=cfg.channels_last,
                                  num_workers=self.num_workers)
        # each process predicts its share of the validation set; the shares are gathered
        n_val = len(self.val_data)
        share = Subset(self.val_data, list(shard_positions(n_val, self.ctx)))
        preds = gather_shards(
            predict(self.model, share, batch_size=cfg.eval_batch_size, device=self.device,
                    channels_last=cfg.channels_last, amp_dtype=self.amp_dtype,
                    num_workers=self.num_workers),
            n_val, self.ctx)
        val_ages = _ages_of(self.val_data)
        val_mae = broadcast_float(float(np.mean(np.abs(preds - val_ages))), self.ctx)
        val_seconds = time.perf_counter() - t1
        if val_mae < self.best_val_mae:
            self.best_val_mae, self.best_epoch = val_mae, self.epoch
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.history.append({
            "epoch": self.epoch,
            "train_loss": total / max(count, 1),
            "val_mae": val_mae,
            "lr": float(self.optimizer.param_groups[0]["lr"]),
            "train_seconds": train_seconds,
            "val_seconds": val_seconds,
            "subjects_per_second": count / max(train_seconds, 1e-9),
            "processes": self.ctx.world_size,
            "global_batch_size": self.global_batch,
        })
        self.epoch += 1
        bar.set_postfix(loss=f"{total / max(count, 1):.4f}", val_mae=self._last_val_mae())

    def _last_val_mae(self) -> str:
        return f"{self.history[-1]['val_mae']:.3f}" if self.history else "n/a"

    # -- checkpoints ------------------------------------------------------------------
    def _comparable_config(self) -> dict[str, Any]:
        d = self.cfg.to_dict()
        for key in RUNTIME_KEYS:
            d.pop(key, None)
        d["batch_size"] = self.global_batch  # what the optimisation sees
        return d

    def _save(self) -> None:
        if self.checkpoint is None:
            return
        if self.ctx.is_main:
            state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
            best = state if self.best_state is None else {
                k: v.detach().cpu() for k, v in self.best_state.items()}
            ckpt = {
                "format": CHECKPOINT_FORMAT,
                "architecture": architecture_name(self.model),
                "model_config": self.model.config,
                "state_dict": best,
                "train_config": self._comparable_config(),
                "data": self.data_id,
                "training": {
                    "epoch": self.epoch,
                    "finished": self.finished,
                    "stopped_early": self.stopped_early,
                    "model": state,
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "scaler": self.scaler.state_dict(),
                    "rng": _rng_state(self.device),
                    "best_val_mae": self.best_val_mae,
                    "best_epoch": self.best_epoch,
                    "history": self.history,
                },
            }
            with atomic_path(self.checkpoint) as tmp:
                torch.save(ckpt, tmp)
        barrier(self.ctx)

    def _maybe_resume(self) -> int:
        if self.checkpoint is None or not self.checkpoint.exists() or not self.resume:
            return 0
        ckpt = _read_checkpoint(self.checkpoint, "cpu")
        saved, mine = _settings_of(ckpt), self._comparable_config()
        t = ckpt["training"]
        if self.cfg.batch_scope == "per_process" and saved.get("batch_size") != mine["batch_size"]:
            # Per process, the global batch is the setting times the processes that trained:
            # a finished run is read back with any number of processes (its result does not
            # change), an unfinished one only continues with the same global batch.
            writers = int(t["history"][-1].get("processes", 1)) if t["history"] else 1
            if saved.get("batch_size") == self.cfg.batch_size * writers:
                if not t["finished"]:
                    raise BrainAgeInputError(
                        f"this checkpoint was written by {writers} process(es) with "
                        f"batch_scope 'per_process' (global batch {saved['batch_size']}); "
                        f"{self.ctx.world_size} process(es) would train with a global batch "
                        f"of {mine['batch_size']}, so resume it with {writers} process(es), "
                        "or start again with resume=False.",
                        self.checkpoint,
                    )
                saved["batch_size"] = mine["batch_size"]
        if saved != mine or not _same_data(ckpt["data"], self.data_id):
            raise BrainAgeInputError(
                "this checkpoint was written with other settings or data, so it cannot be "
                "resumed; delete it or pass resume=False to start again "
                f"(saved settings {ckpt['train_config']}, data {ckpt['data']}).",
                self.checkpoint,
            )
        self.model.load_state_dict(t["model"])
        self.optimizer.load_state_dict(t["optimizer"])
        self.scheduler.load_state_dict(t["scheduler"])
        self.scaler.load_state_dict(t["scaler"])
        _set_rng_state(t["rng"], self.device)
        self.epoch = int(t["epoch"])
        self.finished = bool(t["finished"])
        self.stopped_early = bool(t.get("stopped_early", False))
        self.best_val_mae = float(t["best_val_mae"])
        self.best_epoch = int(t["best_epoch"])
        self.best_state = {k: v.to(self.device) for k, v in ckpt["state_dict"].items()}
        self.history = list(t["history"])
        return self.epoch


def _same_data(saved: dict[str, Any], mine: dict[str, Any]) -> bool:
    """Whether a checkpoint's data record matches this run's.

    Every field the checkpoint recorded must match; a field added since (``images``, the
    images' fingerprint, in session 10) is compared only when the checkpoint has it, so
    an older checkpoint is judged as before.
    """
    return all(mine.get(key) == value for key, value in saved.items())


def _settings_of(ckpt: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's training settings, completed with the defaults of settings added since.

    A checkpoint stores the settings that existed when it was written. A setting added
    later (``min_steps`` in session 6, ``augment.erase`` in session 8) takes its default,
    which trains as before, so such a checkpoint still resumes; a saved setting that no
    longer exists is kept, and then makes the comparison fail.
    """
    saved = dict(ckpt["train_config"])
    known = {f.name for f in fields(TrainConfig)}
    full = TrainConfig.from_dict({k: v for k, v in saved.items() if k in known}).to_dict()
    for key in RUNTIME_KEYS:
        full.pop(key, None)
    full.update({k: v for k, v in saved.items() if k not in known})
    return full


def _read_checkpoint(path: str | os.PathLike, map_location: Any) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise BrainAgeInputError("no such checkpoint file.", path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unreadable file is a bad input
        raise BrainAgeInputError(f"cannot read the checkpoint: {err}", path) from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise BrainAgeInputError(
            f"not a predictor checkpoint (expected format {CHECKPOINT_FORMAT!r}).", path)
    return ckpt


def _epoch_stretch(cfg: TrainConfig, steps_per_epoch: int) -> float:
    """Factor on every length in epochs so that training makes ``cfg.min_steps`` steps."""
    if cfg.min_steps is None:
        return 1.0
    needed = math.ceil(cfg.min_steps / max(steps_per_epoch, 1))
    return max(needed / cfg.epochs, 1.0)


def _ages_of(dataset: Dataset) -> np.ndarray:
    if hasattr(dataset, "ages"):
        return np.asarray(dataset.ages, dtype=float)
    return np.array([float(dataset[i][1]) for i in range(len(dataset))])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - the global state others may draw from
    torch.manual_seed(seed)


def _rng_state(device: torch.device) -> dict[str, Any]:
    """Rank 0's random states: the host's, and its own GPU's (never all visible GPUs, so
    that a checkpoint resumes with another number of devices)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),  # noqa: NPY002
             "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda_device"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda_device" in state:
        torch.cuda.set_rng_state(state["cuda_device"], device)
