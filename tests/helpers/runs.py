"""A tiny trained run folder, made the way notebooks 01 and 02 make one (seconds, 8 mm)."""

from __future__ import annotations

from pathlib import Path

from brainage_core._utils.io import write_table
from brainage_core.data.cohort import load_cohort
from brainage_core.models.evaluation import predict, prediction_metrics, prediction_table
from brainage_core.models.training import cohort_datasets, train_predictor
from brainage_core.study.predict import write_predict_index
from brainage_core.study.rundir import RunDir
from helpers.predictor import TINY


def make_trained_run(run_dir: Path, bids: Path, cache_dir: Path,
                     split_fractions: tuple[float, float, float] = (0.34, 0.33, 0.33)
                     ) -> RunDir:
    """Train a tiny predictor on a synthetic BIDS cohort; write predictions, metrics, index."""
    run = RunDir(run_dir)
    config = {
        "name": "tiny",
        "seed": 0,
        "data": {"source": "bids", "path": str(bids), "resolution": 8,
                 "cache_dir": str(cache_dir), "split_fractions": list(split_fractions)},
        "prediction": {**TINY, "epochs": 2},
    }
    run.write_config(config)
    cohort = load_cohort(config["data"], progress=False, n_jobs=1)
    datasets = cohort_datasets(cohort, config["prediction"])
    result = train_predictor(config["prediction"], datasets["train"], datasets["val"],
                             checkpoint=run.predictor_checkpoint, progress=False)
    table, correction = prediction_table(cohort, predict(result.model, cohort))
    write_table(run.table("predictions"), table)
    run.update_metrics("prediction", prediction_metrics(table, correction))
    write_predict_index(run.root, cohort=cohort, model=result.model, progress=False)
    return run
