"""Noise-model importance maps: U-Noise adapted to brain-age regression.

The trained predictor ``f`` is frozen. A 3D U-Net ``g`` looks at an image ``x`` and
outputs ``B = sigmoid(g(x))`` in (0, 1), one value per voxel. Inside the brain mask the
image is perturbed as

    x~ = x + eps * (s_min + B * (s_max - s_min)),   eps ~ N(0, 1),

and ``g`` minimises ``|f(x~) - target| - lambda * mean_brain(log B)``. The second term
pushes the noise up everywhere; the first keeps the prediction intact, so noise stays
low only where ``f`` needs the voxels. The importance map is ``1 - B`` (zero outside the
brain mask, where no noise is applied and ``B`` is unconstrained).

Two ways to obtain maps share this objective:

* :class:`NoiseMapExplainer` trains ``g`` once on a training set (amortised); a map then
  costs one forward pass of ``g``.
* :class:`PerSubjectNoiseMap` optimises the logits of ``B`` directly for each image, the
  way meaningful perturbations (Fong and Vedaldi, 2017) do: slower, no training set.

**The target.** ``target="prediction"`` (the default) uses ``f``'s own prediction on the
clean image: the map then explains what *the model* uses, and noise that happens to
move a wrong prediction towards the true age is not rewarded. ``target="age"`` uses the
chronological age as the paper did (Bintsi et al., 2021); it mixes model error into the
map and needs ages for every image.

Both classes follow captum's surface: built around the model, ``attribute(inputs)``
returns a tensor shaped like ``inputs``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset
from tqdm.auto import tqdm

from brainage_core._utils.docs import fill_doc
from brainage_core._utils.io import atomic_path
from brainage_core._utils.torch import frozen, predict_batch
from brainage_core._utils.validation import (
    BrainAgeInputError,
    check_positive,
)
from brainage_core.explain.noise.objective import (
    NoiseObjective,
    as_dataset,
    check_inputs,
    epoch_generator,
    split_item,
    task_loss,
)
from brainage_core.explain.noise.perturbations import BatchShard
from brainage_core.explain.noise.settings import NoiseSettings
from brainage_core.models.distributed import (
    amp_dtype,
    check_num_workers,
    process_context,
    resolve_num_workers,
)
from brainage_core.models.unet import UNet3D

#: Version of the checkpoint layout written by :meth:`NoiseMapExplainer.save`.
CHECKPOINT_VERSION = 2


# -- the amortised explainer -----------------------------------------------------------------
@fill_doc
class NoiseMapExplainer(NoiseObjective):
    """Amortised noise-model importance maps (U-Noise for regression).

    Parameters
    ----------
    %(predictor)s
    settings : NoiseSettings or None, default=None
        The objective: lambda, noise scale, target and seed
        (:class:`~brainage_core.explain.noise.settings.NoiseSettings`). None builds it from
        the keyword arguments ``**noise`` (``lam=3.0`` is shorthand for
        ``NoiseSettings(lam=3.0)``).
    %(mask)s
    channels, depth : int, default=8, 2
        Width and depth of the :class:`~brainage_core.models.unet.UNet3D` noise model.
    downsample : int, default=1
        Run the U-Net on the image average-pooled by this factor and upsample its logits
        (trilinear) to the full grid: about ``downsample ** 3`` times cheaper, with maps
        smoother at the scale of ``downsample`` voxels.
    init_bias : float, default=0.0
        Initial logit of B (0 gives B = 0.5 everywhere).
    **noise
        Fields of :class:`~brainage_core.explain.noise.settings.NoiseSettings`, when
        ``settings`` is None.

    Attributes
    ----------
    noise_model : UNet3D
        The network ``g``.
    history_ : pandas.DataFrame
        One row per training epoch (losses, mean B, validation figures, seconds).

    Examples
    --------
    >>> settings = NoiseSettings(lam=1.0)  # doctest: +SKIP
    >>> explainer = NoiseMapExplainer(model, settings, mask=cohort.mask)
    >>> explainer.fit(train_dataset, checkpoint_path="run/checkpoints/noise_model.pt")
    >>> importance = explainer.attribute(images)   # shaped like images
    """

    def __init__(
        self,
        predictor: nn.Module,
        settings: NoiseSettings | None = None,
        *,
        mask: Any = None,
        reference: Any = None,
        channels: int = 8,
        depth: int = 2,
        downsample: int = 1,
        init_bias: float = 0.0,
        **noise: Any,
    ) -> None:
        super().__init__(predictor, settings, mask=mask, reference=reference, **noise)
        self.channels = int(channels)
        self.depth = int(depth)
        self.downsample = int(check_positive("downsample", downsample, integer=True))
        self.init_bias = float(init_bias)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.noise.seed)
            self.noise_model = UNet3D(
                channels=self.channels, depth=self.depth, init_bias=self.init_bias
            )
        self.noise_model.to(self.device)
        self._history: list[dict[str, float]] = []
        self.epochs_trained = 0
        #: Epoch (1-based) whose weights are kept: the best validation objective.
        self.best_epoch: int | None = None
        self._best: tuple[float, int, dict[str, torch.Tensor]] | None = None

    # -- settings -------------------------------------------------------------------------
    def network(self) -> dict[str, Any]:
        """The noise model's architecture (stored in checkpoints beside the settings)."""
        return {
            "channels": self.channels,
            "depth": self.depth,
            "downsample": self.downsample,
            "init_bias": self.init_bias,
        }

    def settings(self) -> dict[str, Any]:
        """Everything that defines this explainer: the objective and the network."""
        return {"noise": self.noise.to_dict(), "network": self.network()}

    def matches(self, stored: Any) -> bool:
        """Whether a checkpoint's ``settings`` describe this explainer (same objective, as
        a :class:`NoiseSettings`, and same network)."""
        if not isinstance(stored, dict) or set(stored) != {"noise", "network"}:
            return False
        try:
            noise = NoiseSettings.from_dict(stored["noise"])
        except BrainAgeInputError:
            return False
        return noise == self.noise and stored["network"] == self.network()

    @property
    def history_(self) -> pd.DataFrame:
        return pd.DataFrame(self._history)

    def _logits(self, x: torch.Tensor, net: nn.Module | None = None) -> torch.Tensor:
        """Logits of B on the grid of ``x`` (the U-Net may run on a coarser grid).

        ``net`` is the U-Net to call (its DistributedDataParallel wrapper in training)."""
        net = self.noise_model if net is None else net
        if self.downsample == 1:
            return net(x)
        k = self.downsample
        coarse = net(F.avg_pool3d(x, kernel_size=k, stride=k, ceil_mode=True))
        return F.interpolate(coarse, size=tuple(x.shape[2:]), mode="trilinear", align_corners=False)

    # -- training -------------------------------------------------------------------------
    def fit(
        self,
        train_data: Any,
        val_data: Any = None,
        *,
        epochs: int = 10,
        batch_size: int = 4,
        lr: float = 1e-3,
        checkpoint_path: str | os.PathLike | None = None,
        resume: bool = True,
        progress: bool = True,
        num_workers: int | str = "auto",
        amp: bool = True,
    ) -> NoiseMapExplainer:
        """Train the noise model with the predictor frozen.

        Under ``torchrun`` (an initialised process group with several processes) the
        U-Net is wrapped in DistributedDataParallel: each process takes its share of every
        global batch and draws the noise of the whole batch from the shared seeded
        generator, keeping its own rows (:class:`BatchShard`). When the number of training
        images is a multiple of the number of processes, N processes therefore compute
        what one process computes, up to floating-point reduction order (otherwise a few
        images are repeated to give every process the same number of batches, as
        :class:`~torch.utils.data.DistributedSampler` does). Validation runs whole in
        every process (it is small: ``maps.max_val_subjects``), so every process takes the
        same best-epoch decision; only rank 0 writes the checkpoint.

        Parameters
        ----------
        train_data : Dataset or torch.Tensor or tuple
            Training images (see :func:`as_dataset`).
        val_data : Dataset or torch.Tensor or tuple or None, default=None
            Validation images, evaluated after each epoch with seeded noise.
        epochs : int, default=10
            Total number of epochs (including those already in a resumed checkpoint).
        batch_size : int, default=4
            Images per optimisation step, over all processes (divisible by their number).
        lr : float, default=1e-3
            Adam learning rate.
        checkpoint_path : str or os.PathLike or None, default=None
            Written atomically after every epoch. If it exists and ``resume`` is true,
            training continues from it (an exact replay: data order and noise are seeded
            per epoch); a finished checkpoint is simply loaded.
        resume : bool, default=True
            Continue from ``checkpoint_path`` if it exists; otherwise start afresh and
            overwrite it.
        progress : bool, default=True
            Show a tqdm progress bar over epochs (rank 0 only).
        num_workers : int or "auto", default="auto"
            DataLoader worker processes reading and converting the images, for training
            and validation (pinned memory on CUDA); ``"auto"``: none on the CPU or for
            images given as tensors, some on CUDA
            (:func:`~brainage_core.models.distributed.resolve_num_workers`). The result
            does not depend on it.
        amp : bool, default=True
            Mixed precision on CUDA (:func:`~brainage_core.models.distributed.amp_dtype`:
            bfloat16 where native, else float16 with a gradient scaler); the losses are
            computed in float32. Ignored on the CPU.

        Returns
        -------
        NoiseMapExplainer
            ``self``, trained.
        """
        check_positive("epochs", epochs, integer=True)
        check_positive("batch_size", batch_size, integer=True)
        check_positive("lr", lr)
        num_workers = check_num_workers("num_workers", num_workers)
        here = process_context()
        rank, world = here.rank, here.world_size
        if batch_size % world:
            raise BrainAgeInputError(
                f"'batch_size' ({batch_size}) must be divisible by the number of processes "
                f"({world})."
            )
        train_set = as_dataset(train_data, "train_data")
        if num_workers == "auto" and isinstance(train_set, TensorDataset):
            num_workers = 0  # images already in memory (perhaps on the GPU): nothing to read
        num_workers = resolve_num_workers(num_workers, self.device)
        val_set = None if val_data is None else as_dataset(val_data, "val_data")
        optimiser = torch.optim.Adam(self.noise_model.parameters(), lr=lr)
        if checkpoint_path is not None and resume and Path(checkpoint_path).is_file():
            self._load_checkpoint(checkpoint_path, optimiser)
        self.set_reference(train_set)
        dtype = amp_dtype(self.device, amp)
        scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
        net: nn.Module = self.noise_model
        if world > 1:
            net = DistributedDataParallel(
                self.noise_model,
                device_ids=[self.device] if self.device.type == "cuda" else None,
            )
        loop = _TrainLoop(net=net, optimiser=optimiser, scaler=scaler, amp_dtype=dtype,
                          batch_size=batch_size, num_workers=num_workers, rank=rank,
                          world_size=world)
        first_epoch = self.epochs_trained
        bar = tqdm(
            range(self.epochs_trained, epochs),
            total=epochs,
            initial=self.epochs_trained,
            desc="noise model",
            unit="epoch",
            disable=None if progress and rank == 0 else True,
        )
        with frozen(self.predictor):
            for epoch in bar:
                start = time.perf_counter()
                row = self._train_epoch(train_set, loop, epoch)
                if val_set is not None:
                    val = self.evaluate(val_set, batch_size=batch_size, seed_offset=epoch,
                                        num_workers=num_workers)
                    row.update({f"val_{k}": v for k, v in val.items()})
                    row["val_objective"] = val["task"] + self.noise.lam * val["reg"]
                    if self._best is None or row["val_objective"] <= self._best[0]:
                        self._best = (row["val_objective"], epoch + 1, self._state())
                row["seconds"] = time.perf_counter() - start
                row["epoch"] = epoch + 1
                self._history.append(row)
                self.epochs_trained = epoch + 1
                bar.set_postfix(loss=f"{row['loss']:.3f}", mean_b=f"{row['mean_b']:.2f}")
                if checkpoint_path is not None:
                    self._save_on_rank0(checkpoint_path, optimiser, rank, world)
        bar.close()
        if self._best is not None:
            # keep the epoch with the best validation objective, not the last one
            done = self.epochs_trained == first_epoch and self.best_epoch == self._best[1]
            self.noise_model.load_state_dict(self._best[2])
            self.best_epoch = self._best[1]
            # A finished checkpoint that already holds it is left untouched: rewriting it
            # would change its digest, and every map that records it would be made again.
            if checkpoint_path is not None and not done:
                self._save_on_rank0(checkpoint_path, optimiser, rank, world)
        self.noise_model.eval()
        return self

    def _save_on_rank0(self, path: str | os.PathLike, optimiser: torch.optim.Optimizer,
                       rank: int, world: int) -> None:
        if rank == 0:
            self.save(path, optimiser=optimiser)
        if world > 1:
            dist.barrier()

    def _state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.noise_model.state_dict().items()}

    def _train_epoch(self, dataset: Dataset, loop: _TrainLoop, epoch: int) -> dict[str, float]:
        self.noise_model.train()
        order = torch.Generator().manual_seed(
            int(np.random.SeedSequence([self.noise.seed, epoch, 0]).generate_state(1)[0])
        )
        noise: torch.Generator | BatchShard = epoch_generator(self.noise.seed, epoch, 1,
                                                              self.device)
        if loop.world_size > 1:
            noise = BatchShard(noise, loop.rank, loop.world_size)
        loader = DataLoader(
            dataset,
            batch_size=loop.batch_size // loop.world_size,
            sampler=_ShardedPermutation(len(dataset), order, loop.rank, loop.world_size),
            generator=order,
            num_workers=loop.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        # Sums stay on the device: one host synchronisation per epoch, not four per step.
        totals = torch.zeros(5, dtype=torch.float64, device=self.device)
        for batch in loader:
            x, ages = split_item(batch)
            x = x.to(self.device, non_blocking=True)
            with torch.autocast(self.device.type, dtype=loop.amp_dtype,
                                enabled=loop.amp_dtype is not None):
                # The target f(x) in the precision of f(x~): in float32 against a bfloat16
                # f(x~), their rounding gap alone would be a floor on the task loss.
                targets = self._targets(x, ages)
                logits = self._logits(x, loop.net)
                task, reg, b = self._loss(x, logits.float(), targets, noise)
            task, reg = task.float(), reg.float()
            loss = task.mean() + self.noise.lam * reg.mean()
            loop.optimiser.zero_grad(set_to_none=True)
            loop.scaler.scale(loss).backward()
            loop.scaler.step(loop.optimiser)
            loop.scaler.update()
            n = x.shape[0]
            mask = self._brain_mask(tuple(x.shape[2:]))
            with torch.no_grad():
                mean_b = (b.detach() * mask).flatten(1).sum(1) / mask.sum()
                totals += torch.stack([loss.detach() * n, task.detach().sum(),
                                       reg.detach().sum(), mean_b.sum(),
                                       torch.tensor(float(n), device=self.device)]).double()
        if loop.world_size > 1:
            totals = totals.to(_comm_device(self.device))
            dist.all_reduce(totals)
        loss_sum, task_sum, reg_sum, b_sum, count = totals.tolist()
        count = max(count, 1.0)
        return {"loss": loss_sum / count, "task": task_sum / count, "reg": reg_sum / count,
                "mean_b": b_sum / count}

    # -- inference ------------------------------------------------------------------------
    @torch.no_grad()
    def noise_level(self, inputs: torch.Tensor, *, batch_size: int = 8) -> torch.Tensor:
        """Return ``B = sigmoid(g(x))`` shaped like ``inputs`` (on ``inputs``' device)."""
        x = check_inputs(inputs)
        was_training = self.noise_model.training
        self.noise_model.eval()
        try:
            parts = [
                torch.sigmoid(self._logits(chunk.to(self.device))).to(x.device)
                for chunk in torch.split(x, batch_size)
            ]
        finally:
            self.noise_model.train(was_training)
        return torch.cat(parts).reshape(torch.as_tensor(inputs).shape)

    def attribute(self, inputs: torch.Tensor, *, batch_size: int = 8) -> torch.Tensor:
        """Importance ``1 - B`` for each image, shaped like ``inputs``.

        Parameters
        ----------
        inputs : torch.Tensor of shape (N, 1, X, Y, Z) or (1, X, Y, Z)
            Images on the grid the noise model was trained on.
        batch_size : int, default=8
            Images per forward pass.

        Returns
        -------
        torch.Tensor
            Importance in [0, 1], zero outside the brain mask; no gradient attached.
        """
        inputs = torch.as_tensor(inputs)
        b = check_inputs(self.noise_level(inputs, batch_size=batch_size))
        return self._importance(b.to(self.device)).to(inputs.device).reshape(inputs.shape)

    @torch.no_grad()
    def evaluate(
        self, data: Any, *, batch_size: int = 8, n_draws: int = 1, seed_offset: int = 0,
        num_workers: int = 0,
    ) -> dict[str, float]:
        """Predictor error on clean and noised images of ``data``.

        ``num_workers`` DataLoader workers read the images (pinned memory on CUDA).

        Returns
        -------
        dict
            ``task``: mean ``|f(x~) - target|``; ``shift``: mean ``|f(x~) - f(x)|``;
            ``clean_mae`` and ``noisy_mae`` against the true age (NaN without ages);
            ``mean_b``, ``mean_sigma`` (mean noise standard deviation in the brain, for the
            additive perturbation) and ``reg`` (the regulariser ``-mean log B``).
        """
        dataset = as_dataset(data)
        was_training = self.noise_model.training
        self.noise_model.eval()
        sums = dict.fromkeys(
            ["task", "shift", "clean_mae", "noisy_mae", "mean_b", "mean_sigma", "reg"], 0.0
        )
        count = 0
        gen = epoch_generator(self.noise.seed, 10_000 + seed_offset, 2, self.device)
        with frozen(self.predictor):
            for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                    num_workers=num_workers,
                                    pin_memory=self.device.type == "cuda"):
                x, ages = split_item(batch)
                x = x.to(self.device, non_blocking=True)
                ages = ages.to(self.device, non_blocking=True)
                clean = predict_batch(self.predictor, x)
                targets = clean if self.noise.target == "prediction" else self._targets(x, ages)
                logits = self._logits(x)
                b = torch.sigmoid(logits)
                mask = self._brain_mask(tuple(x.shape[2:]))
                for _ in range(n_draws):
                    noisy = predict_batch(self.predictor, self.perturb(x, b, gen))
                    task = task_loss(noisy - targets, self.noise.loss)
                    sums["task"] += float(task.sum()) / n_draws
                    sums["shift"] += float((noisy - clean).abs().sum()) / n_draws
                    sums["noisy_mae"] += float((noisy - ages).abs().sum()) / n_draws
                sums["clean_mae"] += float((clean - ages).abs().sum())
                mean_b = (b * mask).flatten(1).sum(1) / mask.sum()
                sums["mean_b"] += float(mean_b.sum())
                reg = -(F.logsigmoid(logits) * mask).flatten(1).sum(1) / mask.sum()
                sums["reg"] += float(reg.sum())
                s_min, s_max = self.noise.s_min, self.noise.s_max
                sums["mean_sigma"] += float((s_min + mean_b * (s_max - s_min)).sum())
                count += x.shape[0]
        self.noise_model.train(was_training)
        return {k: v / max(count, 1) for k, v in sums.items()}

    # -- persistence ----------------------------------------------------------------------
    def save(
        self, path: str | os.PathLike, *, optimiser: torch.optim.Optimizer | None = None
    ) -> Path:
        """Write a checkpoint atomically (weights, settings, history, optimiser state)."""
        state = {
            "kind": "noise_model",
            "version": CHECKPOINT_VERSION,
            "settings": self.settings(),
            "state_dict": {k: v.detach().cpu() for k, v in self.noise_model.state_dict().items()},
            "optimizer": None if optimiser is None else optimiser.state_dict(),
            "epochs_trained": self.epochs_trained,
            "best_epoch": self.best_epoch,
            "best": (
                None
                if self._best is None
                else {
                    "objective": self._best[0],
                    "epoch": self._best[1],
                    "state_dict": self._best[2],
                }
            ),
            "history": self._history,
            "reference": None if self.reference is None else self.reference.detach().cpu(),
        }
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
        return Path(path)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        predictor: nn.Module,
        *,
        mask: Any = None,
    ) -> NoiseMapExplainer:
        """Rebuild a trained explainer from a checkpoint written by :meth:`save` or :meth:`fit`.

        Parameters
        ----------
        path : str or os.PathLike
            The checkpoint.
        predictor : torch.nn.Module
            The predictor the noise model was trained for.
        mask : array-like of bool or None, default=None
            The brain mask used in training.
        """
        state = read_checkpoint(path)
        settings = NoiseSettings.from_dict(state["settings"]["noise"])
        explainer = cls(
            predictor,
            settings,
            mask=mask,
            reference=state.get("reference"),
            **state["settings"]["network"],
        )
        explainer.noise_model.load_state_dict(state["state_dict"])
        explainer.noise_model.eval()
        explainer.epochs_trained = int(state["epochs_trained"])
        explainer.best_epoch = state.get("best_epoch")
        explainer._history = list(state["history"])
        return explainer

    def _load_checkpoint(self, path: str | os.PathLike, optimiser: torch.optim.Optimizer) -> None:
        state = read_checkpoint(path)
        if not self.matches(state["settings"]):
            raise BrainAgeInputError(
                f"checkpoint was trained with settings {state['settings']}, which differ from "
                f"this explainer's {self.settings()}; delete it or pass resume=False.",
                path,
            )
        self.noise_model.load_state_dict(state["state_dict"])
        if state["optimizer"] is not None:
            optimiser.load_state_dict(state["optimizer"])
        self.epochs_trained = int(state["epochs_trained"])
        self._history = list(state["history"])
        if state.get("reference") is not None:
            self.reference = state["reference"].to(self.device)
        self.best_epoch = state.get("best_epoch")
        best = state.get("best")
        if best is not None:
            self._best = (float(best["objective"]), int(best["epoch"]), best["state_dict"])


