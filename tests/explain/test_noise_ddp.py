"""The noise model under DistributedDataParallel: 2 gloo processes fit what 1 process fits.

Each process takes its share of every global batch and keeps its rows of the noise drawn
for the whole batch, so with a training set that is a multiple of the number of
processes, the fit equals the single-process fit up to floating-point reduction order.

Weights are not compared: the biases of convolutions followed by instance normalisation
have no effect and a gradient of rounding size, which Adam scales up to full steps, so
they drift apart by up to 0.04 without changing any output. The outputs are compared.
Tolerance: per-epoch training and validation figures within a relative 1e-3, maps within
0.01 (absolute, maps in [0, 1]). Measured: 4e-5 and 0.003 (mean 0.0002) on one machine,
1.6e-4 (the second epoch's loss) on an AMD EPYC: the first epoch agrees to 6e-7, and
Adam carries the rounding of the reduction order into the second. Two single-process
fits with different seeds differ by 0.23 (mean 0.02) on the maps.
"""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers.maps import RegionPredictor, make_data

from brainage_core.explain.noise.amortised import NoiseMapExplainer

FIT = {"epochs": 2, "batch_size": 4, "lr": 1e-2, "progress": False}
SETTINGS = {"lam": 10.0, "s_max": 1.0, "channels": 4, "depth": 2, "seed": 0}


def _fit(checkpoint: str | None) -> NoiseMapExplainer:
    data = make_data(24, seed=0)
    explainer = NoiseMapExplainer(RegionPredictor(data.truth), mask=data.brain, **SETTINGS)
    return explainer.fit((data.images[:16], data.ages[:16]),
                         (data.images[16:20], data.ages[16:20]),
                         checkpoint_path=checkpoint, **FIT)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, checkpoint: str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fitted = _fit(checkpoint)
        # the reference image (the training mean of replace_mean and of the comparison's
        # baselines) is computed by each process from the whole training set, not from
        # its shard: every process holds the same one
        references = [torch.zeros_like(fitted.reference) for _ in range(world)]
        dist.all_gather(references, fitted.reference.contiguous())
        assert all(torch.equal(r, references[0]) for r in references)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_two_gloo_processes_fit_the_single_process_noise_model(tmp_path):
    torch.set_num_threads(1)
    single = _fit(None)
    checkpoint = str(tmp_path / "noise.pt")
    mp.spawn(_worker, args=(2, _free_port(), checkpoint), nprocs=2, join=True)
    data = make_data(24, seed=0)
    ddp = NoiseMapExplainer.load(checkpoint, RegionPredictor(data.truth), mask=data.brain)
    for key in ("loss", "task", "mean_b", "val_objective"):
        assert np.allclose(ddp.history_[key], single.history_[key], rtol=1e-3, atol=0), key
    assert ddp.best_epoch == single.best_epoch and ddp.epochs_trained == 2
    assert torch.equal(ddp.reference, single.reference)  # the whole training set's mean
    assert torch.allclose(single.reference[0, 0], data.images[:16].mean(0)[0], atol=1e-6)
    images = data.images[20:]
    maps = single.attribute(images)
    assert float((ddp.attribute(images) - maps).abs().max()) < 0.01
    # the fit moved the maps: the comparison is not between two initial models
    init = NoiseMapExplainer(RegionPredictor(data.truth), mask=data.brain, **SETTINGS)
    assert float((init.attribute(images) - maps).abs().max()) > 0.05
