"""The run-level map steps on a tiny cohort prepared through the real data layer."""

from __future__ import annotations

from dataclasses import replace

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from helpers.maps import PLANTED_PATTERN, fit_region_predictor, make_cohort

from brainage_core._utils.validation import BrainAgeInputError
from brainage_core.analysis.truth import GridTruth
from brainage_core.study import average, compare, explain, maps
from brainage_core.study.maps import MapsConfig
from brainage_core.study.rundir import RunDir

torch.set_num_threads(1)

SETTINGS = {
    "lam": 3.0,
    "s_max": 1.0,
    "channels": 4,
    "epochs": 30,
    "batch_size": 2,
    "lr": 1e-2,
    "per_subject_steps": 30,
    "timing_subjects": 2,
    "age_band_min_subjects": 1,
    "min_region_voxels": 3,
    "compare_subjects": 2,
    "ig_steps": 4,
    "deletion_steps": 4,
    "baselines": ["saliency"],
    "bootstrap": 20,
    "sanity_epochs": 1,
    "sanity_train_subjects": 4,
    "road_subjects": 2,
    "seed": 0,
}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("cohort"), 20)


def make_study(tmp_path, cohort, **overrides):
    prepared, region = cohort
    settings = MapsConfig.from_dict({**SETTINGS, **overrides})
    truth = GridTruth(mask=region & prepared.mask, regions=[PLANTED_PATTERN])
    return maps.MapsStudy(
        run=RunDir(tmp_path / "run"),
        config={},
        settings=settings,
        cohort=prepared,
        predictor=fit_region_predictor(prepared, region),
        truth=truth,
    )


