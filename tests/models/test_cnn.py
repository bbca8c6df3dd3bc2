"""Tests of the brain-age CNN: shapes, heads, purity of the forward pass, bad parameters."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from brainage_core._utils.validation import BrainAgeInputError
from brainage_core.models.cnn import BrainAgeCNN, soft_labels

torch.set_num_threads(1)
SHAPE = (12, 14, 12)


@pytest.mark.parametrize("head", ["regression", "soft_label"])
@pytest.mark.parametrize("norm", ["batch", "group", "instance", "none"])
@pytest.mark.parametrize("pool", ["avg", "octants", "flatten"])
def test_forward_returns_one_age_in_years_per_subject(head, norm, pool):
    torch.manual_seed(0)
    model = BrainAgeCNN(SHAPE, channels=[4, 8], head=head, norm=norm, pool=pool,
                        age_mean=63.0, age_std=9.0, age_range=(40, 90)).eval()
    x = torch.randn(3, 1, *SHAPE)
    ages = model(x)
    assert ages.shape == (3,)
    assert ages.dtype == torch.float32
    if head == "soft_label":
        # The expected age under a distribution over bins lies inside the bins' range.
        assert torch.all((ages > 40) & (ages < 90))
        assert model.raw(x).shape == (3, 50)
        assert torch.allclose(model.raw(x).exp().sum(1), torch.ones(3))
    else:
        # An untrained regression head predicts near the training mean, in years.
        assert torch.all((ages - 63.0).abs() < 9.0 * 5)


def test_regression_head_rescales_standardised_output():
    model = BrainAgeCNN(SHAPE, channels=[4], age_mean=60.0, age_std=10.0)
    raw = torch.tensor([0.0, 1.0, -2.0])
    assert torch.allclose(model.to_years(raw), torch.tensor([60.0, 70.0, 40.0]))


@pytest.mark.parametrize("head", ["regression", "soft_label"])
def test_ages_are_float32_under_mixed_precision(head):
    # On a GPU the forward pass runs under bfloat16 autocast; the ages must come out in
    # float32 at full precision (a bfloat16 expectation over bins of 64-128 y rounds to
    # 0.5 y). CPU autocast applies the same rules to the matmul.
    torch.manual_seed(0)
    model = BrainAgeCNN(SHAPE, channels=[4], head=head, age_mean=63.0, age_std=9.0,
                        age_range=(40, 90)).eval()
    raw = model.raw(torch.randn(4, 1, *SHAPE))
    exact = model.to_years(raw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model.to_years(raw)
    assert mixed.dtype == torch.float32
    assert torch.allclose(mixed, exact, atol=1e-4)


def test_forward_is_pure_and_differentiable_wrt_input():
    torch.manual_seed(0)
    model = BrainAgeCNN(SHAPE, channels=[4, 8], norm="batch").eval()
    assert not any(isinstance(m, torch.nn.ReLU) and m.inplace for m in model.modules())
    x = torch.randn(2, 1, *SHAPE, requires_grad=True)
    before = x.detach().clone()
    model(x).sum().backward()
    assert torch.equal(x.detach(), before)
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert not model._forward_hooks and not model._backward_hooks


def test_config_rebuilds_the_same_architecture():
    model = BrainAgeCNN(SHAPE, channels=[4, 8], head="soft_label", bin_width=2.0)
    clone = BrainAgeCNN(**model.config)
    clone.load_state_dict(model.state_dict())
    x = torch.randn(2, 1, *SHAPE)
    assert torch.allclose(model.eval()(x), clone.eval()(x))


def test_soft_labels_are_distributions_centred_on_the_age():
    centers = torch.arange(40.5, 90.5, 1.0)
    p = soft_labels(torch.tensor([55.5, 70.0]), centers, sigma=1.0)
    assert torch.allclose(p.sum(1), torch.ones(2))
    assert centers[p[0].argmax()] == 55.5
    assert torch.isclose(p[1] @ centers, torch.tensor(70.0), atol=1e-3)


def test_losses_are_zero_at_the_truth():
    model = BrainAgeCNN(SHAPE, channels=[4], age_mean=60.0, age_std=10.0)
    age = torch.tensor([50.0, 75.0])
    raw = (age - 60.0) / 10.0
    assert model.loss(raw, age, "mae") == 0
    assert model.loss(raw, age, "mse") == 0
    assert model.loss(raw + 0.5, age, "mae") == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"head": "classification"}, "'head' must be one of"),
        ({"norm": "layer"}, "'norm' must be one of"),
        ({"channels": []}, "'channels' must be a non-empty list"),
        ({"channels": [4, -1]}, "'channels' must be a non-empty list"),
        ({"channels": [4, 4, 4, 4]}, "too small for 4 blocks"),
        ({"dropout": 1.5}, "'dropout' must lie in"),
        ({"pool": "max"}, "'pool' must be one of"),
        ({"age_range": (80, 40)}, "'age_range' must be two numbers"),
    ],
)
def test_bad_parameters_give_clear_errors(kwargs, message):
    with pytest.raises(BrainAgeInputError, match=message):
        BrainAgeCNN(SHAPE, **{"channels": [4], **kwargs})


def test_octants_tell_where_a_feature_is_and_the_global_pool_does_not():
    """The same blob on the left or on the right: one age for the global pool, two for octants."""
    torch.manual_seed(0)
    left, right = torch.zeros(1, 1, *SHAPE), torch.zeros(1, 1, *SHAPE)
    left[..., 2:5, 5:9, 4:8] = 1.0
    right[..., SHAPE[0] - 5:SHAPE[0] - 2, 5:9, 4:8] = 1.0
    ages = {}
    for pool in ("avg", "octants"):
        torch.manual_seed(0)
        model = BrainAgeCNN(SHAPE, channels=[4, 8], pool=pool, norm="none").eval()
        # a mirror-symmetric first layer: a blob and its mirror image give mirrored features
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 5:
                    p.copy_((p + p.flip(2)) / 2)
            ages[pool] = [float(model(x)) for x in (left, right)]
    assert ages["avg"][0] == pytest.approx(ages["avg"][1], abs=1e-4)
    assert abs(ages["octants"][0] - ages["octants"][1]) > 1e-3
    # a grid that does not divide into octants evenly still pools (adaptive cells)
    model = BrainAgeCNN((13, 15, 11), channels=[4, 8], pool="octants")
    assert model(torch.zeros(2, 1, 13, 15, 11)).shape == (2,)


def test_bad_input_shape_is_a_clear_error():
    model = BrainAgeCNN(SHAPE, channels=[4])
    with pytest.raises(BrainAgeInputError, match=r"'x' must have shape \(N, 1, X, Y, Z\)"):
        model(torch.zeros(2, *SHAPE))
    flat = BrainAgeCNN(SHAPE, channels=[4], pool="flatten")
    with pytest.raises(BrainAgeInputError, match=r"grid \(12, 14, 12\) the model was built"):
        flat(torch.zeros(1, 1, 12, 14, 14))
    with pytest.raises(BrainAgeInputError, match="'input_shape' must be 3 integers"):
        BrainAgeCNN((12, 14), channels=[4])


@pytest.mark.parametrize("shape", [(20, 24, 21), (40, 50, 41)])
def test_left_and_right_are_treated_alike(shape):
    """A network with mirror-symmetric kernels gives a mirrored image the same age.

    Without symmetric padding, pooling an odd-sized level drops its last column (one
    hemisphere only), and this fails.
    """
    torch.manual_seed(0)
    model = BrainAgeCNN(shape, channels=[4, 8, 8, 8], norm="none")
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv3d):
                module.weight.copy_((module.weight + module.weight.flip(2)) / 2)
    model.eval()
    x = torch.zeros(3, 1, *shape)
    x[:, :, -6:] = torch.rand(3, 1, 6, *shape[1:])  # structure at one side's edge
    mirrored = x.flip(2)  # axis X: left <-> right
    torch.testing.assert_close(model(mirrored), model(x), rtol=0.0, atol=1e-6)

    def unpadded(v):  # the same network without the padding: the check can fail
        return model.output(torch.flatten(F.adaptive_avg_pool3d(model.features(v), 1), 1))

    assert (unpadded(mirrored) - unpadded(x)).abs().max() > 1e-5
