"""Re-estimation of BatchNorm statistics before evaluation (precise BN)."""

from __future__ import annotations

import torch
from helpers.predictor import TINY, FakeCohort
from torch import nn
from torch.utils.data import TensorDataset

from brainage_core.models.batchnorm import batchnorm_layers, recalibrate_batchnorm
from brainage_core.models.training import TrainConfig, cohort_datasets, train_predictor


def _images(n: int, shift: float, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = shift + torch.randn(n, 1, 6, 6, 6, generator=g)
    return TensorDataset(x, torch.zeros(n))


def test_statistics_become_the_plain_average_over_the_images():
    net = nn.Sequential(nn.Conv3d(1, 2, 1, bias=False), nn.BatchNorm3d(2))
    with torch.no_grad():
        net[0].weight.fill_(1.0)
    # running stats from training on other data: far from these images' statistics
    net.train()
    for _ in range(5):
        net(_images(4, shift=-7.0, seed=1).tensors[0])
    data = _images(40, shift=3.0)
    net.eval()
    used = recalibrate_batchnorm(net, data, n_images=32, batch_size=8)
    assert used == 32
    bn = net[1]
    x = data.tensors[0][:32]
    # the mean of per-batch means is the mean (equal batches); the variance is the mean of
    # the per-batch unbiased variances
    assert torch.allclose(bn.running_mean, torch.full((2,), float(x.mean())), atol=1e-5)
    per_batch = torch.stack([b.var(unbiased=True) for b in x.split(8)])
    assert torch.allclose(bn.running_var, per_batch.mean().expand(2), atol=1e-4)
    # the flag and the momentum are restored; the weights are untouched
    assert not net.training and bn.momentum == 0.1
    assert torch.all(net[0].weight == 1.0)


def test_a_model_without_batchnorm_is_left_alone():
    net = nn.Sequential(nn.Conv3d(1, 2, 1), nn.GroupNorm(1, 2))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert batchnorm_layers(net) == []
    assert recalibrate_batchnorm(net, _images(8, 0.0)) == 0
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_training_with_recalibration_changes_only_the_evaluation_buffers():
    ds = cohort_datasets(FakeCohort(n=30, seed=0), TrainConfig())
    # two epochs: the training losses must agree; the weights are compared after one epoch,
    # where both runs return their only epoch (later, a better validation MAE may pick
    # another epoch as the best)
    cfg = {**TINY, "norm": "batch", "epochs": 2, "min_epochs": 2}
    plain = train_predictor(cfg, ds["train"], ds["val"], progress=False)
    precise = train_predictor({**cfg, "batchnorm_recalibration": 16}, ds["train"], ds["val"],
                              progress=False)
    assert [h["train_loss"] for h in plain.history] == [h["train_loss"] for h in precise.history]
    assert [h["val_mae"] for h in plain.history] != [h["val_mae"] for h in precise.history]
    one = {**cfg, "epochs": 1, "min_epochs": 1}
    plain = train_predictor(one, ds["train"], ds["val"], progress=False)
    precise = train_predictor({**one, "batchnorm_recalibration": 16}, ds["train"], ds["val"],
                              progress=False)
    a, b = plain.model.state_dict(), precise.model.state_dict()
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    assert all(torch.equal(a[k], b[k]) for k in a if not k.endswith(buffers))  # same training
    assert any(not torch.equal(a[k], b[k]) for k in a if k.endswith("running_mean"))
