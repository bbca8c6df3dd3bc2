"""Tests of the noise-model importance maps (amortised and per-subject)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.maps import RegionPredictor, make_data
from torch import nn

from brainage_core._utils.torch import frozen
from brainage_core._utils.validation import BrainAgeInputError
from brainage_core.explain.noise.amortised import NoiseMapExplainer
from brainage_core.explain.noise.per_subject import PerSubjectNoiseMap

torch.set_num_threads(1)
FIT = {"epochs": 12, "batch_size": 4, "lr": 1e-2, "progress": False}


def region_means(importance: torch.Tensor, labels: np.ndarray) -> np.ndarray:
    mean_map = importance.mean(0)[0].numpy()
    return np.array([mean_map[labels == k].mean() for k in range(1, labels.max() + 1)])


@pytest.fixture(scope="module")
def data():
    return make_data(24, seed=0)


def make_explainer(data, **kwargs):
    predictor = RegionPredictor(data.truth)
    settings = {"mask": data.brain, "lam": 10.0, "s_max": 1.0, "channels": 4, "depth": 2, "seed": 0}
    settings.update(kwargs)
    return NoiseMapExplainer(predictor, **settings)


@pytest.mark.parametrize(
    ("planted", "downsample"), [("Region C", 1), ("Region F", 1), ("Region C", 2)]
)
def test_amortised_map_ranks_the_planted_region_first(planted, downsample):
    data = make_data(24, planted=planted, seed=1)
    explainer = make_explainer(data, downsample=downsample).fit(
        (data.images[:16], data.ages[:16]), **FIT
    )
    importance = explainer.attribute(data.images[16:])
    means = region_means(importance, data.atlas.labels)
    assert data.atlas.names[1 + int(np.argmax(means))] == planted
    # the planted region stands out clearly, not by a hair
    assert means.max() > 2 * np.sort(means)[-2]


def test_attribute_shape_range_and_mask(data):
    explainer = make_explainer(data)
    importance = explainer.attribute(data.images[:3])
    assert importance.shape == data.images[:3].shape
    assert not importance.requires_grad
    assert float(importance.min()) >= 0.0 and float(importance.max()) <= 1.0
    assert torch.all(importance[:, 0][:, ~torch.from_numpy(data.brain)] == 0)
    single = explainer.attribute(data.images[0])
    assert single.shape == data.images[0].shape


def test_fitting_leaves_the_predictor_unchanged(data):
    predictor = RegionPredictor(data.truth)
    predictor.train()
    before = {k: v.clone() for k, v in predictor.state_dict().items()}
    explainer = NoiseMapExplainer(
        predictor, mask=data.brain, lam=10.0, s_max=1.0, channels=2, seed=0
    )
    explainer.fit(data.images[:8], epochs=2, batch_size=4, lr=1e-2, progress=False)
    after = predictor.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert predictor.training  # mode restored
    assert all(p.requires_grad for p in predictor.parameters())
    assert all(p.grad is None for p in predictor.parameters())


def test_frozen_restores_flags():
    model = nn.Linear(2, 1)
    model.bias.requires_grad_(False)
    with frozen(model):
        assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.training and model.weight.requires_grad and not model.bias.requires_grad


def test_fit_is_deterministic(data):
    maps = []
    for _ in range(2):
        explainer = make_explainer(data, channels=2)
        explainer.fit(data.images[:8], epochs=2, batch_size=4, lr=1e-2, progress=False)
        maps.append(explainer.attribute(data.images[8:10]))
    assert torch.equal(maps[0], maps[1])
    other = make_explainer(data, channels=2, seed=1)
    other.fit(data.images[:8], epochs=2, batch_size=4, lr=1e-2, progress=False)
    assert not torch.equal(maps[0], other.attribute(data.images[8:10]))


def test_resume_replays_an_uninterrupted_fit(data, tmp_path):
    train = (data.images[:8], data.ages[:8])
    kwargs = {"batch_size": 4, "lr": 1e-2, "progress": False}
    straight = make_explainer(data, channels=2).fit(train, epochs=3, **kwargs)
    ckpt = tmp_path / "noise_model.pt"
    make_explainer(data, channels=2).fit(train, epochs=1, checkpoint_path=ckpt, **kwargs)
    resumed = make_explainer(data, channels=2)
    resumed.fit(train, epochs=3, checkpoint_path=ckpt, **kwargs)
    assert resumed.epochs_trained == 3 and len(resumed.history_) == 3
    for k, v in straight.noise_model.state_dict().items():
        assert torch.allclose(v, resumed.noise_model.state_dict()[k], atol=1e-6), k
    # a finished checkpoint is loaded, not retrained; load() rebuilds the same explainer
    loaded = NoiseMapExplainer.load(ckpt, RegionPredictor(data.truth), mask=data.brain)
    assert torch.allclose(loaded.attribute(data.images[:2]), resumed.attribute(data.images[:2]))
    assert list(tmp_path.iterdir()) == [ckpt]  # no temporary files left behind


def test_a_finished_fit_leaves_its_checkpoint_untouched(data, tmp_path):
    # The maps record the checkpoint's digest: fitting again a finished model (notebook 03
    # after a launched step, or re-run) must not rewrite it, or every map is made again.
    train, val = (data.images[:8], data.ages[:8]), (data.images[8:12], data.ages[8:12])
    kwargs = {"batch_size": 4, "lr": 1e-2, "progress": False, "epochs": 2}
    ckpt = tmp_path / "noise_model.pt"
    first = make_explainer(data, channels=2).fit(train, val, checkpoint_path=ckpt, **kwargs)
    before = (ckpt.read_bytes(), ckpt.stat().st_mtime_ns)
    again = make_explainer(data, channels=2).fit(train, val, checkpoint_path=ckpt, **kwargs)
    assert (ckpt.read_bytes(), ckpt.stat().st_mtime_ns) == before
    assert again.best_epoch == first.best_epoch
    for k, v in first.noise_model.state_dict().items():
        assert torch.equal(v, again.noise_model.state_dict()[k]), k


def test_resume_refuses_a_checkpoint_with_other_settings(data, tmp_path):
    ckpt = tmp_path / "noise_model.pt"
    make_explainer(data, channels=2).fit(
        data.images[:4], epochs=1, checkpoint_path=ckpt, progress=False
    )
    with pytest.raises(BrainAgeInputError, match="noise_model.pt"):
        make_explainer(data, channels=2, lam=1.0).fit(
            data.images[:4], epochs=2, checkpoint_path=ckpt, progress=False
        )
    with pytest.raises(BrainAgeInputError, match="not found"):
        NoiseMapExplainer.load(tmp_path / "missing.pt", RegionPredictor(data.truth))


def test_validation_history_and_age_target(data):
    explainer = make_explainer(data, channels=2, target="age")
    explainer.fit(
        (data.images[:8], data.ages[:8]),
        (data.images[8:12], data.ages[8:12]),
        epochs=2,
        progress=False,
    )
    history = explainer.history_
    assert list(history["epoch"]) == [1, 2]
    assert {"loss", "task", "mean_b", "val_noisy_mae", "val_clean_mae"} <= set(history)
    assert history["val_clean_mae"].iloc[-1] < 1.0  # the toy predictor is near exact
    with pytest.raises(BrainAgeInputError, match="target='age'"):
        make_explainer(data, channels=2, target="age").fit(
            data.images[:4], epochs=1, progress=False
        )


def test_per_subject_map_ranks_the_planted_region_first(data):
    predictor = RegionPredictor(data.truth)
    explainer = PerSubjectNoiseMap(
        predictor, mask=data.brain, lam=10.0, s_max=1.0, steps=60, seed=0
    )
    importance = explainer.attribute(data.images[:2])
    assert importance.shape == data.images[:2].shape
    means = region_means(importance, data.atlas.labels)
    assert data.atlas.names[1 + int(np.argmax(means))] == data.planted
    # a batch of one gives the same ranking
    alone = region_means(explainer.attribute(data.images[:1]), data.atlas.labels)
    assert data.atlas.names[1 + int(np.argmax(alone))] == data.planted


def test_bad_inputs_are_named(data):
    with pytest.raises(BrainAgeInputError, match="'target'"):
        make_explainer(data, target="truth")
    with pytest.raises(BrainAgeInputError, match="'mask'"):
        make_explainer(data, mask=np.ones((4, 4, 4), bool)).attribute(data.images[:1])
    with pytest.raises(BrainAgeInputError, match="'train_data'"):
        make_explainer(data).fit("images.nii.gz", progress=False)

    class TwoOutputs(nn.Module):
        def forward(self, x):
            return x.flatten(1)[:, :2]

    with pytest.raises(BrainAgeInputError, match="shaped \\(N,\\)"):
        NoiseMapExplainer(TwoOutputs(), channels=2).fit(data.images[:2], epochs=1, progress=False)


def test_maps_config_from_dict_and_errors():
    from brainage_core.study.maps import MapsConfig

    config = MapsConfig.from_dict({"epochs": 3, "lam": 2}, seed=5)
    assert config.epochs == 3 and config.noise.lam == 2.0 and isinstance(config.noise.lam, float)
    assert config.noise.seed == 5  # the study's seed when the section sets none
    assert MapsConfig.from_dict({"seed": 1}, seed=5).noise.seed == 1
    assert MapsConfig.from_dict(None).to_dict() == MapsConfig().to_dict()
    assert config.to_dict()["lam"] == 2.0  # flat, as in the config file
    explainer = NoiseMapExplainer(
        RegionPredictor(np.ones((4, 4, 4), bool)), config.noise, **config.network_kwargs()
    )
    assert explainer.noise is config.noise  # one object, passed whole
    with pytest.raises(BrainAgeInputError, match="'epoch'"):
        MapsConfig.from_dict({"epoch": 3})
    with pytest.raises(BrainAgeInputError, match="maps.target"):
        MapsConfig.from_dict({"target": "truth"})
    with pytest.raises(BrainAgeInputError, match="maps.s_max"):
        MapsConfig.from_dict({"s_min": 0.5, "s_max": 0.2})
    with pytest.raises(BrainAgeInputError, match="maps.baselines"):
        MapsConfig.from_dict({"baselines": ["lime"]})
    with pytest.raises(BrainAgeInputError, match="maps.max_train_subjects"):
        MapsConfig.from_dict({"max_train_subjects": 0})


def test_loader_workers_do_not_change_the_fit(data):
    # Issue 16, item 4: workers read and batch the images of training and validation;
    # the noise draws are seeded per epoch, so the fit is the same with or without them.
    train = (data.images[:8], data.ages[:8])
    val = (data.images[8:12], data.ages[8:12])
    kwargs = {"epochs": 2, "batch_size": 4, "lr": 1e-2, "progress": False}
    alone = make_explainer(data, channels=2).fit(train, val, num_workers=0, **kwargs)
    workers = make_explainer(data, channels=2).fit(train, val, num_workers=2, **kwargs)
    assert torch.equal(alone.attribute(data.images[12:14]),
                       workers.attribute(data.images[12:14]))
    cols = ["loss", "val_task", "val_mean_b"]
    assert alone.history_[cols].equals(workers.history_[cols])