def test_steps_write_maps_tables_and_metrics(tmp_path, cohort):
    study = make_study(tmp_path, cohort)
    prepared, region = cohort
    fit = explain.fit_noise_model(study, progress=False)
    assert study.noise_checkpoint.is_file() and fit.calibration is None
    assert fit.explainer.epochs_trained == 30 and fit.train_seconds > 0
    # a second call loads the finished checkpoint instead of training again
    again = explain.fit_noise_model(study, progress=False)
    assert again.train_seconds == pytest.approx(fit.train_seconds)
    x = study.images(study.indices("test"))
    assert torch.equal(again.explainer.attribute(x), fit.explainer.attribute(x))

    index = explain.write_subject_maps(study, fit.explainer, progress=False)
    assert len(index) == len(study.indices("test"))
    for pid, rel in zip(index["participant_id"], index["path"], strict=True):
        assert rel == f"maps/{pid}_importance.nii.gz"
        img = nib.load(study.run.root / rel)
        assert img.shape == prepared.mask.shape
        assert np.allclose(img.affine, prepared.affine)
        assert int(img.header["sform_code"]) == 4  # MNI space: opens aligned in viewers

    timing = explain.time_methods(study, fit.explainer)
    assert list(timing["method"]) == ["noise", "noise_per_subject"]
    assert (timing["ms_per_subject"] > 0).all()

    result = average.population_maps(study)
    pop = nib.load(result.paths["all"])
    assert pop.shape == prepared.mask.shape and np.allclose(pop.affine, prepared.affine)
    assert all(path.is_file() for path in result.paths.values())
    regions = pd.read_csv(study.run.tables / "regions.csv")
    assert PLANTED_PATTERN in regions["name"].iloc[0]  # the planted region ranks first
    scores = average.score_population(study, result)
    assert scores["localisation_auroc"] > 0.9
    assert scores["planted_top"]
    assert scores["relevance_mass"] > 2 * scores["relevance_mass_uniform"]
    metrics = study.run.read_metrics()
    noise = metrics["maps"]["noise"]
    for key in (
        "localisation_auroc",
        "relevance_mass",
        "deletion_auc",
        "ms_per_subject",
        "train_seconds",
        "lam",
    ):
        assert key in noise, key
    assert metrics["regions"]["top"][0] == regions["name"].iloc[0]

    result = compare.compare_methods(study, fit.explainer, progress=False)
    table, curves, mean_maps = result.scores, result.curves, result.mean_maps
    assert list(table["method"]) == [
        "noise", "noise_per_subject", "saliency", maps.RANDOM, maps.CEILING
    ]
    assert set(curves["method"]) == set(table["method"])
    assert set(curves["kind"]) == {"deletion", "insertion", "road_morf", "road_lerf"}
    for name in ("method_comparison", "sanity_checks", "region_rank_intervals"):
        assert study.run.table(name).is_file(), name
    assert mean_maps["saliency"].shape == prepared.mask.shape
    assert result.subject_maps["saliency"].shape == prepared.mask.shape
    assert set(result.sanity["method"]) == set(table["method"])
    rows = table.set_index("method")
    # every method has its interval around its own value, a cost and a sanity verdict
    assert (rows["localisation_auroc_lo"] <= rows["localisation_auroc"] + 1e-9).all()
    assert (rows["localisation_auroc"] <= rows["localisation_auroc_hi"] + 1e-9).all()
    assert (rows["ms_per_subject"] > 0).all()
    assert rows.loc[maps.CEILING, "sanity_result"] == "reference"
    assert rows.loc["saliency", "sanity_result"] in {"pass", "FAIL"}
    # the ceiling map ignores the model: randomising it changes nothing
    assert rows.loc[maps.CEILING, "sanity_spearman_all"] == pytest.approx(1.0)
    rows = table.set_index("method")
    noise_row = rows.loc["noise"]
    # like for like: the learned budget protects the prediction better than moved around
    assert noise_row["budget_shift_learned"] < noise_row["budget_shift_permuted"]
    assert noise_row["budget_shift_permuted"] < noise_row["budget_shift_inverted"]
    assert noise_row["fixed_noise_shift_map"] < noise_row["fixed_noise_shift_inverted"]
    # the model-free ceiling map finds the planted region from the data alone
    assert rows.loc[maps.CEILING, "localisation_auroc"] > 0.9
    assert (study.run.maps / maps.CEILING_MAP).is_file()
    # the per-subject mode ran at the amortised model's operating point and stopped
    per_subject = rows.loc["noise_per_subject"]
    assert 0 < per_subject["per_subject_mean_b_target"] < 1
    assert per_subject["per_subject_steps_run"] <= study.settings.per_subject_steps
    # like for like with its own learned budget (not the amortised model's: another set of
    # values, so another permuted shift); the amortised budget placed by its ranks is a column
    assert per_subject["budget_shift_learned"] < per_subject["budget_shift_inverted"]
    assert per_subject["budget_shift_permuted"] != noise_row["budget_shift_permuted"]
    assert per_subject["amortised_budget_shift_permuted"] == pytest.approx(
        noise_row["budget_shift_permuted"])
    assert "saliency" in study.run.read_metrics()["maps"]
    # what notebook 06 shows after the step ran under torchrun: the same, read back
    loaded = compare.load_comparison(study)
    pd.testing.assert_frame_equal(loaded.scores, table, check_dtype=False)
    pd.testing.assert_frame_equal(loaded.curves, curves, check_dtype=False)
    pd.testing.assert_frame_equal(loaded.sanity, result.sanity, check_dtype=False)
    for name in table["method"]:
        assert np.allclose(loaded.mean_maps[name], mean_maps[name], atol=1e-6)
        assert np.allclose(loaded.subject_maps[name], result.subject_maps[name], atol=1e-6)
    # a comparison without the sanity check leaves no earlier sanity table to read back
    lean = replace(study.settings, sanity_subjects=0, bootstrap=0)
    compare.compare_methods(replace(study, settings=lean), fit.explainer, methods=[],
                            progress=False)
    assert compare.load_comparison(study).sanity.empty
    assert not study.run.table("sanity_checks").exists()


