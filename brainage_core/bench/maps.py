"""Benchmark of the noise-model importance maps against planted ground truth.

For the default synthetic cohort and for a **re-planted** cohort (the same generator with
the age effect planted only in other regions, for example the putamen or the occipital
cortex), it trains the predictor, trains the amortised noise model, writes the test
subjects' maps and prints

- the localisation AUROC of the population map against the planted mask (goal >= 0.90),
  per effect beside the predictor's reliance on that effect (see
  :mod:`brainage_core.analysis.reliance`), and its relevance mass (against a uniform map's);
- whether the planted regions are the top-ranked regions (and the share of the top k that
  are planted), with the top regions: a method that always highlights the hippocampus
  and the ventricles, whatever the data, fails the re-planted cohort;
- milliseconds per subject, amortised (one forward pass) against per-subject optimisation;
- the noise-model training time, and the predictor's test MAE.

Every run lives in its own run folder (``--out``, default a temporary folder), so a second
call with the same folder reuses the trained models.

Usage::

    brainage-study bench maps [--preset default] [--replant putamen] [-p KEY VALUE]...
    python -m brainage_core.bench.maps --n-subjects 400 --resolution 8 --replant occipital
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from brainage_core._utils.docs import fill_doc
from brainage_core.study import average, explain, maps
from brainage_core.study.config import load_config
from brainage_core.study.maps import MapsConfig
from brainage_core.study.rundir import RunDir

#: Goals of the study (printed beside the figures).
GOALS = {"localisation_auroc": 0.90}

#: Re-planted cohorts: a single age effect in other regions than the default ones.
REPLANTS: dict[str, list[dict[str, Any]]] = {
    "putamen": [
        {
            "kind": "atrophy",
            "regions": ["Putamen"],
            "strength": 0.5,
            "onset": 40.0,
            "form": "linear",
        }
    ],
    "occipital": [
        {
            "kind": "cortical_thinning",
            "regions": ["Lateral Occipital Cortex", "Occipital Pole"],
            "strength": 0.4,
            "onset": 40.0,
            "form": "linear",
        }
    ],
}


def build_parser() -> argparse.ArgumentParser:
    """Arguments of the benchmark."""
    p = argparse.ArgumentParser(
        prog="brainage-study bench maps",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", default="default", help="config preset (default: default)")
    p.add_argument(
        "--n-subjects", type=int, default=None, help="synthetic cohort size (default: the preset's)"
    )
    p.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="grid of the prepared cohort in mm (default: the preset's)",
    )
    p.add_argument(
        "-p",
        "--set",
        nargs=2,
        action="append",
        default=[],
        metavar=("KEY", "VALUE"),
        help="config override, e.g. maps.epochs 5",
    )
    p.add_argument(
        "--replant",
        choices=(*REPLANTS, "none"),
        default="putamen",
        help="re-planted cohort to check as well (default: putamen)",
    )
    p.add_argument("--skip-default", action="store_true", help="only run the re-planted cohort")
    p.add_argument("--out", default=None, help="folder of the run folders and results.json")
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
        ``{"default": figures, "<replant>": figures}`` (see the module docstring).
    """
    opts = _parse(args)
    out = Path(opts.out) if opts.out else Path(tempfile.mkdtemp(prefix="bench-maps-"))
    overrides: list[tuple[str, Any]] = [tuple(kv) for kv in opts.set]  # type: ignore[misc]
    if opts.n_subjects is not None:
        overrides.append(("data.synthetic.n_subjects", opts.n_subjects))
    if opts.resolution is not None:
        overrides.append(("data.resolution", opts.resolution))
    cohorts: list[tuple[str, list[tuple[str, Any]]]] = []
    if not opts.skip_default:
        cohorts.append(("default", overrides))
    if opts.replant != "none":
        effects = json.dumps(REPLANTS[opts.replant])
        cohorts.append(
            (f"replant-{opts.replant}", [*overrides, ("data.synthetic.effects", effects)])
        )
    results: dict[str, Any] = {}
    for name, cohort_overrides in cohorts:
        config = load_config(opts.preset, overrides=cohort_overrides)
        config["name"] = f"bench-{name}"
        print(f"== {name} cohort", flush=True)
        results[name] = run_cohort(config, out / name)
        _print_figures(name, results[name])
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"run folders and results.json in {out}")
    return results


