"""Benchmark of the predictor: accuracy against the oracle and the baseline, and speed.

Trains the CNN on the default-sized synthetic cohort (the ``default`` preset: about 1,000
subjects at 4 mm) and prints

- test MAE (uncorrected and bias-corrected), the oracle MAE and the ridge-baseline MAE;
- the ratios test/oracle (goal <= 1.3) and test/baseline (goal <= 0.7);
- seconds per epoch, training subjects per second, total training time (goal <= 15 min
  on 2 CPU cores) and peak resident memory.

``--robustness`` instead trains the preset's recipe on the robustness cohorts of issue 11,
made by the project's own generator and prepared to the preset's grid (4 mm): the default
ageing with 200, 400 and 1,000 subjects; one small subcortical (putamen atrophy), one
cortical (precentral thinning) and one ventricular effect alone (400 subjects each); and
400-subject cohorts rendered at 2 mm and 1 mm. It prints one row per cohort: CNN, ridge and
oracle MAE, the ratios, whether the CNN learned, and the minutes. ``--cases`` picks rows,
``--n-scale`` shrinks every cohort (say so when you report such figures).

``--reliance N`` also measures what the trained predictor reads (synthetic cohorts): N test
subjects are rendered again with one planted effect aged by 10 years at a time
(:func:`brainage_core.analysis.reliance.effect_reliance`), and each effect's share of the
summed shifts is printed (and added to each ``--robustness`` row).

``--sweep`` first times the settings that matter on a CPU (data loading from the float16
memmap against a float32 copy in memory, torch threads, ``channels_last_3d``, batch size)
on the cohort's grid, and prints training subjects per second for each.

Usage::

    brainage-study bench predict [--n-subjects 1000] [--epochs 30] [--sweep]
    brainage-study bench predict --robustness [--cases putamen,cortex] [--n-scale 0.5]
    brainage-study bench predict --reliance 16 -p prediction.augment '{"erase": 0.5}'
    python -m brainage_core.bench.predict --n-subjects 300 --epochs 5
    torchrun --nproc_per_node=2 -m brainage_core.bench.predict   # multi-GPU
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from brainage_core._utils.docs import fill_doc
from brainage_core._utils.validation import BrainAgeInputError, check_positive
from brainage_core.data.cohort import load_cohort
from brainage_core.data.datasets import CohortDataset
from brainage_core.data.protocol import Cohort
from brainage_core.models.baseline import fit_ridge_baseline
from brainage_core.models.cnn import BrainAgeCNN
from brainage_core.models.evaluation import (
    predict,
    prediction_metrics,
    prediction_table,
    regression_metrics,
)
from brainage_core.models.training import TrainConfig, cohort_datasets, train_predictor
from brainage_core.study.config import load_config

#: Goals of the study (printed beside the figures).
GOALS = {"ratio_test_oracle": 1.2, "ratio_test_baseline": 0.7, "train_minutes": 8.0}

#: The robustness cohorts: name -> (synthetic-cohort settings, what the row checks).
ROBUSTNESS_CASES: dict[str, dict[str, Any]] = {
    "n200": {"n_subjects": 200, "resolution": 4},
    "n400": {"n_subjects": 400, "resolution": 4},
    "n1000": {"n_subjects": 1000, "resolution": 4},
    "putamen": {"n_subjects": 400, "resolution": 4, "effects": [
        {"kind": "atrophy", "regions": ["Putamen"], "strength": 0.4}]},
    "cortex": {"n_subjects": 400, "resolution": 4, "effects": [
        {"kind": "cortical_thinning", "regions": ["Precentral Gyrus"], "strength": 0.5}]},
    "ventricles": {"n_subjects": 400, "resolution": 4, "effects": [
        {"kind": "ventricle_expansion", "regions": ["Lateral Ventricle"], "strength": 2.5,
         "onset": 30.0, "form": "quadratic"}]},
    "input2mm": {"n_subjects": 400, "resolution": 2},
    "input1mm": {"n_subjects": 400, "resolution": 1, "render_resolution": 1},
}


def build_parser() -> argparse.ArgumentParser:
    """Arguments of the benchmark."""
    p = argparse.ArgumentParser(prog="brainage-study bench predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="default", help="config preset (default: default)")
    p.add_argument("--n-subjects", type=int, default=None,
                   help="synthetic cohort size (default: the preset's)")
    p.add_argument("--resolution", type=int, default=None, help="cache grid in mm")
    p.add_argument("-p", "--set", nargs=2, action="append", default=[],
                   metavar=("KEY", "VALUE"), help="config override, e.g. prediction.epochs 5")
    p.add_argument("--cache-dir", default=None, help="data cache (default: the preset's)")
    p.add_argument("--out", default=None, help="folder for the checkpoint and results.json")
    p.add_argument("--sweep", action="store_true", help="time CPU settings first")
    p.add_argument("--sweep-only", action="store_true", help="only time CPU settings")
    p.add_argument("--robustness", action="store_true",
                   help="train on the robustness cohorts and print one row per cohort")
    p.add_argument("--cases", default=",".join(ROBUSTNESS_CASES),
                   help=f"robustness cohorts, comma-separated (of {', '.join(ROBUSTNESS_CASES)})")
    p.add_argument("--n-scale", type=float, default=1.0,
                   help="multiply every robustness cohort's size (default 1)")
    p.add_argument("--reliance", type=int, default=0, metavar="N",
                   help="also measure what the predictor reads on N test subjects "
                   "(synthetic cohorts; default 0: not measured)")
    return p


@fill_doc
def run(args: Any = None) -> dict[str, Any]:
    """Run the benchmark, print its figures and return them.

    Parameters
    ----------
    %(bench_args)s

    Returns
    -------
    dict
        The figures (see the module docstring).
    """
    opts = _parse(args)
    if opts.robustness:
        return run_robustness(opts)
    overrides = [tuple(kv) for kv in opts.set]
    if opts.n_subjects is not None:
        overrides.append(("data.synthetic.n_subjects", opts.n_subjects))
    if opts.resolution is not None:
        overrides += [("data.resolution", opts.resolution),
                      ("data.synthetic.resolution", opts.resolution)]
    if opts.cache_dir is not None:
        overrides.append(("data.cache_dir", opts.cache_dir))
    config = load_config(opts.preset, overrides=overrides)
    cfg = TrainConfig.from_dict({"seed": config.get("seed", 0), **(config["prediction"] or {})})
    t0 = time.perf_counter()
    cohort = load_cohort(config["data"])
    if opts.reliance:
        _synthetic_root(cohort)  # before training, not after
    figures: dict[str, Any] = {
        "n_subjects": len(cohort), "grid": list(cohort.images.shape[1:]),
        "resolution_mm": cohort.resolution, "data_seconds": time.perf_counter() - t0,
        "torch_threads": torch.get_num_threads(), "prediction_config": cfg.to_dict(),
    }
    if opts.sweep or opts.sweep_only:
        figures["sweep"] = sweep(cohort, cfg)
        if opts.sweep_only:
            return figures
    out = Path(opts.out) if opts.out else Path(tempfile.mkdtemp(prefix="bench-predict-"))
    datasets = cohort_datasets(cohort, cfg)
    t1 = time.perf_counter()
    result = train_predictor(cfg, datasets["train"], datasets["val"],
                             checkpoint=out / "predictor.pt", resume=False)
    train_seconds = time.perf_counter() - t1
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return figures
    preds = predict(result.model, cohort, batch_size=cfg.eval_batch_size)
    table, correction = prediction_table(cohort, preds)
    metrics = prediction_metrics(table, correction, oracle_mae=cohort.metadata.get("oracle_mae"))
    t2 = time.perf_counter()
    baseline = fit_ridge_baseline(cohort, factor=cfg.baseline_downsample)
    test = cohort.indices("test")
    base = regression_metrics(cohort.table["age"].to_numpy()[test],
                              baseline.predict(cohort, test))
    figures.update(metrics)
    figures.update({
        "baseline_mae": base["mae"],
        "baseline_alpha": baseline.alpha,
        "baseline_seconds": time.perf_counter() - t2,
        "ratio_test_baseline": metrics["test_mae"] / base["mae"],
        "epochs_run": len(result.history),
        "epochs_planned": result.epochs_planned,
        "best_epoch": result.best_epoch,
        "seconds_per_epoch": result.seconds_per_epoch,
        "subjects_per_second": result.subjects_per_second,
        "train_minutes": train_seconds / 60.0,
        "peak_ram_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    })
    if opts.reliance:
        figures["reliance"] = reliance_shares(result.model, cohort, opts.reliance)
    (out / "results.json").write_text(json.dumps(figures, indent=2, default=str) + "\n")
    _print_figures(figures)
    return figures


def run_robustness(opts: argparse.Namespace) -> dict[str, Any]:
    """Train the preset's recipe on each robustness cohort; print and return the table."""
    cases = [c.strip() for c in opts.cases.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(ROBUSTNESS_CASES))
    if unknown:
        raise BrainAgeInputError(
            f"unknown robustness case(s) {unknown}; known: {list(ROBUSTNESS_CASES)}.")
    if not 0 < opts.n_scale <= 1:
        raise BrainAgeInputError(f"'--n-scale' must be in (0, 1]; {opts.n_scale!r} was given.")
    rows = []
    for name in cases:
        synthetic = dict(ROBUSTNESS_CASES[name])
        synthetic["n_subjects"] = max(40, int(round(synthetic["n_subjects"] * opts.n_scale)))
        overrides = [tuple(kv) for kv in opts.set] + [("data.synthetic", synthetic)]
        if opts.cache_dir is not None:
            overrides.append(("data.cache_dir", opts.cache_dir))
        config = load_config(opts.preset, overrides=overrides)
        cfg = TrainConfig.from_dict({"seed": config.get("seed", 0),
                                     **(config["prediction"] or {})})
        cohort = load_cohort(config["data"])
        t0 = time.perf_counter()
        data = cohort_datasets(cohort, cfg)
        result = train_predictor(cfg, data["train"], data["val"], progress=False)
        minutes = (time.perf_counter() - t0) / 60.0
        table, correction = prediction_table(cohort, predict(result.model, cohort))
        table["baseline_predicted_age"] = fit_ridge_baseline(
            cohort, factor=cfg.baseline_downsample).predict(cohort)
        m = prediction_metrics(table, correction, oracle_mae=cohort.metadata.get("oracle_mae"))
        row = {"case": name, "n": len(cohort), "input_mm": synthetic["resolution"],
               "cnn_mae": m["test_mae"], "ridge_mae": m["baseline_mae"],
               "oracle_mae": m.get("oracle_mae"), "cnn_ridge": m["ratio_test_baseline"],
               "cnn_oracle": m.get("ratio_test_oracle"), "learned": m["learned"],
               "beats_ridge": m["test_mae"] < m["baseline_mae"],
               "epochs": f"{len(result.history)}/{result.epochs_planned}",
               "train_min": minutes}
        if opts.reliance:
            shares = reliance_shares(result.model, cohort, opts.reliance)
            row["reliance_%"] = "/".join(f"{100 * v:.0f}" for v in shares.values())
        rows.append(row)
        print("  ".join(f"{k}={_fmt(v)}" for k, v in row.items()), flush=True)
    print("\nrobustness (goal: CNN < ridge on every cohort; CNN <= 1.5 x oracle at n >= 400)")
    print("| " + " | ".join(rows[0]) + " |" if rows else "(no cases)")
    print("|" + "---|" * len(rows[0]) if rows else "")
    for row in rows:
        print("| " + " | ".join(_fmt(v) for v in row.values()) + " |")
    sys.stdout.flush()
    return {"robustness": rows}


