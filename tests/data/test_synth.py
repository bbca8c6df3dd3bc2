"""Tests of the synthetic ageing cohort (8 mm grid, a handful of subjects)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import matplotlib
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from helpers.synth import TINY_CONFIG
from scipy import ndimage

from brainage_core._utils.validation import BrainAgeInputError
from brainage_core.data.atlas import load_atlas
from brainage_core.data.synth.ages import draw_participants, oracle_mae, posterior_mean_age
from brainage_core.data.synth.cohort import generate_cohort, load_ground_truth
from brainage_core.data.synth.config import AgeEffect, SynthConfig, default_effects
from brainage_core.data.synth.render import AgeingModel, SubjectRenderer, SubjectSpec
from brainage_core.data.template import load_template


def _image(root: Path, pid: str) -> nib.Nifti1Image:
    return nib.load(root / pid / "anat" / f"{pid}_T1w.nii.gz")


def _images(root: Path) -> tuple[pd.DataFrame, np.ndarray]:
    table = pd.read_csv(root / "participants.tsv", sep="\t")
    data = np.stack([_image(root, p).get_fdata() for p in table["participant_id"]])
    return table, data


# --------------------------------------------------------------------------- config


def test_config_round_trips_through_dict() -> None:
    config = SynthConfig.from_dict({"n_subjects": 7, "resolution": 8, "sigma_gap": 2.0})
    again = SynthConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    assert config.effects == default_effects()
    assert SynthConfig.from_dict(None) == SynthConfig()


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"n_subjets": 5}, "n_subjets"),
        ({"resolution": 5}, "'resolution'"),
        ({"n_subjects": 0}, "'n_subjects'"),
        ({"n_subjects": 2.5}, "'n_subjects'"),
        ({"age_min": 80, "age_max": 50}, "'age_max'"),
        ({"sigma_gap": -1.0}, "'sigma_gap'"),
        ({"accelerated_fraction": 1.5}, "'accelerated_fraction'"),
        ({"noise_sd": -0.1}, "'noise_sd'"),
        ({"effects": "hippocampus"}, "'effects'"),
        ({"effects": [{"kind": "melting", "regions": ["Putamen"], "strength": 1}]}, "kind"),
        ({"effects": [{"kind": "atrophy", "regions": [], "strength": 0.5}]}, "'regions'"),
        ({"effects": [{"kind": "atrophy", "regions": ["Putamen"], "strength": 2}]}, "strength"),
        ({"effects": [{"kind": "atrophy", "regions": ["Putamen"]}]}, "strength"),
        (
            {"effects": [{"kind": "atrophy", "regions": ["Putamen"], "strength": 0.5, "speed": 1}]},
            "speed",
        ),
        (
            {
                "effects": [
                    {"kind": "atrophy", "regions": ["Putamen"], "strength": 0.5, "form": "cubic"}
                ]
            },
            "form",
        ),
    ],
)
def test_config_errors_name_the_parameter(entry: dict, message: str) -> None:
    with pytest.raises(BrainAgeInputError, match=message):
        SynthConfig.from_dict(entry)


def test_unknown_region_is_refused_before_writing(tmp_path: Path) -> None:
    config = {
        "n_subjects": 2,
        "resolution": 8,
        "effects": [{"kind": "atrophy", "regions": ["Hipocampus"], "strength": 0.5}],
    }
    with pytest.raises(BrainAgeInputError, match="Hipocampus.*Available regions"):
        generate_cohort(config, tmp_path / "out", n_jobs=1, progress=False)
    assert not (tmp_path / "out").exists()


def test_effect_profiles_start_at_onset_and_reach_strength_after_40_years() -> None:
    for form in ("linear", "quadratic", "sigmoid"):
        effect = AgeEffect("atrophy", ["Putamen"], 0.5, onset=40.0, form=form)
        np.testing.assert_allclose(effect.profile([20.0, 40.0, 80.0]), [0.0, 0.0, 1.0], atol=1e-9)
        ages = np.linspace(40, 100, 61)
        assert np.all(np.diff(effect.profile(ages)) > 0)


# --------------------------------------------------------------------------- participants


def test_participants_table(tiny_cohort: Path) -> None:
    table = pd.read_csv(tiny_cohort / "participants.tsv", sep="\t")
    assert list(table.columns) == ["participant_id", "age", "sex", "gap", "biological_age", "group"]
    assert len(table) == TINY_CONFIG["n_subjects"]
    assert table["participant_id"].is_unique
    assert table["participant_id"].str.fullmatch(r"sub-\d{4}").all()
    assert table["age"].between(45, 82).all()
    assert set(table["sex"]) <= {"M", "F"}
    assert set(table["group"]) <= {"control", "accelerated"}
    np.testing.assert_allclose(table["biological_age"], table["age"] + table["gap"], atol=2e-3)
    assert json.loads((tiny_cohort / "participants.json").read_text())["gap"]["Units"] == "years"


def test_demographics_follow_the_model() -> None:
    config = SynthConfig(
        n_subjects=3000,
        resolution=8,
        seed=1,
        accelerated_fraction=0.2,
        accelerated_gap_mean=6.0,
        sigma_gap=3.0,
    )
    table = draw_participants(config)
    accelerated = table["group"] == "accelerated"
    assert abs(accelerated.mean() - 0.2) < 0.03
    assert abs(table.loc[accelerated, "gap"].mean() - 6.0) < 0.5
    assert abs(table.loc[~accelerated, "gap"].mean()) < 0.2
    assert abs(table.loc[~accelerated, "gap"].std() - 3.0) < 0.2
    assert abs((table["sex"] == "M").mean() - 0.5) < 0.04
    # Subject i is the same in a smaller cohort with the same seed.
    small = draw_participants(SynthConfig(**{**config.__dict__, "n_subjects": 5}))
    pd.testing.assert_frame_equal(small, table.iloc[:5])


def test_regions_age_around_the_biological_age() -> None:
    config = SynthConfig(n_subjects=3000, resolution=8, seed=4, regional_sd=4.0)
    table = draw_participants(config)
    columns = [f"regional_age_{k + 1}" for k in range(len(config.effects))]
    offsets = table[columns].to_numpy() - table[["biological_age"]].to_numpy()
    assert np.abs(offsets.mean(axis=0)).max() < 0.3
    np.testing.assert_allclose(offsets.std(axis=0), 4.0, rtol=0.06)
    assert np.abs(np.corrcoef(offsets.T) - np.eye(len(columns))).max() < 0.06  # independent
    # The offsets have their own seed stream: the demographics do not move.
    lockstep = draw_participants(SynthConfig(**{**config.__dict__, "regional_sd": 0.0}))
    pd.testing.assert_frame_equal(lockstep.drop(columns=columns), table.drop(columns=columns))
    np.testing.assert_allclose(
        lockstep[columns], lockstep[["biological_age"]].to_numpy().repeat(3, 1)
    )


def test_regional_ages_are_ground_truth_not_public(tiny_cohort: Path) -> None:
    regional = pd.read_csv(
        tiny_cohort / "derivatives" / "ground_truth" / "regional_ages.tsv", sep="\t"
    )
    assert list(regional.columns) == [
        "participant_id",
        "regional_age_1",
        "regional_age_2",
        "regional_age_3",
    ]
    truth = load_ground_truth(tiny_cohort)
    pd.testing.assert_frame_equal(truth.regional_ages, regional)


def test_each_regional_age_drives_only_its_own_effect() -> None:
    config = SynthConfig(resolution=8, nuisance_scale=0.0)
    model = AgeingModel(config)
    base = model.render([60.0, 60.0, 60.0])
    np.testing.assert_array_equal(base, model.render(60.0))  # one age = every region at it
    for k, effect in enumerate(config.effects):
        ages = [60.0, 60.0, 60.0]
        ages[k] = 75.0
        changed = np.abs(model.render(ages) - base) > 1e-3
        alone = AgeingModel(dataclasses.replace(config, effects=[effect]))
        # Its own reach (one voxel of slack: the expansion also moves the other effects'
        # already-aged tissue, which the effect alone does not have).
        own = ndimage.binary_dilation(alone.change(60.0, 75.0) > 1e-3)
        assert changed.any(), effect.kind
        assert (changed & ~own).sum() == 0, effect.kind
    with pytest.raises(BrainAgeInputError, match="2 regional ages .* 3 effects"):
        model.render([60.0, 60.0])


# --------------------------------------------------------------------------- images


def test_images_live_on_the_template_grid(tiny_cohort: Path) -> None:
    template = load_template(8)
    table, data = _images(tiny_cohort)
    for pid in table["participant_id"]:
        img = _image(tiny_cohort, pid)
        assert img.shape == template.shape
        np.testing.assert_allclose(img.affine, template.affine)
        assert img.header.get_data_dtype() == np.int16
    assert np.isfinite(data).all() and (data >= 0).all()
    # Skull-stripped: zero far from the brain, non-zero in most of it.
    far = ~ndimage.binary_dilation(template.mask, iterations=3)
    assert not data[:, far].any()
    assert ((data[:, template.mask] > 0).mean(axis=1) > 0.75).all()
    # Individual nuisance: no two subjects are alike.
    assert np.abs(data[0] - data[1]).mean() > 0.01


def test_generation_is_deterministic_and_independent_of_n_jobs(
    tiny_cohort: Path, tmp_path: Path
) -> None:
    other = generate_cohort(TINY_CONFIG, tmp_path / "again", n_jobs=2, progress=False)
    table_a, data_a = _images(tiny_cohort)
    table_b, data_b = _images(other)
    pd.testing.assert_frame_equal(table_a, table_b)
    np.testing.assert_array_equal(data_a, data_b)
    different = generate_cohort(
        {**TINY_CONFIG, "seed": 4, "n_subjects": 2}, tmp_path / "seed4", n_jobs=1, progress=False
    )
    assert not np.array_equal(_images(different)[1], data_a[:2])


def test_dataset_description_records_config_and_oracle(tiny_cohort: Path) -> None:
    desc = json.loads((tiny_cohort / "dataset_description.json").read_text())
    meta = desc["SyntheticCohort"]
    assert meta["atlas"] == "Harvard-Oxford"
    assert SynthConfig.from_dict(meta["config"]) == SynthConfig.from_dict(TINY_CONFIG)
    assert meta["oracle_mae"] == pytest.approx(oracle_mae(SynthConfig.from_dict(TINY_CONFIG)))
    assert desc["BIDSVersion"]


# --------------------------------------------------------------------------- age effects


@pytest.fixture(scope="module")
def clean_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Default ageing, no nuisance at all: images differ only by biological age."""
    config = {
        "n_subjects": 10,
        "resolution": 8,
        "seed": 2,
        "nuisance_scale": 0.0,
        "sigma_gap": 0.0,
        "regional_sd": 0.0,
        "accelerated_fraction": 0.0,
    }
    return generate_cohort(config, tmp_path_factory.mktemp("clean") / "c", n_jobs=1, progress=False)


