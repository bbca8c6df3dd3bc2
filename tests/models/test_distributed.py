"""Device and precision choices of the distributed helpers (checked without a GPU)."""

from __future__ import annotations

import pytest
import torch

from brainage_core._utils.validation import BrainAgeInputError
from brainage_core.models import distributed
from brainage_core.models.distributed import DistContext, amp_dtype, gather_shards, resolve_device


def test_each_torchrun_process_takes_the_gpu_of_its_local_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("auto") == torch.device("cuda", 3)
    assert resolve_device("cuda") == torch.device("cuda", 3)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)  # explicit wins
    assert resolve_device("cpu") == torch.device("cpu")
    # more processes on the node than GPUs: one clear error, not a CUDA one later
    monkeypatch.setenv("LOCAL_RANK", "4")
    with pytest.raises(BrainAgeInputError, match="LOCAL_RANK 4 has no GPU of its own: this "
                       "node shows 4 GPU"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.parametrize(("capability", "expected"), [
    ((7, 0), torch.float16),   # V100: bfloat16 only emulated -> float16 + GradScaler
    ((7, 5), torch.float16),   # T4
    ((8, 0), torch.bfloat16),  # A100
    ((9, 0), torch.bfloat16),  # H100
])
def test_bfloat16_only_where_the_gpu_computes_it_natively(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # emulation
    assert amp_dtype(torch.device("cuda", 0)) == expected
    assert amp_dtype(torch.device("cuda", 0), enabled=False) is None
    assert amp_dtype(torch.device("cpu")) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_asking_for_cuda_without_a_gpu_is_one_clear_error():
    with pytest.raises(BrainAgeInputError, match="no CUDA GPU"):
        distributed.init_distributed("cuda")


def test_gather_shards_in_one_process_returns_the_values():
    values = torch.arange(5.0).numpy()
    ctx = DistContext(rank=0, world_size=1, device=torch.device("cpu"))
    assert (gather_shards(values, 5, ctx) == values).all()
    assert list(distributed.shard_positions(5, DistContext(1, 2, torch.device("cpu")))) == [1, 3]


def test_auto_loader_workers_none_on_the_cpu_some_on_each_gpu(monkeypatch):
    # Issue 16, item 4: on the CPU, workers only take cores from the computation; on a GPU
    # they read and convert while the GPU computes, sharing the node's cores between the
    # torchrun processes of the node and leaving one core to each process.
    resolve = distributed.resolve_num_workers
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve("auto", cpu, cpu_count=64, local_world_size=1) == 0
    assert resolve("auto", gpu, cpu_count=2, local_world_size=1) == 1
    assert resolve("auto", gpu, cpu_count=16, local_world_size=1) == 8  # capped
    assert resolve("auto", gpu, cpu_count=32, local_world_size=8) == 3
    assert resolve("auto", gpu, cpu_count=8, local_world_size=8) == 0
    assert resolve(3, cpu) == 3  # an explicit count is taken as it is
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setattr(distributed.os, "sched_getaffinity", lambda pid: set(range(24)),
                        raising=False)
    assert resolve("auto", "cuda:1") == 5
    for bad in (-1, 1.5, "many", True):
        with pytest.raises(BrainAgeInputError, match="'num_workers' must be 'auto' or a non"):
            resolve(bad, cpu)


def test_training_and_map_settings_default_to_auto_workers():
    from brainage_core.models.training import TrainConfig
    from brainage_core.study.maps import MapsConfig

    assert TrainConfig().num_workers == "auto"
    assert MapsConfig().num_workers == "auto"
    assert TrainConfig(num_workers=2).num_workers == 2
    with pytest.raises(BrainAgeInputError, match="'maps.num_workers' must be 'auto'"):
        MapsConfig(num_workers=-1)
