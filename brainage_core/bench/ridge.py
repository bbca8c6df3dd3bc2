"""The ridge baseline's two solvers side by side: time and agreement.

::

    python -m brainage_core.bench.ridge                        # CPU, two problem sizes
    python -m brainage_core.bench.ridge --device cuda          # the torch solver on a GPU
    python -m brainage_core.bench.ridge --sizes 10000x250000   # the 1 mm scale (GPU)

For each size (training subjects x voxel features; random features whose first 50 carry
the age), it fits scikit-learn's StandardScaler + RidgeCV (float64, CPU) and
:func:`~brainage_core.models.baseline.fit_torch_ridge` on ``--device``, and prints both
times, the penalties they chose, the largest difference of their leave-one-out errors
and of their predictions. ``--skip-sklearn`` times the torch solver alone (at 1 mm
scikit-learn needs some 40 GB of RAM).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import pandas as pd
import torch

from brainage_core.models.baseline import DEFAULT_ALPHAS, fit_torch_ridge


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m brainage_core.bench.ridge", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["700x4000", "2000x30000"],
                   help="NxP problem sizes (default: 700x4000 2000x30000)")
    p.add_argument("--device", default="cpu", help="device of the torch solver (cpu, cuda)")
    p.add_argument("--skip-sklearn", action="store_true", help="time the torch solver alone")
    return p


def run(args: Any = None) -> pd.DataFrame:
    """Time both solvers on each size; print and return the table."""
    if args is None or isinstance(args, list):
        ns = build_parser().parse_args(args)
    else:
        ns = build_parser().parse_args(list(getattr(args, "extra", []) or []))
    from sklearn.linear_model import RidgeCV
    from sklearn.preprocessing import StandardScaler

    warm = np.random.default_rng(1).normal(size=(20, 30)).astype(np.float32)
    fit_torch_ridge(warm, warm[:, 0], device=ns.device)  # load the libraries once
    RidgeCV(alphas=DEFAULT_ALPHAS).fit(warm, warm[:, 0])
    rows = []
    for size in ns.sizes:
        n, p = (int(v) for v in size.lower().split("x"))
        rng = np.random.default_rng(0)
        x = rng.normal(size=(n, p)).astype(np.float32)
        k = min(50, p)
        y = x[:, :k] @ rng.normal(size=k) + 60 + rng.normal(size=n)
        row: dict[str, Any] = {"n": n, "p": p}
        if ns.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        ours = fit_torch_ridge(x, y, DEFAULT_ALPHAS, device=ns.device)
        if ns.device.startswith("cuda"):
            torch.cuda.synchronize()
        row.update(torch_seconds=time.perf_counter() - start, torch_alpha=ours.alpha_,
                   form=ours.form)
        if not ns.skip_sklearn:
            start = time.perf_counter()
            scaler = StandardScaler().fit(x)
            ridge = RidgeCV(alphas=DEFAULT_ALPHAS, store_cv_results=True).fit(
                scaler.transform(x), y)
            row.update(sklearn_seconds=time.perf_counter() - start, sklearn_alpha=ridge.alpha_)
            reference = ridge.cv_results_.mean(0)
            row["loo_max_rel_diff"] = float(np.max(np.abs(ours.loo_mse / reference - 1)))
            test = rng.normal(size=(200, p)).astype(np.float32)
            row["pred_max_abs_diff"] = float(np.max(np.abs(
                ours.predict(test) - ridge.predict(scaler.transform(test)))))
            row["torch_over_sklearn_time"] = row["torch_seconds"] / row["sklearn_seconds"]
        rows.append(row)
        print(pd.DataFrame([row]).to_string(index=False), flush=True)
    return pd.DataFrame(rows)


if __name__ == "__main__":  # pragma: no cover
    run()
