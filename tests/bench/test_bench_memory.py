"""The memory benchmark: per-subject memory of each heavy step, and its scaling."""

from __future__ import annotations

import torch

from brainage_core.bench import memory
from brainage_core.study.config import load_config


def test_memory_grows_with_the_batch_and_scales_with_the_grid():
    torch.manual_seed(0)
    config = load_config("quick")
    coarse = memory.measure(config, (20, 24, 21), torch.device("cpu")).set_index("step")
    assert list(coarse.index) == ["train_predictor", "fit_noise_model",
                                  "integrated_gradients", "predict"]
    assert (coarse["per_subject_MB"] > 0).all() and (coarse["fixed_MB"] > 0).all()
    # The CNN pads its input to a multiple of 16 voxels (32^3 and 48 x 32 x 32 here); the
    # activations per subject scale with the padded voxel count.
    fine = memory.measure(config, (33, 24, 21), torch.device("cpu")).set_index("step")
    ratio = memory.padded_voxels((33, 24, 21), 16) / memory.padded_voxels((20, 24, 21), 16)
    assert ratio == 48 / 32
    for step in ("train_predictor", "integrated_gradients"):
        estimate = coarse.loc[step, "per_subject_MB"] * ratio
        assert abs(fine.loc[step, "per_subject_MB"] - estimate) < 0.02 * estimate, step