def test_calibrated_lambda_is_kept_and_reused(tmp_path, cohort):
    study = make_study(
        tmp_path,
        cohort,
        calibrate=True,
        lambdas=[0.3, 3.0],
        epochs=2,
        calibration_epochs=2,
        tolerance=2.0,
    )
    fit = explain.fit_noise_model(study, progress=False)
    curve = pd.read_csv(study.run.tables / "lambda_calibration.csv")
    assert list(curve["lam"]) == [0.3, 3.0] and curve["chosen"].sum() == 1
    assert fit.explainer.noise.lam == curve.loc[curve["chosen"], "lam"].iloc[0]
    assert study.run.read_metrics()["maps"]["noise"]["lam"] == fit.explainer.noise.lam
    # a changed config retrains (with a warning) instead of resuming a foreign checkpoint
    other = make_study(tmp_path, cohort, lam=30.0, epochs=1)
    with pytest.warns(UserWarning, match="training a new noise model"):
        refit = explain.fit_noise_model(other, progress=False)
    assert refit.explainer.noise.lam == 30.0 and refit.explainer.epochs_trained == 1


class CountingExplainer:
    """Wraps an explainer and records which subjects it was asked to explain."""

    def __init__(self, inner):
        self.inner = inner
        self.n_images = 0

    def attribute(self, x):
        self.n_images += x.shape[0]
        return self.inner.attribute(x)


def test_map_extraction_shards_and_resumes(tmp_path, cohort):
    study = make_study(tmp_path, cohort, epochs=2)
    fit = explain.fit_noise_model(study, progress=False)
    n_test = len(study.indices("test"))
    halves = []
    for index in (0, 1):
        counting = CountingExplainer(fit.explainer)
        part = explain.write_subject_maps(study, counting, shard=(index, 2), progress=False)
        assert counting.n_images == len(part)
        halves.append(set(part["participant_id"]))
    assert not halves[0] & halves[1] and len(halves[0] | halves[1]) == n_test
    assert not (study.run.table("subject_maps")).exists()  # shards write no index
    # Collecting explains nobody again and writes the index of every subject.
    counting = CountingExplainer(fit.explainer)
    index = explain.write_subject_maps(study, counting, progress=False)
    assert counting.n_images == 0 and set(index["participant_id"]) == halves[0] | halves[1]
    assert len(pd.read_csv(study.run.table("subject_maps"))) == n_test
    # A lost or truncated map is made again, and only that one.
    first = study.run.root / index["path"].iloc[0]
    first.write_bytes(b"truncated")
    counting = CountingExplainer(fit.explainer)
    explain.write_subject_maps(study, counting, progress=False)
    assert counting.n_images == 1 and nib.load(first).shape == study.cohort.mask.shape
    # resume=False explains everyone again.
    counting = CountingExplainer(fit.explainer)
    explain.write_subject_maps(study, counting, resume=False, progress=False)
    assert counting.n_images == n_test
    # ... and its maps are not trusted by a later resume.
    counting = CountingExplainer(fit.explainer)
    explain.write_subject_maps(study, counting, progress=False)
    assert counting.n_images == n_test
    with pytest.raises(BrainAgeInputError, match="'shard'"):
        explain.write_subject_maps(study, fit.explainer, shard=(2, 2), progress=False)


def test_maps_of_another_noise_model_are_not_reused(tmp_path, cohort):
    study = make_study(tmp_path, cohort, epochs=1)
    fit = explain.fit_noise_model(study, progress=False)
    explain.write_subject_maps(study, fit.explainer, progress=False)
    # Another noise model in the same run folder (for example retrained with --force).
    study.noise_checkpoint.unlink()
    other = make_study(tmp_path, cohort, epochs=1, lam=30.0)
    refit = explain.fit_noise_model(other, progress=False)
    counting = CountingExplainer(refit.explainer)
    explain.write_subject_maps(other, counting, progress=False)
    assert counting.n_images == len(other.indices("test"))


