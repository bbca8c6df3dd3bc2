"""A tiny trained run folder, made the way notebooks 01 and 02 make one (seconds, 8 mm)."""

from __future__ import annotations

import shutil
from pathlib import Path

from brainage_core._utils.io import write_table
from brainage_core.data.cohort import load_cohort
from brainage_core.data.synth import SynthConfig, generate_cohort
from brainage_core.models.evaluation import predict, prediction_metrics, prediction_table
from brainage_core.models.training import cohort_datasets, train_predictor
from brainage_core.study import explain
from brainage_core.study.maps import MapsStudy
from brainage_core.study.predict import write_predict_index
from brainage_core.study.rundir import RunDir
from helpers.predictor import TINY
from helpers.synth import TINY_CONFIG

#: Tiny maps settings: a noise model and a comparison that run in seconds.
MAPS = {
    "epochs": 1, "batch_size": 2, "channels": 2, "depth": 1, "device": "cpu",
    "allow_untrained_predictor": True, "per_subject_steps": 5,
    "compare_subjects": 3, "sanity_subjects": 2, "road_subjects": 1, "deletion_steps": 4,
    "baselines": ["smoothgrad", "integrated_gradients"], "ig_steps": 4, "shap_samples": 2,
    "bootstrap": 10, "sanity_epochs": 1, "sanity_train_subjects": 2, "faithfulness_draws": 2,
    "min_region_voxels": 1, "reliance_subjects": 0,
}


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


def make_compare_run(root: Path) -> RunDir:
    """A tiny trained run on 8 subjects at 8 mm split 3 / 2 / 3 (the model-free ceiling map
    needs 3 training subjects, the bias correction 2 validation subjects)."""
    cohort = generate_cohort(SynthConfig.from_dict({**TINY_CONFIG, "n_subjects": 8}),
                             root / "bids", n_jobs=1, progress=False)
    return make_trained_run(root / "run", cohort, root / "cache",
                            split_fractions=(0.375, 0.25, 0.375))


def run_with_noise_model(trained_run: RunDir, where: Path, **maps: object) -> RunDir:
    """A copy of ``trained_run`` at ``where`` with :data:`MAPS` (updated with ``maps``) and
    a fitted noise model."""
    shutil.copytree(trained_run.root, where)
    run = RunDir(where)
    config = run.load_config()
    config["maps"] = {**MAPS, **maps}
    run.write_config(config)
    study = MapsStudy.open(run.root, progress=False)
    explain.fit_noise_model(study, progress=False)
    return run