@dataclass
class _TrainLoop:
    """What one training epoch of the noise model needs besides the explainer."""

    net: nn.Module
    optimiser: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    batch_size: int
    num_workers: int
    rank: int
    world_size: int


class _ShardedPermutation(Sampler[int]):
    """This process's share of a seeded permutation: positions ``rank::world_size``.

    With one process it is the permutation itself (what ``shuffle=True`` with the same
    generator gives). With several, the permutation is first padded with its own first
    items to a multiple of ``world_size``, as DistributedSampler does, so that every
    process runs the same number of steps.
    """

    def __init__(self, n: int, generator: torch.Generator, rank: int, world_size: int) -> None:
        self.n, self.generator, self.rank, self.world_size = n, generator, rank, world_size

    def __iter__(self) -> Iterator[int]:
        # drawn when iterated, after the DataLoader has drawn its base seed from the same
        # generator: the order of a single process is the one shuffle=True gave
        perm = torch.randperm(self.n, generator=self.generator).tolist()
        if self.world_size > 1 and self.n % self.world_size:
            perm += perm[: self.world_size - self.n % self.world_size]
        return iter(perm[self.rank :: self.world_size])

    def __len__(self) -> int:
        return -(-self.n // self.world_size)


def _comm_device(device: torch.device) -> torch.device:
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise BrainAgeInputError("noise-model checkpoint not found", path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same input error
        raise BrainAgeInputError(f"not a readable noise-model checkpoint ({err})", path) from err
    if not isinstance(state, dict) or state.get("kind") != "noise_model":
        raise BrainAgeInputError("not a noise-model checkpoint", path)
    if state.get("version") != CHECKPOINT_VERSION:
        raise BrainAgeInputError(
            f"noise-model checkpoint of layout version {state.get('version')}; this version "
            f"reads {CHECKPOINT_VERSION}: train the noise model again",
            path,
        )
    return state
