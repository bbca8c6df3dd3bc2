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

With ``--compare RUN_DIR`` it prints instead the comparison of every attribution method on
a run folder (step 06, :func:`brainage_core.study.compare.compare_methods`): one row per
method with AUROC and its bootstrap interval, depth-matched AUROC, relevance mass and
rank, deletion / insertion / ROAD areas, the like-for-like ratio, the sanity check,
robustness and milliseconds per subject, and where the noise maps stand against the goal.
The table of the run is read when step 06 has written it, else computed.

With ``--per-subject RUN_DIR`` it scores variants of the per-subject mode instead
(:func:`brainage_core.study.compare.per_subject_variants`): the run's settings, then each
``--variant NAME:KEY=VALUE[,KEY=VALUE]`` (logit coarseness, learning rate, operating point
``mean_b``, added noise), on the comparison subjects, beside the amortised model's AUROC.

Every run lives in its own run folder (``--out``, default a temporary folder), so a second
call with the same folder reuses the trained models.

Usage::

    brainage-study bench maps [--preset default] [--replant putamen] [-p KEY VALUE]...
    brainage-study bench maps --compare runs/default [-p maps.compare_subjects 4]
    brainage-study bench maps --per-subject runs/default --variant coarse4:coarse=4 \
        --variant budget:mean_b=0.8
    python -m brainage_core.bench.maps --n-subjects 400 --resolution 8 --replant occipital
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from brainage_core._utils.docs import fill_doc
from brainage_core._utils.io import write_table
from brainage_core._utils.validation import BrainAgeInputError
from brainage_core.analysis.localisation import localisation_auroc
from brainage_core.study import average, compare, explain, maps
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
    p.add_argument(
        "--perturbations",
        default="additive,replace_mean",
        help="comma-separated perturbations, each scored with its own noise models "
        "(default: additive,replace_mean)",
    )
    p.add_argument(
        "--seeds", default="0,1", help="comma-separated noise-model seeds (default: 0,1)"
    )
    p.add_argument(
        "--convergence-steps",
        default="25,50,100,200",
        help="step budgets of the per-subject convergence table (default: 25,50,100,200)",
    )
    p.add_argument("--out", default=None, help="folder of the run folders and results.json")
    p.add_argument(
        "--compare",
        metavar="RUN_DIR",
        default=None,
        help="print the comparison of every attribution method on this run folder (step 06; "
        "computed when the run has no tables/method_comparison.csv) and stop",
    )
    p.add_argument(
        "--per-subject",
        metavar="RUN_DIR",
        default=None,
        help="score variants of the per-subject mode on this run folder's comparison "
        "subjects (the run's settings first, then each --variant) and stop",
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE[,KEY=VALUE]",
        help="with --per-subject: a variant changing some of "
        f"{', '.join(compare.PER_SUBJECT_VARIANT_KEYS)} (repeat for several), e.g. "
        "coarse4:coarse=4 or budget:mean_b=0.8",
    )
    p.add_argument(
        "--per-subject-steps", type=int, default=100,
        help="with --per-subject: optimisation steps of every variant, the stopping rule off "
        "(default: 100)",
    )
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
    if opts.compare:
        return compare_run(opts.compare, overrides=_maps_overrides(opts.set))
    if opts.per_subject:
        return per_subject_run(opts.per_subject, parse_variants(opts.variant),
                               steps=opts.per_subject_steps,
                               overrides=_maps_overrides(opts.set, "--per-subject"))
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
        results[name] = run_cohort(
            config,
            out / name,
            perturbations=[p for p in opts.perturbations.split(",") if p],
            seeds=[int(v) for v in opts.seeds.split(",") if v],
            convergence_steps=[int(v) for v in opts.convergence_steps.split(",") if v],
        )
        _print_figures(name, results[name])
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    write_table(out / "table.csv", table(results))
    print(f"run folders, results.json and table.csv in {out}")
    return results


