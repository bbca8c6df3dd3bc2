"""Tests of the training loop: overfitting, resume, determinism, early stopping, config."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.predictor import TINY, FakeCohort

from brainage_core._utils.validation import BrainAgeInputError
from brainage_core.data.datasets import Augmentation, CohortDataset
from brainage_core.models.training import (
    TrainConfig,
    cohort_datasets,
    load_predictor,
    train_predictor,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def cohort() -> FakeCohort:
    return FakeCohort(n=30, seed=0)


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize(("head", "lr", "ratio", "mae"),
                         [("regression", 1e-2, 0.02, 0.5), ("soft_label", 1e-2, 0.05, 1.0)])
def test_overfits_a_tiny_set(cohort, head, lr, ratio, mae):
    data = CohortDataset(cohort, indices=np.arange(8))
    # The location-specific (flattened) head: the capacity to memorise 8 subjects.
    cfg = {**TINY, "head": head, "epochs": 150, "batch_size": 8, "learning_rate": lr,
           "patience": 1000, "weight_decay": 0.0, "pool": "flatten"}
    result = train_predictor(cfg, data, data, progress=False)
    first, last = result.history[0]["train_loss"], result.history[-1]["train_loss"]
    assert last < ratio * first
    # On the training subjects themselves the predicted ages are close to the truth
    # (the ages span 45-82 years).
    assert result.best_val_mae < mae


def test_resume_after_interruption_gives_the_uninterrupted_weights(cohort, tmp_path):
    cfg = {**TINY, "epochs": 4, "dropout": 0.2, "augment": {"shift": 1, "noise": 0.05},
           "preload": False}
    ds = cohort_datasets(cohort, cfg)
    full = train_predictor(cfg, ds["train"], ds["val"], checkpoint=tmp_path / "a.pt",
                           progress=False)

    class Interrupted(CohortDataset):
        """Raises KeyboardInterrupt in the middle of the third epoch."""

        calls = 0

        def __getitem__(self, i):
            Interrupted.calls += 1
            if Interrupted.calls > 2.5 * len(self):
                raise KeyboardInterrupt
            return super().__getitem__(i)

    broken = Interrupted(cohort, split="train", augment=cfg["augment"])
    with pytest.raises(KeyboardInterrupt):
        train_predictor(cfg, broken, ds["val"], checkpoint=tmp_path / "b.pt", progress=False)
    assert torch.load(tmp_path / "b.pt", weights_only=False)["training"]["epoch"] == 2
    again = cohort_datasets(cohort, cfg)
    resumed = train_predictor(cfg, again["train"], again["val"], checkpoint=tmp_path / "b.pt",
                              progress=False)
    assert resumed.resumed_from == 2
    _assert_same_weights(_weights(full.model), _weights(resumed.model))
    assert [h["val_mae"] for h in full.history] == [h["val_mae"] for h in resumed.history]
    # A finished checkpoint is loaded, not trained again; load_predictor gives the same model.
    done = train_predictor(cfg, ds["train"], ds["val"], checkpoint=tmp_path / "b.pt",
                           progress=False)
    assert done.resumed_from == 4
    _assert_same_weights(_weights(full.model), _weights(done.model))
    _assert_same_weights(_weights(full.model), _weights(load_predictor(tmp_path / "b.pt")))
    assert not load_predictor(tmp_path / "b.pt").training


def test_training_is_deterministic(cohort):
    cfg = {**TINY, "norm": "batch", "augment": {"shift": 1}}
    first = cohort_datasets(cohort, cfg)
    a = train_predictor(cfg, first["train"], first["val"], progress=False)
    ds = cohort_datasets(cohort, cfg)
    b = train_predictor(cfg, ds["train"], ds["val"], progress=False)
    _assert_same_weights(_weights(a.model), _weights(b.model))
    other = train_predictor({**cfg, "seed": 1}, ds["train"], ds["val"], progress=False)
    assert not torch.equal(a.model.output.weight, other.model.output.weight)


def test_early_stopping_keeps_the_best_epoch(cohort):
    ds = cohort_datasets(cohort, TINY)
    # A huge constant learning rate makes validation worse after the first epochs.
    cfg = {**TINY, "epochs": 30, "patience": 2, "learning_rate": 0.5, "schedule": "constant",
           "min_epochs": 0}
    result = train_predictor(cfg, ds["train"], ds["val"], progress=False)
    maes = [h["val_mae"] for h in result.history]
    assert result.stopped_early and len(maes) < 30
    assert result.best_epoch == int(np.argmin(maes))
    assert len(maes) == result.best_epoch + 1 + 2
    from brainage_core.models.evaluation import predict

    mae = np.mean(np.abs(predict(result.model, ds["val"]) - ds["val"].ages.numpy()))
    assert mae == pytest.approx(min(maes), rel=1e-5)
    # Not before min_epochs (by default half the epochs): a plateau is not the end.
    late = train_predictor({**cfg, "epochs": 12, "min_epochs": None}, ds["train"], ds["val"],
                           progress=False)
    assert len(late.history) >= 6


def test_min_steps_stretches_a_small_cohorts_schedule(cohort):
    ds = cohort_datasets(cohort, TINY)
    base = {**TINY, "batch_size": 4, "patience": 100, "warmup_epochs": 0.0}
    steps = -(-len(ds["train"]) // 4)
    # 2 epochs are too few steps for min_steps: the run becomes the 5-epoch run, step for step.
    short = train_predictor({**base, "epochs": 2, "min_steps": 4 * steps + 1}, ds["train"],
                            ds["val"], progress=False)
    long = train_predictor({**base, "epochs": 5}, ds["train"], ds["val"], progress=False)
    assert short.epochs_planned == 5 and len(short.history) == 5
    assert short.summary()["optimiser_steps"] == 5 * steps
    _assert_same_weights(_weights(short.model), _weights(long.model))
    assert [h["lr"] for h in short.history] == [h["lr"] for h in long.history]
    # Enough steps already: min_steps changes nothing.
    plain = train_predictor({**base, "epochs": 2}, ds["train"], ds["val"], progress=False)
    same = train_predictor({**base, "epochs": 2, "min_steps": steps}, ds["train"], ds["val"],
                           progress=False)
    assert same.epochs_planned == plain.epochs_planned == 2
    _assert_same_weights(_weights(plain.model), _weights(same.model))


def test_resuming_with_other_settings_is_a_clear_error(cohort, tmp_path):
    ds = cohort_datasets(cohort, TINY)
    train_predictor({**TINY, "epochs": 1}, ds["train"], ds["val"],
                    checkpoint=tmp_path / "p.pt", progress=False)
    with pytest.raises(BrainAgeInputError, match="p.pt: .*other settings"):
        train_predictor({**TINY, "epochs": 1, "learning_rate": 0.1}, ds["train"], ds["val"],
                        checkpoint=tmp_path / "p.pt", progress=False)
    # resume=False starts again and overwrites.
    train_predictor({**TINY, "epochs": 1, "learning_rate": 0.1}, ds["train"], ds["val"],
                    checkpoint=tmp_path / "p.pt", resume=False, progress=False)


def test_the_same_subjects_prepared_otherwise_are_not_read_back(tmp_path):
    # Same subjects, same ages, same settings, but other images (as after a change of
    # registration): the finished checkpoint must not be taken for this data's predictor.
    first, second = FakeCohort(n=30, seed=0), FakeCohort(n=30, seed=0)
    second.images = (first.images.astype(np.float32) * 1.01).astype(np.float16)
    ds1, ds2 = cohort_datasets(first, TINY), cohort_datasets(second, TINY)
    assert ds1["train"].fingerprint() != ds2["train"].fingerprint()
    assert ds1["train"].fingerprint() == cohort_datasets(first, TINY)["train"].fingerprint()
    train_predictor({**TINY, "epochs": 1}, ds1["train"], ds1["val"],
                    checkpoint=tmp_path / "p.pt", progress=False)
    with pytest.raises(BrainAgeInputError, match="p.pt: .*other settings or data"):
        train_predictor({**TINY, "epochs": 1}, ds2["train"], ds2["val"],
                        checkpoint=tmp_path / "p.pt", progress=False)
    # a checkpoint written before the fingerprint existed is judged as before
    ckpt = torch.load(tmp_path / "p.pt", weights_only=False)
    del ckpt["data"]["images"]
    torch.save(ckpt, tmp_path / "p.pt")
    train_predictor({**TINY, "epochs": 1}, ds1["train"], ds1["val"],
                    checkpoint=tmp_path / "p.pt", progress=False)


def test_a_checkpoint_from_before_an_augmentation_existed_still_resumes(cohort, tmp_path):
    # A run trained before 'augment.erase' (or 'min_steps') existed stored the other
    # settings only; with the new ones at their defaults it trains the same, so it must
    # resume rather than be refused.
    ds = cohort_datasets(cohort, TINY)
    first = train_predictor({**TINY, "epochs": 1}, ds["train"], ds["val"],
                            checkpoint=tmp_path / "p.pt", progress=False)
    ckpt = torch.load(tmp_path / "p.pt", weights_only=False)
    del ckpt["train_config"]["augment"]["erase"]
    del ckpt["train_config"]["min_steps"]
    torch.save(ckpt, tmp_path / "p.pt")
    again = train_predictor({**TINY, "epochs": 1}, ds["train"], ds["val"],
                            checkpoint=tmp_path / "p.pt", progress=False)
    assert again.history == first.history  # the finished run was read back, not redone
    with pytest.raises(BrainAgeInputError, match="p.pt: .*other settings"):
        train_predictor({**TINY, "epochs": 1, "augment": {"erase": 0.5}}, ds["train"],
                        ds["val"], checkpoint=tmp_path / "p.pt", progress=False)


def test_a_finished_per_process_run_of_n_processes_is_read_back_by_one(cohort, tmp_path):
    # With batch_scope 'per_process' the checkpoint stores the global batch (setting x
    # processes). After `run --nproc N` trains, notebook 02 reads the result back in one
    # process: a finished run must load, an unfinished one must not continue with another
    # global batch.
    ds = cohort_datasets(cohort, TINY)
    cfg = {**TINY, "epochs": 1, "batch_scope": "per_process"}
    first = train_predictor(cfg, ds["train"], ds["val"], checkpoint=tmp_path / "p.pt",
                            progress=False)
    ckpt = torch.load(tmp_path / "p.pt", weights_only=False)
    ckpt["train_config"]["batch_size"] = 2 * cfg["batch_size"]  # as 2 processes write it
    for row in ckpt["training"]["history"]:
        row["processes"] = 2
    torch.save(ckpt, tmp_path / "p.pt")
    again = train_predictor(cfg, ds["train"], ds["val"], checkpoint=tmp_path / "p.pt",
                            progress=False)
    assert [r["val_mae"] for r in again.history] == [r["val_mae"] for r in first.history]
    _assert_same_weights(_weights(again.model), _weights(first.model))
    ckpt["training"]["finished"] = False
    torch.save(ckpt, tmp_path / "p.pt")
    with pytest.raises(BrainAgeInputError, match=r"p.pt: .*written by 2 process\(es\).*"
                       r"resume it with 2"):
        train_predictor(cfg, ds["train"], ds["val"], checkpoint=tmp_path / "p.pt",
                        progress=False)
    # Any other difference is still refused, finished or not.
    ckpt["training"]["finished"] = True
    ckpt["train_config"]["batch_size"] = 3 * cfg["batch_size"]
    torch.save(ckpt, tmp_path / "p.pt")
    with pytest.raises(BrainAgeInputError, match="p.pt: .*other settings"):
        train_predictor(cfg, ds["train"], ds["val"], checkpoint=tmp_path / "p.pt",
                        progress=False)


def test_load_predictor_errors_name_the_file(tmp_path):
    with pytest.raises(BrainAgeInputError, match="missing.pt: no such checkpoint"):
        load_predictor(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(BrainAgeInputError, match="junk.pt: cannot read"):
        load_predictor(tmp_path / "junk.pt")


@pytest.mark.parametrize(
    ("d", "message"),
    [
        ({"loss": "huber"}, r"'loss' must be one of \('mae', 'mse'\); 'huber' was provided"),
        ({"epochs": 0}, "'epochs' must be a positive integer; 0 was provided"),
        ({"min_steps": 0}, "'min_steps' must be a positive integer; 0 was provided"),
        ({"batch_size": 2.5}, "'batch_size' must be a positive integer; 2.5"),
        ({"learning_rate": -1.0}, "'learning_rate' must be a positive number; -1.0"),
        ({"head": "bins"}, "'head' must be one of"),
        ({"schedule": "step"}, "'schedule' must be one of"),
        ({"channels": "16,32"}, "'channels' must be a non-empty list"),
        ({"device": "tpu"}, "'device' must be 'auto', 'cpu' or 'cuda"),
        ({"augment": {"rotate": 5}}, r"unknown 'augment' key\(s\) \['rotate'\]"),
        ({"augment": {"flip": "yes"}}, "'augment.flip' must be true or false"),
        ({"augment": {"erase": 1.5}}, r"'augment.erase' must lie in \[0, 1\]; 1.5"),
        ({"learning_rat": 0.1}, r"unknown 'prediction' key\(s\) \['learning_rat'\]"),
    ],
)
def test_bad_config_gives_clear_errors(d, message):
    with pytest.raises(BrainAgeInputError, match=message):
        TrainConfig.from_dict(d)


def test_config_round_trips_and_defaults_turn_augmentation_off():
    cfg = TrainConfig.from_dict({"channels": [8, 16], "augment": {"shift": 2}})
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert not Augmentation.from_dict(TrainConfig().augment).active


def test_augmentation_is_seeded_by_epoch_and_index(cohort):
    ds = CohortDataset(cohort, split="train", augment={"shift": 2, "noise": 0.1}, seed=3)
    x0 = ds[1][0]
    assert x0.shape == (1, *cohort.images.shape[1:])
    assert torch.equal(x0, ds[1][0])
    ds.set_epoch(1)
    assert not torch.equal(x0, ds[1][0])
    plain = CohortDataset(cohort, split="train")
    assert torch.equal(plain[1][0][0], torch.from_numpy(cohort.image(plain.indices[1])))


def test_erase_removes_the_structure_of_one_box_and_keeps_its_mean():
    # Issue 11: random erasing, so a predictor cannot lean on one cue alone.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((12, 15, 9)).astype(np.float32)
    out = Augmentation(erase=1.0)(x, np.random.default_rng(1))
    changed = out != x
    box = [np.flatnonzero(changed.any(axis=tuple(a for a in range(3) if a != ax)))
           for ax in range(3)]
    assert [len(b) for b in box] == [4, 5, 3]  # a third of each axis
    assert all(np.all(np.diff(b) == 1) for b in box)  # one contiguous box
    inside = np.ix_(*box)
    assert np.allclose(out[inside], x[inside].mean())  # structure gone, mean kept
    assert np.array_equal(out[~changed], x[~changed])  # the rest untouched
    assert np.array_equal(Augmentation(erase=0.0)(x, np.random.default_rng(1)), x)
    assert Augmentation(erase=0.5).active


def test_set_epoch_reaches_persistent_loader_workers(cohort):
    # Issue 16: with persistent workers, each worker holds its own copy of the dataset;
    # the epoch must still reach it, or every epoch repeats the first one's augmentation.
    from torch.utils.data import DataLoader

    ds = CohortDataset(cohort, split="train", augment={"noise": 0.1}, seed=3)
    loader = DataLoader(ds, batch_size=4, num_workers=1, persistent_workers=True)
    first = torch.cat([x for x, _ in loader])
    ds.set_epoch(1)
    second = torch.cat([x for x, _ in loader])
    reference = CohortDataset(cohort, split="train", augment={"noise": 0.1}, seed=3)
    reference.set_epoch(1)
    expected = torch.stack([reference[i][0] for i in range(len(reference))])
    assert not torch.equal(first, second)
    assert torch.equal(second, expected)


def test_loader_workers_do_not_change_the_result(cohort):
    # Issue 16, item 4: with workers, reading, float32 conversion, augmentation and
    # batching leave the training process; training (with augmentation and BatchNorm
    # re-estimation) and validation must give exactly what one process gives.
    cfg = {**TINY, "norm": "batch", "epochs": 2, "min_epochs": 2, "augment": {"shift": 1},
           "batchnorm_recalibration": 8}
    ds = cohort_datasets(cohort, cfg)
    alone = train_predictor({**cfg, "num_workers": 0}, ds["train"], ds["val"], progress=False)
    ds = cohort_datasets(cohort, cfg)
    workers = train_predictor({**cfg, "num_workers": 2}, ds["train"], ds["val"],
                              progress=False)
    _assert_same_weights(_weights(alone.model), _weights(workers.model))
    assert [h["val_mae"] for h in alone.history] == [h["val_mae"] for h in workers.history]
    from brainage_core.models.evaluation import predict

    assert np.array_equal(predict(alone.model, ds["test"]),
                          predict(alone.model, ds["test"], num_workers=2))
