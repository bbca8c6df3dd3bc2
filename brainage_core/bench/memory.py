"""Memory per subject of each heavy step, to size a GPU job before starting it.

``brainage-study bench memory [--preset NAME] [-p KEY VALUE ...]`` builds the run's
predictor and noise model on the run's grid and measures, for each heavy step, the memory
that grows with the number of subjects in a batch (the tensors autograd keeps for the
backward pass, plus the step's output), and the fixed part (weights, gradients and Adam's
two moments). The per-subject figure is the difference between a batch of 2 and a batch
of 1, so it holds for any batch size: ``fixed + batch x per_subject``.

Steps measured:

* ``train_predictor``: the CNN's forward and backward pass (``prediction.batch_size``);
* ``fit_noise_model``: the U-Net, the perturbation, the frozen CNN and the backward pass
  through both (``maps.batch_size``);
* ``integrated_gradients``: one internal batch of captum's integrated gradients (each
  subject's ``maps.ig_steps`` path points run ``internal_batch_size`` at a time, 8 here);
* ``predict``: inference (no autograd).

The 2 mm and 1 mm figures are **estimates**: activations scale with the number of voxels
the networks see (the grid padded to a multiple of ``2 ** depth``), so the measured
per-subject memory is scaled by the ratio of those counts (the weights do not change with
the grid for the default global-pool head). Measure at 2 mm directly with
``-p data.resolution 2`` (a few seconds per step on a CPU). On a GPU (``--device cuda``)
the peak allocated memory (``torch.cuda.max_memory_allocated``) is measured as well; on
the CPU the figure counts tensor bytes, which is what a GPU would hold for them (the CUDA
caching allocator and cuDNN workspaces add some 10-30 %).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from brainage_core._utils.torch import frozen, predict_batch
from brainage_core.data.template import load_template
from brainage_core.explain.noise.amortised import NoiseMapExplainer
from brainage_core.models.distributed import resolve_device
from brainage_core.models.registry import build_model
from brainage_core.models.training import TrainConfig
from brainage_core.study.config import load_config
from brainage_core.study.maps import MapsConfig

#: Grids the figures are estimated for, besides the run's own.
TARGET_RESOLUTIONS = (2, 1)
#: Internal batch of integrated gradients in the estimate.
IG_INTERNAL_BATCH = 8


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="brainage-study bench memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="default", help="config preset (default: default)")
    p.add_argument("-p", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                   help="override a config key, e.g. -p data.resolution 4")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    return p


def run(args: Any = None) -> dict[str, Any]:
    """Measure and print the memory table; return it as a dict of rows."""
    ns = _parse(args)
    config = load_config(ns.preset, overrides=[tuple(kv) for kv in ns.p])
    res = int(config["data"]["resolution"])
    shape = load_template(res).shape
    device = resolve_device(ns.device)
    table = measure(config, shape, device)
    cnn_factor = 2 ** len(TrainConfig.from_dict(config.get("prediction")).channels)
    maps = MapsConfig.from_dict(config.get("maps"))
    unet_factor = 2 ** maps.depth * maps.downsample
    # the noise step holds the U-Net's activations and the CNN's (its backward pass to
    # the input: the integrated-gradients row per path point); each scales with its grid
    per = table.set_index("step")["per_subject_MB"]
    cnn_part = per["integrated_gradients"] / IG_INTERNAL_BATCH
    unet_part = max(per["fit_noise_model"] - cnn_part, 0.0)
    for target in TARGET_RESOLUTIONS:
        target_shape = load_template(target).shape
        cnn_ratio = padded_voxels(target_shape, cnn_factor) / padded_voxels(shape, cnn_factor)
        unet_ratio = (padded_voxels(target_shape, unet_factor)
                      / padded_voxels(shape, unet_factor))
        scaled = table["per_subject_MB"] * cnn_ratio
        scaled[table["step"] == "fit_noise_model"] = cnn_part * cnn_ratio + unet_part * unet_ratio
        table[f"per_subject_MB_at_{target}mm"] = scaled
        table[f"batch_GB_at_{target}mm"] = (
            table["fixed_MB"] + table["batch"] * table[f"per_subject_MB_at_{target}mm"]) / 1024
    print(f"memory per step at the run's grid ({res} mm, {shape}) on {device}; the 2 mm and "
          "1 mm columns are estimates scaled by the (padded) voxel count")
    with pd.option_context("display.width", 200, "display.max_columns", 20,
                           "display.float_format", "{:.1f}".format):
        print(table.to_string(index=False))
    return {"resolution": res, "shape": list(shape), "rows": table.to_dict("records")}


def padded_voxels(shape: Sequence[int], factor: int) -> int:
    """Voxels of a grid once padded to a multiple of ``factor`` (as the networks pad)."""
    return int(np.prod([-(-int(n) // factor) * factor for n in shape]))


def measure(config: dict[str, Any], shape: Sequence[int], device: torch.device
            ) -> pd.DataFrame:
    """The memory table of a configuration on a grid (one row per heavy step)."""
    train = TrainConfig.from_dict({"seed": config.get("seed", 0),
                                   **(config.get("prediction") or {})})
    maps = MapsConfig.from_dict(config.get("maps"), seed=config.get("seed", 0))
    ages = np.array([40.0, 80.0])
    cnn = build_model(train.architecture, **train.model_kwargs(tuple(shape), ages)).to(device)
    explainer = NoiseMapExplainer(cnn, maps.noise, **maps.network_kwargs())
    explainer.reference = torch.zeros((1, 1, *shape), device=device)
    rows = []

    def x(n: int) -> torch.Tensor:
        return torch.randn((n, 1, *shape), device=device)

    def train_step(n: int) -> None:
        cnn.train()
        cnn.loss(cnn.raw(x(n)).float(), torch.full((n,), 60.0, device=device),
                 train.loss).backward()

    def noise_step(n: int) -> None:
        images = x(n)
        with frozen(cnn):
            logits = explainer._logits(images)
            task, reg, _ = explainer._loss(images, logits, predict_batch(cnn, images).detach(),
                                           None)
            (task.mean() + reg.mean()).backward()

    def ig_step(n: int) -> None:  # one internal batch: n path points of one subject
        images = x(n).requires_grad_(True)
        with frozen(cnn):
            predict_batch(cnn, images).sum().backward()

    def predict_step(n: int) -> None:
        cnn.eval()
        with torch.no_grad():
            cnn(x(n))

    steps: list[tuple[str, Callable[[int], None], list[nn.Module], int, int]] = [
        ("train_predictor", train_step, [cnn], train.batch_size, 1),
        ("fit_noise_model", noise_step, [explainer.noise_model], maps.batch_size, 1),
        ("integrated_gradients", ig_step, [], 1, IG_INTERNAL_BATCH),
        ("predict", predict_step, [], train.eval_batch_size, 1),
    ]
    for name, step, trained, batch, points in steps:
        one, two = _activation_bytes(step, 1, device), _activation_bytes(step, 2, device)
        per_subject = max(two - one, 0) * points
        fixed = sum(4 * p.numel() * 4 for m in trained for p in m.parameters())  # w, g, 2 Adam
        weights = sum(p.numel() * 4 for p in cnn.parameters())
        if name != "train_predictor":
            fixed += weights  # the frozen predictor is held too
        row = {"step": name, "batch": batch, "per_subject_MB": per_subject / 2**20,
               "fixed_MB": fixed / 2**20}
        if device.type == "cuda":
            row["cuda_peak_per_subject_MB"] = _cuda_peak_per_subject(step, device) * points / 2**20
        rows.append(row)
        cnn.zero_grad(set_to_none=True)
        explainer.noise_model.zero_grad(set_to_none=True)
    return pd.DataFrame(rows)


def _activation_bytes(step: Callable[[int], None], n: int, device: torch.device) -> int:
    """Bytes of the tensors autograd saves for the backward pass of ``step(n)`` (each
    storage once; the inputs are among them)."""
    seen: dict[Any, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            storage = t.untyped_storage()
            seen[(storage.data_ptr(), t.device)] = storage.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step(n)
    if not seen:  # inference: no autograd; the largest activation is a fair bound
        return _largest_output_bytes(step, n)
    return sum(seen.values())


def _largest_output_bytes(step: Callable[[int], None], n: int) -> int:
    largest = 0

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        nonlocal largest
        if torch.is_tensor(output):
            largest = max(largest, output.numel() * output.element_size())

    handle = nn.modules.module.register_module_forward_hook(hook)
    try:
        step(n)
    finally:
        handle.remove()
    return 2 * largest  # one layer's input and output are alive at once


def _cuda_peak_per_subject(step: Callable[[int], None], device: torch.device) -> int:
    peaks = []
    for n in (1, 2):
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step(n)
        torch.cuda.synchronize(device)
        peaks.append(torch.cuda.max_memory_allocated(device) - base)
    return max(peaks[1] - peaks[0], 0)


def _parse(args: Any) -> argparse.Namespace:
    if isinstance(args, argparse.Namespace) and hasattr(args, "extra"):
        return build_parser().parse_args(args.extra or [])
    if isinstance(args, argparse.Namespace):
        return args
    return build_parser().parse_args(list(args or []))


def main(argv: Sequence[str] | None = None) -> int:
    run(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