def test_age_signal_is_present_where_planted_and_absent_elsewhere(clean_cohort: Path) -> None:
    table, data = _images(clean_cohort)
    truth = load_ground_truth(clean_cohort)
    mask = truth.mask
    brain = load_template(8).mask
    assert mask.any() and (brain & ~mask).any()
    b = table["biological_age"].to_numpy()
    assert np.ptp(b) > 15 and b.min() >= 45 and b.max() <= 82
    inside = data[:, mask]
    centred = inside - inside.mean(axis=0)
    r = (centred * (b - b.mean())[:, None]).sum(axis=0) / np.sqrt(
        (centred**2).sum(axis=0) * ((b - b.mean()) ** 2).sum() + 1e-12
    )
    assert np.median(np.abs(r)) > 0.9
    # Outside the truth, intensities barely vary with b (the truth's threshold).
    outside = data[:, brain & ~mask]
    threshold = SynthConfig().ground_truth_threshold
    assert np.ptp(outside, axis=0).max() < 1.5 * threshold


def test_ventricles_grow_and_tissue_darkens_with_biological_age() -> None:
    model = AgeingModel(SynthConfig(resolution=8))
    atlas = load_atlas(8)
    wm = float(np.median(model.t1[load_template(8).wm > 0.9]))
    near_ventricles = ndimage.binary_dilation(atlas.region_mask("Lateral Ventricle"), iterations=2)
    hippocampus = atlas.region_mask("Hippocampus")
    csf_volume, hippocampus_mean = [], []
    for b in (45.0, 55.0, 65.0, 75.0, 85.0):
        img = model.render(b)
        csf_like = np.clip((wm - img) / (wm - model.csf_intensity), 0, 1)
        csf_volume.append(csf_like[near_ventricles].sum())
        hippocampus_mean.append(img[hippocampus].mean())
    assert np.all(np.diff(csf_volume) > 0)
    assert csf_volume[-1] > 1.2 * csf_volume[0]  # 2.5 mm default expansion: about +29 %
    assert np.all(np.diff(hippocampus_mean) < 0)