def reliance_shares(model: torch.nn.Module, cohort: Cohort, n: int) -> dict[str, float]:
    """Each planted effect's share of the predictor's response, printed as a table.

    Parameters
    ----------
    model : torch.nn.Module
        The trained predictor.
    cohort : Cohort
        A prepared synthetic cohort (its generator's settings are read from its source).
    n : int
        Test subjects to render again (the first ``n`` of the test split).

    Returns
    -------
    dict
        ``"<effect kind> (<regions>)"`` -> share of the summed single-effect shifts.

    Raises
    ------
    BrainAgeInputError
        When ``n`` is not positive or the cohort was not made by the generator.
    """
    from brainage_core.analysis.reliance import effect_reliance

    check_positive("--reliance", n, integer=True)
    root = _synthetic_root(cohort)
    ids = cohort.table["participant_id"].to_numpy()[cohort.indices("test")[:n]]
    table = effect_reliance(model, root, cohort.template, list(ids), progress=False)
    print(f"what the predictor reads ({len(ids)} test subjects, each effect aged by "
          "10 years alone):")
    print(table[["effect", "kind", "mean_shift", "sd_shift", "share"]].to_string(index=False),
          flush=True)
    single = table[table["effect"] != "all"]
    return {f"{k} ({r})": float(v) for k, r, v in
            zip(single["kind"], single["regions"], single["share"], strict=True)}