def run_cohort(
    config: dict[str, Any],
    run_dir: Path,
    *,
    perturbations: Sequence[str] = ("additive", "replace_mean"),
    seeds: Sequence[int] = (0, 1),
    convergence_steps: Sequence[int] = (25, 50, 100, 200),
) -> dict[str, Any]:
    """Train the predictor of one cohort, then one noise model per perturbation and seed.

    Every noise model gets its own run folder ``<run_dir>/<perturbation>-seed<k>`` (the
    predictor, the cohort, the ground truth and the reliance measurement are shared). For
    each, the population map of the amortised mode and the comparison subjects' maps of
    both modes are scored alike (:func:`brainage_core.study.average.score_map`), with the
    like-for-like faithfulness; the model-free ceiling map is scored once.
    """
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

    base = MapsConfig.from_dict(config.get("maps"), seed=config.get("seed", 0))
    if base.num_threads is not None:
        torch.set_num_threads(base.num_threads)
    shared = maps.MapsStudy(
        run=run, config=config, settings=base, cohort=cohort, predictor=model
    )
    truth = maps.load_truth(shared)
    shared.truth = truth
    reliance = average.model_reliance(shared)
    reliance_section = run.read_metrics().get("reliance")
    ceiling = average.score_ceiling(shared)
    variants: dict[str, Any] = {}
    for perturbation in perturbations:
        for seed in seeds:
            name = f"{perturbation}-seed{seed}"
            print(f"-- noise model {name}", flush=True)
            section = {**(config.get("maps") or {}), "perturbation": perturbation, "seed": seed}
            settings = MapsConfig.from_dict(section, seed=seed)
            vrun = RunDir(run_dir / name)
            vconfig = {**config, "maps": settings.to_dict()}
            vrun.write_config(vconfig)
            if reliance_section:
                vrun.update_metrics("reliance", reliance_section)
            study = maps.MapsStudy(
                run=vrun,
                config=vconfig,
                settings=settings,
                cohort=cohort,
                predictor=model,
                truth=truth,
            )
            variants[name] = _run_variant(study, perturbation, seed, convergence_steps)
    return {
        "n_subjects": len(cohort),
        "grid": list(cohort.images.shape[1:]),
        "resolution_mm": cohort.resolution,
        "data_seconds": data_seconds,
        "predictor_seconds": predictor_seconds,
        "predictor_test_mae": test_mae,
        "oracle_mae": cohort.metadata.get("oracle_mae"),
        "reliance_share": (
            None
            if reliance is None
            else {r.kind: r.share for r in reliance.itertuples() if r.kind != "all"}
        ),
        "planted_regions": truth.regions if truth else None,
        "ceiling": _plain(ceiling),
        "variants": variants,
        "run_dir": str(run.root),
    }


def _run_variant(
    study: Any, perturbation: str, seed: int, convergence_steps: Sequence[int]
) -> dict[str, Any]:
    """Fit, explain and score one noise model (one perturbation, one seed)."""
    fit = explain.fit_noise_model(study)
    t2 = time.perf_counter()
    explain.write_subject_maps(study, fit.explainer)
    maps_seconds = time.perf_counter() - t2
    timing = explain.time_methods(study, fit.explainer).set_index("method")["ms_per_subject"]
    population = average.population_maps(study)
    scores = average.score_population(study, population)
    # the noise maps only: the comparison of every method is --compare's (and step 06's)
    lean = replace(study.settings, sanity_subjects=0, road_subjects=0, bootstrap=0)
    table = compare.compare_methods(
        replace(study, settings=lean), fit.explainer, methods=[], progress=False
    ).scores
    rows = table.set_index("method")
    convergence = compare.per_subject_convergence(
        study, fit.explainer, steps=tuple(convergence_steps)
    )
    modes = {}
    for mode, method in (("amortised", maps.NOISE), ("per_subject", maps.NOISE_PER_SUBJECT)):
        row = rows.loc[method]
        modes[mode] = {
            "comparison_subjects": _plain(row.to_dict()),
            "ms_per_subject": float(timing.get(method, float("nan"))),
        }
    amortised_ms = modes["amortised"]["ms_per_subject"]
    return {
        "perturbation": perturbation,
        "seed": seed,
        "lam": fit.explainer.noise.lam,
        "best_epoch": fit.explainer.best_epoch,
        "noise_train_seconds": fit.train_seconds,
        "maps_seconds": maps_seconds,
        "population": _plain(scores),
        "top_regions": list(population.table["name"].head(10)),
        "modes": modes,
        "speedup": modes["per_subject"]["ms_per_subject"] / amortised_ms if amortised_ms else None,
        "per_subject_convergence": convergence.to_dict(orient="records"),
        "run_dir": str(study.run.root),
    }


