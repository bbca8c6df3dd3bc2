"""A few minutes on a GPU: does each heavy step run at 1 mm, how fast, in how much memory?

::

    python -m brainage_core.bench.gpu_check                 # 1 mm, 86 subjects, cuda
    python -m brainage_core.bench.gpu_check --resolution 2 --n-subjects 64
    python -m brainage_core.bench.gpu_check --device cpu --resolution 8   # a smoke test

On random volumes on the template grid (speed and memory do not depend on the contents),
with the ``paper`` preset's networks and batch sizes unless told otherwise, it runs

* one epoch of the predictor's training (mixed precision as ``prediction.amp`` chooses:
  bfloat16 on compute capability 8.0 and newer, float16 with a gradient scaler below);
* one epoch of the noise model's training;
* integrated gradients on two subjects (``maps.ig_steps`` path points, internal batch 8);
* prediction of every subject in float32 and in the mixed-precision dtype, and reports
  the largest difference between the two (years);

and prints, per step, the seconds, the subjects per second and the peak GPU memory
(``torch.cuda.max_memory_allocated``). Nothing is written to disk. The figures are to be
reported in the README's GPU section; none has been measured on a GPU yet.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from brainage_core.data.template import load_template
from brainage_core.explain.captum import CaptumExplainer
from brainage_core.explain.noise.amortised import NoiseMapExplainer
from brainage_core.models.distributed import amp_dtype, resolve_device
from brainage_core.models.evaluation import predict
from brainage_core.models.training import TrainConfig, cohort_datasets, train_predictor
from brainage_core.study.config import load_config
from brainage_core.study.maps import MapsConfig


class RandomCohort:
    """An in-memory cohort of random float16 volumes (what the steps read from a cache)."""

    def __init__(self, n: int, shape: Sequence[int], seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.images = rng.standard_normal((n, *shape), dtype=np.float32).astype(np.float16)
        split = np.array(["train"] * n, dtype=object)
        split[n - max(n // 4, 1):] = "val"
        self.table = pd.DataFrame({"participant_id": [f"sub-{i:05d}" for i in range(n)],
                                   "age": rng.uniform(45, 80, n), "split": split})
        self.mask = np.ones(tuple(shape), dtype=bool)

    def __len__(self) -> int:
        return len(self.table)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m brainage_core.bench.gpu_check",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="paper", help="networks and batch sizes (default: paper)")
    p.add_argument("--resolution", type=int, default=1, help="grid in mm (default: 1)")
    p.add_argument("--n-subjects", type=int, default=None,
                   help="random subjects (default: two full training batches of the preset "
                        "per process, a quarter more for validation: 86 for paper)")
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N, cpu or auto")
    p.add_argument("-p", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                   help="override a config key, e.g. -p prediction.batch_size 4")
    return p


def default_subjects(batch_size: int) -> int:
    """Subjects for two full training batches, plus the quarter :class:`RandomCohort`
    keeps for validation, so the peak memory is that of the batch the preset trains with."""
    return max(16, math.ceil(2 * batch_size * 4 / 3))


def run(args: Any = None) -> pd.DataFrame:
    """Run the checks; print and return the table."""
    ns = args if isinstance(args, argparse.Namespace) else build_parser().parse_args(args)
    device = resolve_device(ns.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA GPU is visible (use --device cpu for a smoke test)")
    config = load_config(ns.preset, overrides=[tuple(kv) for kv in ns.p], validate=False)
    train = TrainConfig.from_dict({**(config.get("prediction") or {}), "epochs": 1,
                                   "device": str(device), "min_epochs": 0})
    maps = MapsConfig.from_dict(config.get("maps"), seed=config.get("seed", 0))
    shape = load_template(ns.resolution).shape
    n_subjects = ns.n_subjects or default_subjects(train.batch_size)
    cohort = RandomCohort(n_subjects, shape)
    dtype = amp_dtype(device, train.amp)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        cap = torch.cuda.get_device_capability(device)
        print(f"{name}, compute capability {cap[0]}.{cap[1]}; mixed precision: {dtype}")
    print(f"grid {ns.resolution} mm {shape}, {n_subjects} random subjects, preset "
          f"{ns.preset}")
    rows = []
    state: dict[str, Any] = {}

    def train_step() -> int:
        data = cohort_datasets(cohort, train)
        state["model"] = train_predictor(train, data["train"], data["val"],
                                         progress=False).model
        return len(data["train"])

    def noise_step() -> int:
        data = cohort_datasets(cohort, train)
        explainer = NoiseMapExplainer(state["model"], maps.noise, **maps.network_kwargs())
        explainer.fit(data["train"], epochs=1, batch_size=maps.batch_size, lr=maps.lr,
                      progress=False, amp=maps.amp, num_workers=maps.num_workers)
        return len(data["train"])

    def ig_step() -> int:
        x = torch.from_numpy(cohort.images[:2].astype(np.float32))[:, None]
        CaptumExplainer(state["model"], "integrated_gradients", n_steps=maps.ig_steps,
                        internal_batch_size=8).attribute(x)
        return 2

    def predict_step() -> int:
        data = cohort_datasets(cohort, train)
        full = np.concatenate([predict(state["model"], data[s], device=device)
                               for s in ("train", "val")])
        mixed = np.concatenate([predict(state["model"], data[s], device=device,
                                        amp_dtype=dtype) for s in ("train", "val")])
        state["difference"] = float(np.max(np.abs(full - mixed)))
        return 2 * len(full)

    for label, step in (("train_predictor (1 epoch)", train_step),
                        ("fit_noise_model (1 epoch)", noise_step),
                        ("integrated_gradients", ig_step),
                        ("predict (fp32 + mixed)", predict_step)):
        rows.append({"step": label, **_timed(step, device)})
    table = pd.DataFrame(rows)
    with pd.option_context("display.width", 200, "display.float_format", "{:.2f}".format):
        print(table.to_string(index=False))
    if dtype is not None:
        print(f"largest |prediction in {dtype} - prediction in float32|: "
              f"{state['difference']:.3f} years")
    else:
        print("no mixed precision on this device: predictions are float32 only")
    return table


def _timed(step: Callable[[], int], device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    n = step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda"
            else float("nan"))
    return {"seconds": seconds, "subjects_per_second": n / max(seconds, 1e-9),
            "peak_GB": peak}


def main(argv: Sequence[str] | None = None) -> int:
    run(list(argv) if argv is not None else None)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