def test_ventricle_effect_survives_nuisance() -> None:
    """With full nuisance (4 mm grid), older subjects still have more CSF by the ventricles."""
    config = {
        "resolution": 4,
        "seed": 11,
        "effects": [
            {
                "kind": "ventricle_expansion",
                "regions": ["Lateral Ventricle"],
                "strength": 6.0,
                "onset": 30.0,
                "form": "quadratic",
            }
        ],
    }
    renderer = SubjectRenderer(AgeingModel(SynthConfig.from_dict(config)))
    central = ndimage.binary_dilation(load_atlas(4).region_mask("Lateral Ventricle"), iterations=2)
    ages = np.linspace(45.0, 85.0, 9)
    volumes = []
    for i, b in enumerate(ages):
        img = renderer.render(SubjectSpec(i, "x", "F", float(b), "unused"))
        # Dark voxels relative to the subject's own tissue intensity (scale-free).
        ref = np.percentile(img[img > 0], 75)
        volumes.append(((img < 0.55 * ref) & (img > 0) & central).sum())
    assert np.corrcoef(ages, volumes)[0, 1] > 0.7


# --------------------------------------------------------------------------- ground truth


def test_ground_truth_files_and_table(tiny_cohort: Path) -> None:
    folder = tiny_cohort / "derivatives" / "ground_truth"
    for name in (
        "dataset_description.json",
        "age_signal_mask.nii.gz",
        "age_signal_strength.nii.gz",
        "effects.tsv",
        "effect-ventricle_expansion_mask.nii.gz",
        "effect-atrophy_mask.nii.gz",
        "effect-cortical_thinning_mask.nii.gz",
    ):
        assert (folder / name).is_file(), name
    truth = load_ground_truth(tiny_cohort)
    template = load_template(8)
    np.testing.assert_allclose(truth.mask_img.affine, template.affine)
    assert truth.mask_img.shape == template.shape
    strength = truth.strength_img.get_fdata()
    np.testing.assert_array_equal(truth.mask, strength > SynthConfig().ground_truth_threshold)
    assert list(truth.effects["kind"]) == ["ventricle_expansion", "atrophy", "cortical_thinning"]
    assert (truth.effects["n_voxels"] > 0).all()
    assert {"Left Lateral Ventricle", "Right Hippocampus", "Left Insular Cortex"} <= set(
        truth.regions
    )
    union = np.zeros(template.shape, dtype=bool)
    for img in truth.effect_mask_imgs.values():
        union |= np.asarray(img.dataobj) > 0
    assert (union & truth.mask).sum() >= 0.95 * truth.mask.sum()
    assert truth.oracle_mae > 0