def _plain(value: Any) -> Any:
    """JSON-ready copy (numpy scalars to floats, NaN kept)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, str):
        return value.item()
    return value


def table(results: dict[str, Any]) -> pd.DataFrame:
    """One row per cohort, perturbation, seed and mode: the figures of the targets.

    The amortised mode is scored on its population map (all test subjects) and, like the
    per-subject mode, on the comparison subjects (``*_compare`` columns); faithfulness is
    the like-for-like test on the comparison subjects. The ceiling map's figures sit in
    the ``ceiling`` rows.
    """
    rows = []
    for cohort, f in results.items():
        c = f.get("ceiling") or {}
        rows.append(
            {
                "cohort": cohort,
                "perturbation": "-",
                "seed": "-",
                "mode": "ceiling |corr(x, age)|",
                **_scores(c),
            }
        )
        for v in f["variants"].values():
            for mode, m in v["modes"].items():
                comp = m["comparison_subjects"]
                source = v["population"] if mode == "amortised" else comp
                rows.append(
                    {
                        "cohort": cohort,
                        "perturbation": v["perturbation"],
                        "seed": v["seed"],
                        "mode": mode,
                        **_scores(source),
                        "auroc_compare": comp.get("localisation_auroc"),
                        "learned_y": comp.get("budget_shift_learned"),
                        "permuted_y": comp.get("budget_shift_permuted"),
                        "inverted_y": comp.get("budget_shift_inverted"),
                        "learned/permuted": comp.get("budget_shift_learned_ratio"),
                        "inverted/permuted": comp.get("budget_shift_inverted_ratio"),
                        "deletion_auc": comp.get("deletion_auc"),
                        "insertion_auc": comp.get("insertion_auc"),
                        "ms": m["ms_per_subject"],
                    }
                )
    return pd.DataFrame(rows)


def _scores(s: dict[str, Any]) -> dict[str, Any]:
    by_effect = s.get("localisation_auroc_by_effect") or {
        k[len("auroc_") :]: v for k, v in s.items() if k.startswith("auroc_")
    }
    return {
        "auroc": s.get("localisation_auroc"),
        "auroc_core": s.get("localisation_auroc_core"),
        "depth_matched": s.get("localisation_auroc_depth_matched"),
        "rank_corr": s.get("rank_correlation"),
        "reliance_weighted": s.get("localisation_auroc_reliance_weighted"),
        "mass_core": s.get("relevance_mass_core"),
        **{f"auroc_{k}": v for k, v in by_effect.items()},
        "planted_in_top3": s.get("planted_in_top3"),
    }


def _print_figures(name: str, f: dict[str, Any]) -> None:
    goal = GOALS["localisation_auroc"]
    print(
        f"cohort {name}: {f['n_subjects']} subjects, {f['resolution_mm']} mm grid {f['grid']}; "
        f"predictor test MAE {f['predictor_test_mae']:.2f} y (oracle "
        f"{f['oracle_mae'] if f['oracle_mae'] is None else round(f['oracle_mae'], 2)}); "
        f"reliance {f.get('reliance_share')}",
        flush=True,
    )
    t = table({name: f})
    with pd.option_context("display.width", 250, "display.max_columns", 40):
        print(t.drop(columns=["cohort"]).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    c = f.get("ceiling") or {}
    print(
        f"targets: population AUROC >= {goal} and above the ceiling "
        f"({c.get('localisation_auroc', float('nan')):.3f}); learned <= 0.5 x permuted, "
        f"inverted >= 1.5 x permuted; depth-matched within 0.05 of plain; per-subject AUROC "
        f">= 0.80; per-subject / amortised time >= 50; re-planted: planted in top 3 "
        f"(coverage share {c.get('region_coverage')}: {c.get('planted_regions_coverage')})"
    )
    for key, v in f["variants"].items():
        conv = pd.DataFrame(v["per_subject_convergence"])
        print(
            f"{key}: lambda {v['lam']:g}, best epoch {v['best_epoch']}, noise model "
            f"{v['noise_train_seconds']:.0f} s, per-subject/amortised time "
            f"{v['speedup'] or float('nan'):.0f}x; top regions {', '.join(v['top_regions'][:4])}"
        )
        if not conv.empty:
            print(
                "   per-subject convergence: "
                + "; ".join(
                    f"{r.steps} steps (ran {r.steps_run}): objective {r.objective:.2f}, "
                    f"mean B {r.mean_b:.2f}, AUROC {r.localisation_auroc:.3f}"
                    for r in conv.itertuples()
                )
            )
    sys.stdout.flush()


def _maps_overrides(pairs: Sequence[Sequence[str]], option: str = "--compare"
                    ) -> dict[str, Any]:
    """``-p maps.KEY VALUE`` pairs as ``{KEY: value}`` (YAML-parsed values)."""
    import yaml

    out = {}
    for key, value in pairs:
        if not key.startswith("maps."):
            raise BrainAgeInputError(
                f"{option} takes only maps.* overrides; {key!r} was provided."
            )
        out[key[len("maps.") :]] = yaml.safe_load(value)
    return out


def compare_run(run_dir: str | Path, *, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Print (and return) the comparison of every method on a run folder.

    Reads ``tables/method_comparison.csv`` when step 06 has written it and no
    ``overrides`` (``maps`` settings, for example ``{"compare_subjects": 4}``) are
    given; otherwise runs :func:`brainage_core.study.compare.compare_methods` on the run
    (which rewrites the run's comparison tables).
    """
    run = RunDir(run_dir)
    path = run.table("method_comparison")
    if path.is_file() and not overrides:
        scores = pd.read_csv(path)
        print(f"method comparison of {run.root} (from {path.name})", flush=True)
    else:
        print(f"method comparison of {run.root}: computing step 06", flush=True)
        study = maps.MapsStudy.open(run.root, overrides=overrides, progress=False)
        scores = compare.compare_methods(
            study, explain.load_noise_model(study), progress=False
        ).scores
    summary = compare.summary_table(scores)
    with pd.option_context("display.width", 250, "display.max_columns", 40):
        print(summary.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    goal = compare.noise_goal(scores)
    print("noise maps against the goal:")
    for key, value in goal.items():
        print(f"  {key}: {value}")
    sys.stdout.flush()
    return {"scores": _plain(summary.to_dict(orient="records")), "goal": _plain(goal)}


def parse_variants(specs: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``NAME:KEY=VALUE[,KEY=VALUE]`` strings as ``{NAME: {KEY: value}}``, the run's
    settings (``"the run's"``, no change) first; values are read as YAML."""
    import yaml

    variants: dict[str, dict[str, Any]] = {"the run's": {}}
    for spec in specs:
        name, sep, body = spec.partition(":")
        pairs = [part.partition("=") for part in body.split(",") if part]
        if not sep or not name or not pairs or any(not k or not eq for k, eq, _ in pairs):
            raise BrainAgeInputError(
                f"--variant must read NAME:KEY=VALUE[,KEY=VALUE]; {spec!r} was provided.")
        if name in variants:
            raise BrainAgeInputError(f"--variant: the name {name!r} is given twice.")
        variants[name] = {k.strip(): yaml.safe_load(v) for k, _, v in pairs}
    return variants


def per_subject_run(run_dir: str | Path, variants: dict[str, dict[str, Any]], *,
                    steps: int = 100, overrides: dict[str, Any] | None = None
                    ) -> dict[str, Any]:
    """Print (and return) variants of the per-subject mode on a run folder's subjects.

    Runs :func:`brainage_core.study.compare.per_subject_variants` on the comparison
    subjects (``maps.compare_subjects``, or ``overrides``) with the run's noise model,
    beside the amortised model's AUROC on the same subjects. Writes nothing.
    """
    study = maps.MapsStudy.open(run_dir, overrides=overrides, progress=False)
    explainer = explain.load_noise_model(study)
    truth = maps.load_truth(study)
    if truth is None:
        raise BrainAgeInputError(
            "--per-subject needs a synthetic run (its planted truth scores the maps).",
            run_dir)
    images = study.images(study.indices("test", study.settings.compare_subjects))
    amortised = explainer.attribute(images)
    auroc = localisation_auroc(amortised.mean(0)[0].numpy(), truth.mask, study.cohort.mask)
    mean_b = float(explain.mean_noise_levels(study, explainer.noise_level(images)).mean())
    print(f"per-subject variants on {len(images)} comparison subjects of {study.run.root} "
          f"({steps} steps each, the stopping rule off); the amortised model's mean map: "
          f"AUROC {auroc:.3f} at mean B {mean_b:.3f}", flush=True)
    table = compare.per_subject_variants(study, explainer, variants, steps=steps)
    with pd.option_context("display.width", 250, "display.max_columns", 20):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"), flush=True)
    return {"amortised_auroc": auroc, "amortised_mean_b": mean_b,
            "variants": _plain(table.to_dict(orient="records"))}


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
