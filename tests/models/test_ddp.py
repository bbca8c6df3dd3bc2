"""DistributedDataParallel on the CPU: 2 gloo processes train like one process.

Each process trains on its shard of every global batch (DistributedSampler) and DDP
averages the gradients, so with a per-subject normalisation (GroupNorm) and a global batch
split evenly, the result equals single-process training up to floating-point reduction
order.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers.predictor import TINY, FakeCohort

from brainage_core.models.cnn import BrainAgeCNN
from brainage_core.models.training import cohort_datasets, load_predictor, train_predictor

CFG = {**TINY, "epochs": 2, "norm": "group"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, checkpoint: str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "TQDM_DISABLE": "1"})
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ds = cohort_datasets(FakeCohort(n=30, seed=0), CFG)
        train_predictor(CFG, ds["train"], ds["val"], checkpoint=checkpoint, progress=False)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_two_gloo_processes_match_single_process_training(tmp_path):
    torch.set_num_threads(1)
    ds = cohort_datasets(FakeCohort(n=30, seed=0), CFG)
    assert len(ds["train"]) % CFG["batch_size"] != 0  # the uneven last batch is covered too
    single = train_predictor(CFG, ds["train"], ds["val"], progress=False).model

    checkpoint = str(tmp_path / "ddp.pt")
    mp.spawn(_worker, args=(2, _free_port(), checkpoint), nprocs=2, join=True)
    ddp = load_predictor(checkpoint)

    for (name, a), b in zip(single.state_dict().items(), ddp.state_dict().values(),
                            strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), name
    # Training moved the weights, so the comparison is not trivially between two inits.
    torch.manual_seed(CFG.get("seed", 0))
    init = BrainAgeCNN(**single.config)
    assert not torch.allclose(init.output.weight, ddp.output.weight, atol=1e-3)
