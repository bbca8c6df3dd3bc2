"""Step 06 under ``torchrun``: 2 gloo processes write the comparison of 1 process; and
the cluster recipe (train and maps under ``torchrun``, read back by one process).

Each process explains and scores its share of the compared subjects (every random draw
seeded by the subject's position), the noise model's sanity refits are trained by both
processes together (DDP), and rank 0 gathers and writes the tables. 3 subjects on 2
processes: rank 0 takes positions 0 and 2, rank 1 position 1; the sanity check runs on
positions 0 and 1 (one per process), ROAD on position 0 only (rank 1 has none; a process
with no subject at all is tested in ``test_map_steps.py``).

Tolerances: every score within 1e-4 (absolute; AUROCs, Spearman correlations and shifts
in years) of the single-process one, maps within 1e-5. What is left to differ there is
the rounding of the predictor's forward passes over batches of another composition
(measured: 8e-6 at most). The noise model's sanity columns (its cascade of refits)
within 0.05: the refits are trained with DistributedDataParallel, whose gradient
all-reduce rounds differently from one process, and Adam can amplify rounding;
``tests/explain/test_noise_ddp.py`` bounds the maps of such fits within 0.01 (measured
here: 1e-8, one step on 2 subjects). Cost columns (time, memory) are not compared.
"""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from helpers.runs import MAPS, make_compare_run, run_with_noise_model

from brainage_core.data.cohort import load_cohort
from brainage_core.models.training import cohort_datasets, train_predictor
from brainage_core.study import compare, explain
from brainage_core.study.launch import launch_step
from brainage_core.study.maps import NOISE, MapsStudy
from brainage_core.study.rundir import RunDir

torch.set_num_threads(1)


#: Columns that measure the machine, not the method.
COST = ("ms_per_subject", "peak_rss_mb", "peak_python_mb")


@pytest.fixture(scope="module")
def compare_run(tmp_path_factory) -> RunDir:
    return make_compare_run(tmp_path_factory.mktemp("compare"))


def test_two_torchrun_processes_write_the_comparison_of_one(compare_run, tmp_path):
    one = run_with_noise_model(compare_run, tmp_path / "one")
    two = tmp_path / "two"
    shutil.copytree(one.root, two)
    study = MapsStudy.open(one.root, progress=False)
    single = compare.compare_methods(study, explain.load_noise_model(study), progress=False)
    assert launch_step("compare", two, processes=2) is True
    gathered = compare.load_comparison(MapsStudy.open(two, progress=False))

    a, b = single.scores.set_index("method"), gathered.scores.set_index("method")
    assert list(a.index) == list(b.index) and set(a.columns) == set(b.columns)
    assert {"noise", "noise_per_subject", "smoothgrad", "random"} <= set(a.index)
    numeric = [c for c in a.columns if c not in COST and pd.api.types.is_numeric_dtype(a[c])]
    sanity = [c for c in numeric if c.startswith("sanity_") or c == "robustness_spearman"]
    assert "deletion_auc" in numeric and "road_morf_auc" in numeric
    assert "budget_shift_learned" in numeric and "sanity_spearman_all" in numeric
    models = [m for m in a.index if m != NOISE]
    diff = (a[numeric].astype(float) - b[numeric].astype(float)).abs()
    print("largest differences:", diff.loc[models].max().max(), diff.loc[NOISE].max())
    np.testing.assert_allclose(b.loc[models, numeric].astype(float),
                               a.loc[models, numeric].astype(float), rtol=0, atol=1e-4)
    rest = [c for c in numeric if c not in sanity]
    np.testing.assert_allclose(b.loc[NOISE, rest].astype(float),
                               a.loc[NOISE, rest].astype(float), rtol=0, atol=1e-4)
    np.testing.assert_allclose(b.loc[NOISE, sanity].astype(float),
                               a.loc[NOISE, sanity].astype(float), rtol=0, atol=0.05)
    for column in ("sanity_result", "top_region"):
        assert list(b[column]) == list(a[column]), column
    # the curves, the cascades and the maps, method by method
    np.testing.assert_allclose(gathered.curves["change"], single.curves["change"],
                               rtol=0, atol=1e-4)
    assert list(gathered.sanity["layer"]) == list(single.sanity["layer"])
    for name in a.index:
        for kept, mine in ((single.mean_maps, gathered.mean_maps),
                           (single.subject_maps, gathered.subject_maps)):
            np.testing.assert_allclose(mine[name], kept[name], rtol=0, atol=1e-5,
                                       err_msg=name)
    # the random map and SmoothGrad are random: without per-subject seeds the shards
    # would have drawn other maps; the same seeds give the same maps, new seeds others
    assert not np.allclose(single.subject_maps["random"], single.mean_maps["random"])
    metrics = RunDir(two).read_metrics()["maps"]
    assert metrics["smoothgrad"]["deletion_auc"] == pytest.approx(
        float(a.loc["smoothgrad", "deletion_auc"]), abs=1e-4)


def test_the_cluster_recipe_train_and_maps_under_torchrun_then_one_process_reads_them(
        compare_run, tmp_path):
    # README "GPUs and clusters": the heavy steps run under torchrun between partial runs;
    # the notebooks, in one process, then find finished work and only load it. Training
    # on 2 processes with batch_scope 'per_process' stores a global batch twice the
    # setting, which one process must still read back.
    run = RunDir(shutil.copytree(compare_run.root, tmp_path / "run"))
    config = run.load_config()
    config["prediction"] = {**config["prediction"], "batch_scope": "per_process",
                            "batch_size": 1}
    config["maps"] = dict(MAPS)
    run.write_config(config)
    run.predictor_checkpoint.unlink()
    assert launch_step("train", run.root, processes=2) is True
    log = (run.root / "logs" / "launch-train.log").read_text()
    assert "global batch 2 = 1 per process x 2 processes on cpu" in log
    written = torch.load(run.predictor_checkpoint, weights_only=False)
    assert written["training"]["finished"] and written["train_config"]["batch_size"] == 2

    cohort = load_cohort(config["data"], progress=False, n_jobs=1)
    data = cohort_datasets(cohort, config["prediction"])
    stamp = run.predictor_checkpoint.stat().st_mtime_ns
    again = train_predictor(config["prediction"], data["train"], data["val"],
                            checkpoint=run.predictor_checkpoint, progress=False)
    assert again.history == written["training"]["history"]  # read back, not trained again
    assert run.predictor_checkpoint.stat().st_mtime_ns == stamp

    assert launch_step("maps", run.root, processes=2) is True
    study = MapsStudy.open(run.root, progress=False)
    paths = [run.subject_map(pid) for pid in study.participant_ids(study.indices("test"))]
    assert len(paths) == 3 and all(p.is_file() for p in paths)  # both shards wrote theirs
    stamps = [p.stat().st_mtime_ns for p in paths + [run.noise_checkpoint]]
    fit = explain.fit_noise_model(study, progress=False)
    index = explain.write_subject_maps(study, fit.explainer, progress=False)
    assert [p.stat().st_mtime_ns for p in paths + [run.noise_checkpoint]] == stamps
    assert len(index) == 3 and run.table("subject_maps").is_file()