def test_ground_truth_follows_the_planted_region(putamen_cohort: Path) -> None:
    truth = load_ground_truth(putamen_cohort)
    putamen = load_atlas(8).region_mask("Putamen")
    assert truth.mask.any()
    assert truth.regions == ["Left Putamen", "Right Putamen"]
    assert not (truth.mask & ~ndimage.binary_dilation(putamen)).any()
    assert (truth.mask & putamen).sum() >= 0.8 * putamen.sum()
    assert list(truth.effect_mask_imgs) == ["atrophy"]


def test_occipital_thinning_stays_in_the_occipital_lobe(tmp_path: Path) -> None:
    config = {
        "n_subjects": 1,
        "resolution": 8,
        "effects": [{"kind": "cortical_thinning", "regions": ["Occipital Pole"], "strength": 0.5}],
    }
    truth = load_ground_truth(generate_cohort(config, tmp_path / "occ", progress=False))
    y_mm = (
        np.indices(truth.mask.shape)[1] * truth.mask_img.affine[1, 1] + truth.mask_img.affine[1, 3]
    )
    assert truth.mask.any()
    assert y_mm[truth.mask].max() < -60  # behind y = -60 mm: the back of the brain
    assert truth.regions == ["Left Occipital Pole", "Right Occipital Pole"]


# --------------------------------------------------------------------------- oracle


def test_oracle_vanishes_without_gap() -> None:
    config = SynthConfig(resolution=8, sigma_gap=0.01, regional_sd=0.0, accelerated_fraction=0.0)
    assert oracle_mae(config, n_samples=20_000) < 0.02
    exact = SynthConfig(resolution=8, sigma_gap=0.0, regional_sd=0.0, accelerated_fraction=0.0)
    assert oracle_mae(exact, n_samples=20_000) == pytest.approx(0.0, abs=1e-9)
    # Regional heterogeneity alone leaves an irreducible error.
    regional = SynthConfig(resolution=8, sigma_gap=0.0, regional_sd=3.0, accelerated_fraction=0.0)
    assert oracle_mae(regional, n_samples=20_000) > 0.5