def test_a_shard_that_finds_no_source_record_deletes_no_map(tmp_path, cohort):
    # The race of issue 16: a shard that checked the maps' source before another shard
    # recorded it used to delete every map, including those the other shard had written.
    study = make_study(tmp_path, cohort, epochs=1)
    fit = explain.fit_noise_model(study, progress=False)
    first = explain.write_subject_maps(study, fit.explainer, shard=(0, 2), progress=False)
    study.run.maps_source.unlink(missing_ok=True)  # as the other shard saw the folder
    explain.write_subject_maps(study, fit.explainer, shard=(1, 2), progress=False)
    assert all((study.run.root / rel).is_file() for rel in first["path"])
    counting = CountingExplainer(fit.explainer)
    explain.write_subject_maps(study, counting, progress=False)
    assert counting.n_images == 0
    # Each map names the noise model that made it in its own header.
    digest = explain._noise_model_digest(study)
    assert all(explain._map_source(study.run.root / rel) == digest for rel in first["path"])


def test_shards_started_at_the_same_moment_keep_every_map(tmp_path, cohort):
    import threading

    study = make_study(tmp_path, cohort, epochs=1, batch_size=1)
    fit = explain.fit_noise_model(study, progress=False)
    # Stale maps of an earlier noise model, and no source record: the situation in which
    # every shard used to clean the folder.
    for pid in study.participant_ids(study.indices("test")):
        study.run.maps.mkdir(parents=True, exist_ok=True)
        stale = study.cohort.to_image(np.zeros(study.cohort.mask.shape, np.float32))
        stale.header["descrip"] = b"noise_model:" + b"0" * 64
        nib.save(stale, study.run.subject_map(pid))
    start = threading.Barrier(2)
    errors = []

    counters = [CountingExplainer(fit.explainer), CountingExplainer(fit.explainer)]

    def shard(i):
        try:
            start.wait()
            explain.write_subject_maps(study, counters[i], shard=(i, 2), progress=False)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=shard, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    n_test = len(study.indices("test"))
    assert sum(c.n_images for c in counters) == n_test  # every stale map made again, once
    counting = CountingExplainer(fit.explainer)
    index = explain.write_subject_maps(study, counting, progress=False)
    assert counting.n_images == 0 and len(index) == n_test
    digest = explain._noise_model_digest(study)
    assert all(explain._map_source(study.run.root / rel) == digest for rel in index["path"])


def test_a_comparison_process_without_subjects_takes_part_and_writes_nothing(
    tmp_path, cohort, monkeypatch
):
    # Issue 16: under torchrun with more processes than compared subjects, a process has
    # no subject; it must still join every collective (here faked: rank 1 of 2, whose
    # reductions return its own values and whose gather hands its empty share to rank 0)
    # and leave the writing to rank 0.
    from brainage_core.models.distributed import DistContext

    study = make_study(tmp_path, cohort, epochs=1, compare_subjects=1, sanity_subjects=1)
    fit = explain.fit_noise_model(study, progress=False)
    shares = []

    def gather(items, n, ctx):
        shares.append(list(items))

    monkeypatch.setattr(compare, "process_context",
                        lambda device: DistContext(1, 2, torch.device("cpu")))
    monkeypatch.setattr(compare, "all_reduce_max", lambda values, ctx: list(values))
    monkeypatch.setattr(compare, "all_reduce_sum", lambda values, ctx: list(values))
    monkeypatch.setattr(compare, "gather_items", gather)
    assert compare.compare_methods(study, fit.explainer, progress=False) is None
    methods = ["noise", "noise_per_subject", "saliency", maps.RANDOM, maps.CEILING]
    assert len(shares) == 2 * len(methods)  # each method's records and cost, none dropped
    assert shares[0::2] == [[]] * len(methods)  # no subject on this process
    assert not study.run.table("method_comparison").exists()
    assert not study.run.maps.exists() or not any(study.run.maps.glob("method-*"))
