"""Tests of the perturbation registry, the per-subject convergence options and the
best-validation checkpoint of the noise model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.maps import RegionPredictor, make_data

from brainage_core._utils.validation import BrainAgeInputError
from brainage_core.explain.noise.amortised import NoiseMapExplainer
from brainage_core.explain.noise.per_subject import PerSubjectNoiseMap
from brainage_core.explain.noise.perturbations import (
    PERTURBATIONS,
    PerturbationParams,
    blur_in_mask,
    get_perturbation,
    mean_image,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data():
    return make_data(24, seed=0)


def _mask(data):
    return torch.as_tensor(data.brain, dtype=torch.float32)[None, None]


@pytest.mark.parametrize("name", sorted(PERTURBATIONS))
def test_each_perturbation_changes_a_region_reader_only_where_it_reads(data, name):
    """B = 1 on the region the predictor reads moves its output; B = 1 elsewhere does not."""
    predictor = RegionPredictor(data.truth).eval()
    x = data.images[:8]
    mask = _mask(data)
    reference = mean_image(torch.utils.data.TensorDataset(data.images[8:], data.ages[8:]))
    # a large noise for the paper's additive form: the reader is a mean, which zero-mean
    # noise barely moves, except through the ReLU that clips it
    params = PerturbationParams(s_min=0.0, s_max=1.0, noise_sd=0.0, blur_sigma=3.0)
    perturb = get_perturbation(name)
    region = torch.as_tensor(data.truth, dtype=torch.float32)[None, None].expand_as(x)
    outside = torch.as_tensor(data.brain & ~data.truth, dtype=torch.float32)[None, None]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        clean = predictor(x)
        moved = predictor(perturb(x, region, mask, reference, params, gen))
        kept = predictor(perturb(x, outside.expand_as(x), mask, reference, params, gen))
        # nothing changes outside the brain mask, whatever B is there
        ones = torch.ones_like(x)
        out = perturb(x, ones, mask, reference, params, gen)
    torch.testing.assert_close(kept, clean)
    assert (moved - clean).abs().mean() > 1.0  # years
    assert torch.equal(
        out[:, :, ~torch.as_tensor(data.brain)], x[:, :, ~torch.as_tensor(data.brain)]
    )


def test_replacement_removes_the_age_information(data):
    """At B = 1 every subject's region holds the reference value: one prediction for all."""
    predictor = RegionPredictor(data.truth).eval()
    x = data.images[:8]
    reference = mean_image(torch.utils.data.TensorDataset(data.images, data.ages))
    b = torch.as_tensor(data.truth, dtype=torch.float32)[None, None].expand_as(x)
    x_mean = get_perturbation("replace_mean")(x, b, _mask(data), reference, PerturbationParams())
    with torch.no_grad():
        preds = predictor(x_mean)
        assert float(preds.std()) < 0.05 * float(predictor(x).std())
    # blurring toward a copy of the subject keeps the subject's own level: not removed
    x_blur = get_perturbation("replace_blur")(x, b, _mask(data), None, PerturbationParams())
    with torch.no_grad():
        assert float(predictor(x_blur).std()) > 0.5 * float(predictor(x).std())


def test_noise_sd_adds_noise_and_zero_is_deterministic(data):
    x = data.images[:2]
    b = torch.full_like(x, 0.5)
    reference = x.mean(0, keepdim=True)
    f = get_perturbation("replace_mean")
    a = f(x, b, _mask(data), reference, PerturbationParams(), torch.Generator().manual_seed(1))
    c = f(x, b, _mask(data), reference, PerturbationParams(), torch.Generator().manual_seed(2))
    assert torch.equal(a, c)
    noisy = PerturbationParams(noise_sd=0.1)
    d = f(x, b, _mask(data), reference, noisy, torch.Generator().manual_seed(1))
    assert 0.03 < float((d - a)[:, :, torch.as_tensor(data.brain)].std()) < 0.07


def test_blur_stays_inside_the_mask():
    x = torch.ones(1, 1, 9, 9, 9)
    mask = torch.zeros(1, 1, 9, 9, 9)
    mask[..., 2:7, 2:7, 2:7] = 1
    out = blur_in_mask(x * mask, mask, 1.5)
    # a constant inside the mask stays constant: the zero background does not leak in
    torch.testing.assert_close(out[mask.bool()], torch.ones(int(mask.sum())))
    assert float(out[~mask.bool()].abs().max()) == 0.0