def test_oracle_equals_half_normal_mean_for_a_wide_age_range() -> None:
    wide = {"resolution": 8, "age_min": 1.0, "age_max": 2001.0, "accelerated_fraction": 0.0}
    config = SynthConfig(**wide, sigma_gap=3.0, regional_sd=0.0)
    assert oracle_mae(config) == pytest.approx(3.0 * np.sqrt(2 / np.pi), rel=0.01)
    # K effects with regional offsets of sd s: the mean regional age is the sufficient
    # statistic, and its error has sd sqrt(sigma_gap**2 + s**2 / K).
    regional = SynthConfig(**wide, sigma_gap=3.0, regional_sd=4.0)
    k = len(regional.effects)
    expected = np.sqrt(3.0**2 + 4.0**2 / k) * np.sqrt(2 / np.pi)
    assert oracle_mae(regional) == pytest.approx(expected, rel=0.01)
    # A bounded age range lets the predictor shrink toward it: the oracle is smaller.
    bounded = SynthConfig(resolution=8, accelerated_fraction=0.0, regional_sd=0.0)
    assert oracle_mae(bounded) < 3.0 * np.sqrt(2 / np.pi)


def test_posterior_mean_matches_numerical_integration() -> None:
    components = [(0.85, 0.0, 3.0), (0.15, 6.0, 4.0)]
    ages = np.linspace(45, 82, 20001)
    for b in (40.0, 47.5, 63.0, 80.0, 90.0):
        density = sum(w / s * np.exp(-0.5 * ((b - ages - m) / s) ** 2) for w, m, s in components)
        expected = (ages * density).sum() / density.sum()
        got = posterior_mean_age(np.array([b]), 45.0, 82.0, components)[0]
        assert got == pytest.approx(expected, abs=1e-3)


# --------------------------------------------------------------------------- output folder


def test_refuses_a_foreign_non_empty_folder(tmp_path: Path, tiny_cohort: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(BrainAgeInputError, match="foreign.*not empty"):
        generate_cohort(TINY_CONFIG, foreign, n_jobs=1, progress=False)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    with pytest.raises(BrainAgeInputError, match=r"different dataset.*'seed'"):
        generate_cohort({**TINY_CONFIG, "seed": 99}, tiny_cohort, n_jobs=1, progress=False)


def test_resumes_an_interrupted_generation(tmp_path: Path) -> None:
    config = {"n_subjects": 3, "resolution": 8, "seed": 7}
    root = generate_cohort(config, tmp_path / "c", n_jobs=1, progress=False)
    paths = [root / f"sub-000{i}" / "anat" / f"sub-000{i}_T1w.nii.gz" for i in (1, 2, 3)]
    reference = [nib.load(p).get_fdata() for p in paths]
    paths[1].unlink()  # lost
    paths[2].write_bytes(paths[2].read_bytes()[:200])  # truncated
    kept = os.stat(paths[0]).st_ino
    generate_cohort(config, root, n_jobs=1, progress=False)
    assert os.stat(paths[0]).st_ino == kept  # a valid file is not rewritten
    for path, data in zip(paths, reference, strict=True):
        np.testing.assert_array_equal(nib.load(path).get_fdata(), data)


def test_load_ground_truth_names_the_missing_file(tmp_path: Path, tiny_cohort: Path) -> None:
    with pytest.raises(BrainAgeInputError, match="dataset_description.json"):
        load_ground_truth(tmp_path)
    (tmp_path / "dataset_description.json").write_text(
        (tiny_cohort / "dataset_description.json").read_text()
    )
    with pytest.raises(BrainAgeInputError, match="age_signal_mask.nii.gz"):
        load_ground_truth(tmp_path)


# --------------------------------------------------------------------------- figures


def test_figures(tiny_cohort: Path, tmp_path: Path) -> None:
    matplotlib.use("Agg")
    from brainage_core.plotting.data import plot_ground_truth, plot_subjects_by_age

    fig = plot_subjects_by_age(
        tiny_cohort, n_subjects=3, output_file=tmp_path / "s.png", title="ages"
    )
    assert len(fig.axes) >= 4 and (tmp_path / "s.png").stat().st_size > 0
    fig = plot_ground_truth(tiny_cohort, output_file=tmp_path / "gt.png")
    assert (tmp_path / "gt.png").stat().st_size > 0
    with pytest.raises(BrainAgeInputError, match="sub-9999"):
        plot_subjects_by_age(tiny_cohort, ["sub-9999"])
