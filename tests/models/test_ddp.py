"""DistributedDataParallel on the CPU: 2 gloo processes train like one process.

Each process trains on its shard of every global batch (DistributedSampler) and DDP
averages the gradients, so with a per-subject normalisation (GroupNorm) and a global batch
split evenly, the result equals single-process training up to floating-point reduction
order. Validation is sharded between the processes and gathered, and a checkpoint written
by 2 processes resumes in 1.

Tolerance: weights within ``atol=1e-5, rtol=1e-4`` and validation MAEs within 1e-4 years
(measured: at most 5e-7 in a weight and 1.1e-6 years of validation MAE).
"""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers.predictor import TINY, FakeCohort

from brainage_core.data.datasets import CohortDataset
from brainage_core.models.cnn import BrainAgeCNN
from brainage_core.models.training import cohort_datasets, load_predictor, train_predictor

CFG = {**TINY, "epochs": 2, "norm": "group"}
#: The same optimisation with the batch counted per process: 2 processes x 2 subjects.
PER_PROCESS = {**CFG, "batch_scope": "per_process", "batch_size": CFG["batch_size"] // 2}


class _Stop(Exception):
    """Stands for a job killed between two epochs."""


class _StopAtEpoch(CohortDataset):
    stop_at = 1

    def set_epoch(self, epoch: int) -> None:
        if epoch == self.stop_at:
            raise _Stop
        super().set_epoch(epoch)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, jobs: list) -> None:
    """Run ``(checkpoint, cfg, stop)`` trainings one after the other in one process group."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "TQDM_DISABLE": "1"})
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cohort = FakeCohort(n=37, seed=0)
        for checkpoint, cfg, stop in jobs:
            ds = cohort_datasets(cohort, cfg)
            train = _StopAtEpoch(cohort, split="train") if stop else ds["train"]
            try:
                result = train_predictor(cfg, train, ds["val"], checkpoint=checkpoint,
                                         progress=False)
            except _Stop:
                continue
            if rank == 0:
                torch.save({"history": result.history, "summary": result.summary()},
                           checkpoint + ".result")
    finally:
        dist.destroy_process_group()


def _assert_close(a: BrainAgeCNN, b: BrainAgeCNN) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.allclose(x, y, atol=1e-5, rtol=1e-4), name


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_two_gloo_processes_match_single_process_training(tmp_path):
    torch.set_num_threads(1)
    ds = cohort_datasets(FakeCohort(n=37, seed=0), CFG)
    # An even training set (DistributedSampler pads an odd one with a repeated subject),
    # not a multiple of the batch: the uneven last batch is covered too.
    assert len(ds["train"]) % 2 == 0 and len(ds["train"]) % CFG["batch_size"] != 0
    assert len(ds["val"]) % 2 != 0  # and an uneven split of the validation set
    single = train_predictor(CFG, ds["train"], ds["val"], progress=False)

    checkpoint, stopped = str(tmp_path / "ddp.pt"), str(tmp_path / "stopped.pt")
    # A full run, and a run with the batch counted per process that is stopped after its
    # first epoch (2 processes x 2 subjects: the same global batch).
    jobs = [(checkpoint, CFG, False), (stopped, PER_PROCESS, True)]
    mp.spawn(_worker, args=(2, _free_port(), jobs), nprocs=2, join=True)
    ddp = load_predictor(checkpoint)
    _assert_close(single.model, ddp)
    # Validation, sharded between the processes and gathered, gives the same MAEs.
    out = torch.load(checkpoint + ".result", weights_only=False)
    assert np.allclose([h["val_mae"] for h in out["history"]],
                       [h["val_mae"] for h in single.history], atol=1e-4, rtol=0)
    # the training loss of an epoch is over every process's subjects, as in one process
    assert np.allclose([h["train_loss"] for h in out["history"]],
                       [h["train_loss"] for h in single.history], atol=1e-4, rtol=0)
    assert out["summary"]["global_batch_size"] == 4 and out["summary"]["processes"] == 2
    # Training moved the weights, so the comparison is not trivially between two inits.
    torch.manual_seed(CFG.get("seed", 0))
    init = BrainAgeCNN(**single.model.config)
    assert not torch.allclose(init.output.weight, ddp.output.weight, atol=1e-3)

    # The stopped 2-process run resumes in 1 process and ends where the single run ended.
    assert torch.load(stopped, weights_only=False)["training"]["epoch"] == 1
    resumed = train_predictor(CFG, ds["train"], ds["val"], checkpoint=stopped, progress=False)
    assert resumed.resumed_from == 1
    _assert_close(single.model, resumed.model)
    assert np.allclose([h["val_mae"] for h in resumed.history],
                       [h["val_mae"] for h in single.history], atol=1e-4, rtol=0)