def test_registry_errors(data):
    with pytest.raises(BrainAgeInputError, match="'perturbation'"):
        get_perturbation("dropout")
    with pytest.raises(BrainAgeInputError, match="training-mean image"):
        get_perturbation("replace_mean")(
            data.images[:1],
            torch.ones_like(data.images[:1]),
            _mask(data),
            None,
            PerturbationParams(),
        )
    with pytest.raises(BrainAgeInputError, match="'perturbation'"):
        NoiseMapExplainer(RegionPredictor(data.truth), perturbation="nope")


def test_replacement_noise_model_finds_the_region_and_keeps_its_reference(data, tmp_path):
    predictor = RegionPredictor(data.truth)
    explainer = NoiseMapExplainer(
        predictor, mask=data.brain, lam=10.0, channels=4, seed=0, perturbation="replace_mean"
    )
    explainer.fit(
        (data.images[:16], data.ages[:16]), epochs=12, batch_size=4, lr=1e-2, progress=False
    )
    torch.testing.assert_close(explainer.reference, data.images[:16].mean(0, keepdim=True))
    importance = explainer.attribute(data.images[16:]).mean(0)[0].numpy()
    inside = importance[data.truth].mean()
    outside = importance[data.brain & ~data.truth].mean()
    assert inside > 2 * outside
    path = explainer.save(tmp_path / "noise.pt")
    loaded = NoiseMapExplainer.load(path, predictor, mask=data.brain)
    torch.testing.assert_close(loaded.reference, explainer.reference)
    torch.testing.assert_close(
        loaded.attribute(data.images[16:]), explainer.attribute(data.images[16:])
    )


def test_fit_keeps_the_best_validation_epoch(data, tmp_path):
    predictor = RegionPredictor(data.truth)
    explainer = NoiseMapExplainer(predictor, mask=data.brain, lam=10.0, channels=4, seed=0)
    val = (data.images[16:], data.ages[16:])
    explainer.fit(
        (data.images[:16], data.ages[:16]),
        val,
        epochs=6,
        batch_size=4,
        lr=5e-2,
        progress=False,
        checkpoint_path=tmp_path / "noise.pt",
    )
    history = explainer.history_
    best = int(history.loc[history["val_objective"].idxmin(), "epoch"])
    assert explainer.best_epoch == best
    # the kept weights reproduce that epoch's validation objective (seeded noise)
    again = explainer.evaluate(val, batch_size=4, seed_offset=best - 1)
    assert again["task"] + 10.0 * again["reg"] == pytest.approx(
        history["val_objective"].min(), rel=1e-4
    )
    loaded = NoiseMapExplainer.load(tmp_path / "noise.pt", predictor, mask=data.brain)
    assert loaded.best_epoch == best
    torch.testing.assert_close(
        loaded.attribute(data.images[:2]), explainer.attribute(data.images[:2])
    )


def test_per_subject_stopping_rule_stops_and_holds_the_operating_point(data):
    predictor = RegionPredictor(data.truth)
    reference = data.images[8:].mean(0, keepdim=True)
    explainer = PerSubjectNoiseMap(
        predictor,
        mask=data.brain,
        perturbation="replace_mean",
        reference=reference,
        steps=400,
        lr=0.2,
        coarse=2,
        mean_b=0.6,
        patience=10,
        tol=0.01,
        seed=0,
    )
    importance = explainer.attribute(data.images[:2])
    history = explainer.history_
    assert explainer.steps_run_ < 400  # the rule stopped it
    assert len(history) == explainer.steps_run_
    # the objective fell and then stayed within tol over the patience window
    assert history["objective"].iloc[-1] < history["objective"].iloc[0]
    last = history["objective"].iloc[-11:]
    assert last.min() >= last.iloc[0] - 0.01
    assert history["mean_b"].iloc[-1] == pytest.approx(0.6, abs=0.03)
    mean_map = importance.mean(0)[0].numpy()
    assert mean_map[data.truth].mean() > 2 * mean_map[data.brain & ~data.truth].mean()
    # coarse logits: neighbouring voxels share their value closely
    b = 1 - importance[0, 0].numpy()
    assert np.isfinite(b).all()


def test_per_subject_runs_all_steps_without_patience(data):
    explainer = PerSubjectNoiseMap(
        RegionPredictor(data.truth), mask=data.brain, steps=15, patience=None, fixed_noise=True
    )
    explainer.attribute(data.images[:1])
    assert explainer.steps_run_ == 15