def _synthetic_root(cohort: Cohort) -> str:
    """The generator's folder of a synthetic cohort; a clear error for any other cohort."""
    root = cohort.metadata.get("source_root")
    if cohort.metadata.get("source") != "synthetic" or not root:
        raise BrainAgeInputError("'--reliance' needs a synthetic cohort (the generator "
                                 "re-renders each effect); this cohort's source is "
                                 f"{cohort.metadata.get('source')!r}.")
    return str(root)


def _fmt(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def sweep(cohort: Cohort, cfg: TrainConfig, *, steps: int = 6) -> list[dict[str, Any]]:
    """Time training steps under several CPU settings on the cohort's grid.

    Each setting trains ``steps`` batches of training subjects (the first is a warm-up
    and is not timed) and reports subjects per second; data loading from the memmap is
    timed separately.

    Parameters
    ----------
    cohort : PreparedCohort
        The cohort (its grid and training subjects are used).
    cfg : TrainConfig
        The base settings (model width and depth).
    steps : int, default=6
        Batches per setting.

    Returns
    -------
    list of dict
        One row per setting.
    """
    rows = []
    idx = cohort.indices("train")[:64]
    t = time.perf_counter()
    lazy = CohortDataset(cohort, indices=idx)
    for i in range(len(lazy)):
        lazy[i]
    read = (time.perf_counter() - t) / len(lazy)
    t = time.perf_counter()
    eager = CohortDataset(cohort, indices=idx, preload=True)
    convert = (time.perf_counter() - t) / len(eager)
    t = time.perf_counter()
    for i in range(len(eager)):
        eager[i]
    hit = (time.perf_counter() - t) / len(eager)
    rows.append({"setting": "load: memmap float16 -> float32, ms/subject",
                 "value": 1e3 * read})
    rows.append({"setting": "load: preload conversion, ms/subject", "value": 1e3 * convert})
    rows.append({"setting": "load: preloaded item, ms/subject", "value": 1e3 * hit})
    print(*(f"  {r['setting']:<48} {r['value']:8.3f}" for r in rows), sep="\n", flush=True)
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            for channels_last in (False, True):
                for batch in (8, 16, 32):
                    sps = _steps_per_second(eager, cfg, threads, channels_last, batch, steps)
                    row = {"setting": f"threads={threads} channels_last={channels_last} "
                                      f"batch={batch}, subjects/s", "value": sps}
                    print(f"  {row['setting']:<48} {sps:8.2f}", flush=True)
                    rows.append(row)
    finally:
        torch.set_num_threads(old)
    return rows


def _steps_per_second(data: CohortDataset, cfg: TrainConfig, threads: int,
                      channels_last: bool, batch: int, steps: int) -> float:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    ages = data.ages.numpy()
    model = BrainAgeCNN(**cfg.model_kwargs(data.shape, ages))
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for s in range(steps):
        sel = [(s * batch + k) % len(data) for k in range(batch)]
        t = time.perf_counter()
        x = torch.stack([data[i][0] for i in sel])
        age = data.ages[sel]
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        loss = model.loss(model.raw(x), age, cfg.loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return batch / float(np.median(times[1:]))


def _print_figures(f: dict[str, Any]) -> None:
    def line(name: str, value: Any, goal: str = "") -> None:
        text = f"{value:.3f}" if isinstance(value, float) else str(value)
        print(f"  {name:<44} {text:>10}  {goal}")

    def verdict(key: str, value: float | None) -> str:
        if value is None:
            return ""
        ok = value <= GOALS[key]
        return f"(goal <= {GOALS[key]}: {'met' if ok else 'NOT met'})"

    print(f"predictor benchmark: {f['n_subjects']} subjects, grid {f['grid']} "
          f"({f['resolution_mm']} mm), {f['torch_threads']} torch threads")
    line("test MAE (years)", f["test_mae"])
    line("learned (val MAE < 0.8 x mean predictor)", f.get("learned"))
    line("mean |bias-corrected gap| (not an accuracy)", f["test_corrected_gap_mean_abs"])
    line("bias slope (near -1: constant predictor)", f.get("bias_slope"))
    line("oracle MAE (years)", f.get("oracle_mae"))
    line("baseline (ridge) MAE (years)", f["baseline_mae"])
    line("ratio test / oracle", f.get("ratio_test_oracle"),
         verdict("ratio_test_oracle", f.get("ratio_test_oracle")))
    line("ratio test / baseline", f["ratio_test_baseline"],
         verdict("ratio_test_baseline", f["ratio_test_baseline"]))
    line("test r / R²", f"{f['test_r']:.3f} / {f['test_r2']:.3f}")
    line("corr(corrected gap, true gap)", f.get("gap_corr_true_gap"))
    line("AUC accelerated vs control", f.get("gap_auc_accelerated"))
    line("epochs run (best) / planned",
         f"{f['epochs_run']} ({f['best_epoch'] + 1}) / {f['epochs_planned']}")
    line("seconds per epoch", f["seconds_per_epoch"])
    line("training subjects per second", f["subjects_per_second"])
    line("training minutes", f["train_minutes"], verdict("train_minutes", f["train_minutes"]))
    line("peak RAM (MB)", f["peak_ram_mb"])
    sys.stdout.flush()


def _parse(args: Any) -> argparse.Namespace:
    if args is None:
        argv: list[str] = []
    elif isinstance(args, argparse.Namespace):
        argv = list(getattr(args, "extra", None) or [])
    else:
        argv = [str(a) for a in args]
    opts = build_parser().parse_args(argv)
    check_positive("--reliance", opts.reliance, integer=True, allow_zero=True)
    return opts


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (``python -m brainage_core.bench.predict``)."""
    run(sys.argv[1:] if argv is None else argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