def run_cohort(config: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Train the predictor and the noise model of one cohort; score the population map."""
    from brainage_core.data.cohort import load_cohort
    from brainage_core.models.evaluation import predict
    from brainage_core.models.training import TrainConfig, cohort_datasets, train_predictor

    run = RunDir(run_dir)
    run.write_config(config)
    t0 = time.perf_counter()
    cohort = load_cohort(config["data"])
    data_seconds = time.perf_counter() - t0
    cfg = TrainConfig.from_dict({"seed": config.get("seed", 0), **(config["prediction"] or {})})
    datasets = cohort_datasets(cohort, cfg)
    t1 = time.perf_counter()
    trained = train_predictor(
        cfg, datasets["train"], datasets["val"], checkpoint=run.predictor_checkpoint
    )
    predictor_seconds = time.perf_counter() - t1
    model = trained.model.eval()
    test = cohort.indices("test")
    preds = predict(model, cohort, batch_size=cfg.eval_batch_size)
    ages = cohort.table["age"].to_numpy()
    test_mae = float(abs(preds[test] - ages[test]).mean())

    settings = MapsConfig.from_dict(config.get("maps"), seed=config.get("seed", 0))
    if settings.num_threads is not None:
        torch.set_num_threads(settings.num_threads)
    study = maps.MapsStudy(
        run=run, config=config, settings=settings, cohort=cohort, predictor=model
    )
    fit = explain.fit_noise_model(study)
    t2 = time.perf_counter()
    explain.write_subject_maps(study, fit.explainer)
    maps_seconds = time.perf_counter() - t2
    timing = explain.time_methods(study, fit.explainer).set_index("method")["ms_per_subject"]
    population = average.population_maps(study)
    scores = average.score_population(study, population)
    truth = maps.load_truth(study)
    reliance = average.model_reliance(study)
    return {
        "n_subjects": len(cohort),
        "grid": list(cohort.images.shape[1:]),
        "resolution_mm": cohort.resolution,
        "data_seconds": data_seconds,
        "predictor_seconds": predictor_seconds,
        "predictor_test_mae": test_mae,
        "oracle_mae": cohort.metadata.get("oracle_mae"),
        "lam": fit.explainer.noise.lam,
        "noise_train_seconds": fit.train_seconds,
        "maps_seconds": maps_seconds,
        "ms_per_subject_amortised": float(timing.get(maps.NOISE, float("nan"))),
        "ms_per_subject_per_subject_mode": float(
            timing.get(maps.NOISE_PER_SUBJECT, float("nan"))
        ),
        "localisation_auroc": scores.get("localisation_auroc"),
        "localisation_auroc_by_effect": scores.get("localisation_auroc_by_effect"),
        "reliance_share": (
            None
            if reliance is None
            else {r.kind: r.share for r in reliance.itertuples() if r.kind != "all"}
        ),
        "relevance_mass": scores.get("relevance_mass"),
        "relevance_mass_uniform": scores.get("relevance_mass_uniform"),
        "planted_top": scores.get("planted_top"),
        "planted_precision_at_k": scores.get("planted_precision_at_k"),
        "planted_ranks": scores.get("planted_ranks"),
        "planted_regions": truth.regions if truth else None,
        "top_regions": list(population.table["name"].head(10)),
        "deletion_auc": scores.get("deletion_auc"),
        "run_dir": str(run.root),
    }


def _print_figures(name: str, f: dict[str, Any]) -> None:
    auroc = f["localisation_auroc"]
    goal = GOALS["localisation_auroc"]
    lines = [
        f"cohort                      {name}: {f['n_subjects']} subjects, "
        f"{f['resolution_mm']} mm grid {f['grid']}",
        f"predictor test MAE          {f['predictor_test_mae']:.2f} y "
        f"(oracle {f['oracle_mae'] if f['oracle_mae'] is None else round(f['oracle_mae'], 2)})",
        f"localisation AUROC          {auroc:.3f}  (goal >= {goal}: "
        f"{'met' if auroc is not None and auroc >= goal else 'NOT met'})",
        *(
            f"  AUROC of {kind:<22}{value:.3f}  (the model's reliance on it: "
            f"{(f.get('reliance_share') or {}).get(kind, float('nan')):.0%})"
            for kind, value in (f.get("localisation_auroc_by_effect") or {}).items()
        ),
        f"relevance mass              {f['relevance_mass']:.3f}  "
        f"(uniform map: {f['relevance_mass_uniform']:.3f})",
        f"planted regions on top      {f['planted_top']}  "
        f"(precision at k: {f['planted_precision_at_k']:.2f})",
        f"top regions                 {', '.join(f['top_regions'][:5])}",
        f"ms per subject              amortised {f['ms_per_subject_amortised']:.1f}, "
        f"per-subject optimisation {f['ms_per_subject_per_subject_mode']:.1f}",
        f"noise-model training        {f['noise_train_seconds']:.1f} s (lambda {f['lam']:g})",
    ]
    print("\n".join(lines), flush=True)


def _parse(args: Any) -> argparse.Namespace:
    parser = build_parser()
    if args is None:
        return parser.parse_args([])
    if isinstance(args, argparse.Namespace):
        return parser.parse_args(list(getattr(args, "extra", None) or []))
    return parser.parse_args(list(args))


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: ``python -m brainage_core.bench.maps``."""
    run(list(sys.argv[1:] if argv is None else argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
