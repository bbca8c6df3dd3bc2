"""``brainage-study synth`` and ``brainage-study prepare``, run through cli.main()."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml
from helpers.data import RES, make_bids, t1w_path, truncate_gzip

from brainage_core.cli import build_parser, main
from brainage_core.data.cache import PreparedCohort
from brainage_core.data.sources.bids import load_bids


def _cache_root(out: str) -> Path:
    match = re.search(r"prepared cohort: (\S+)", out)
    assert match, out
    return Path(match.group(1))


def _prepare_args(*source: str, out: Path, extra: tuple[str, ...] = ()) -> list[str]:
    return ["prepare", *source, "--out", str(out), "--resolution", str(RES),
            "--n-jobs", "1", "--no-progress", *extra]  # fmt: skip


@pytest.mark.parametrize("command", ["synth", "prepare"])
def test_help_explains_every_option(command: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    for action in sub._actions:
        for option in action.option_strings:
            assert option in text
        if action.option_strings and action.dest != "help":
            assert action.help and len(action.help) > 10, action.dest


def test_prepare_bids(tiny_bids: Path, tmp_path: Path, capsys) -> None:
    assert main(_prepare_args("--bids", str(tiny_bids), out=tmp_path / "cache")) == 0
    out = capsys.readouterr().out
    cohort = PreparedCohort.open(_cache_root(out))
    assert len(cohort) == 6 and cohort.resolution == RES
    assert "6 images on a 8 mm grid" in out
    # second run: same cache
    assert main(_prepare_args("--bids", str(tiny_bids), out=tmp_path / "cache")) == 0
    assert _cache_root(capsys.readouterr().out) == cohort.root


def test_prepare_csv_skip_reports_the_skipped(tiny_bids: Path, tmp_path: Path, capsys) -> None:
    truncate_gzip(t1w_path(tiny_bids, "sub-02"))
    csv = tmp_path / "manifest.csv"
    load_bids(tiny_bids).to_csv(csv, index=False)
    args = _prepare_args(
        "--csv",
        str(csv),
        out=tmp_path / "cache",
        extra=("--on-error", "skip", "--split-fractions", "0.6", "0.2", "0.2"),
    )
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "1 participant(s) skipped" in out and "sub-02" in out and "truncated" in out
    cohort = PreparedCohort.open(_cache_root(out))
    assert "sub-02" not in set(cohort.table["participant_id"])
    assert cohort.metadata["split_fractions"] == [0.6, 0.2, 0.2]


def test_prepare_errors_exit_1_naming_the_file(tiny_bids: Path, tmp_path: Path, capsys) -> None:
    assert main(_prepare_args("--bids", str(tmp_path / "nope"), out=tmp_path / "c")) == 1
    assert f"{tmp_path / 'nope'}: BIDS folder does not exist" in capsys.readouterr().err
    bad = t1w_path(tiny_bids, "sub-04")
    truncate_gzip(bad)
    assert main(_prepare_args("--bids", str(tiny_bids), out=tmp_path / "c")) == 1
    err = capsys.readouterr().err
    assert str(bad) in err and "sub-04" in err and "truncated or corrupt" in err


def test_prepare_n_subjects_and_oasis(tmp_path: Path, monkeypatch, capsys) -> None:
    from sklearn.utils import Bunch

    root = make_bids(tmp_path / "oasis", n=4)
    maps = []
    for k in range(4):
        src = t1w_path(root, f"sub-{k + 1:02d}")
        dst = src.with_name(f"mwrc1OAS1_{k + 1:04d}_MR1_mpr_anon.nii.gz")
        src.rename(dst)
        maps.append(str(dst))
    ext = pd.DataFrame(
        {
            "ID": [f"OAS1_{k + 1:04d}_MR1" for k in range(4)],
            "M/F": ["F", "M", "F", "M"],
            "Age": [60, 70, 80, 50],
        }
    )
    seen = {}

    def fake_fetch(n_subjects=None, data_dir=None, verbose=0):
        seen["n"] = n_subjects
        return Bunch(gray_matter_maps=maps[:n_subjects], ext_vars=ext)

    monkeypatch.setattr("nilearn.datasets.fetch_oasis_vbm", fake_fetch)
    assert main(_prepare_args("--oasis", out=tmp_path / "c", extra=("--n-subjects", "3"))) == 0
    cohort = PreparedCohort.open(_cache_root(capsys.readouterr().out))
    assert seen["n"] == 3 and len(cohort) == 3
    assert list(cohort.table["age"]) == [60, 70, 80]
    assert cohort.metadata["source"] == "oasis"


def test_synth_options_and_config_file(tmp_path: Path, monkeypatch, capsys) -> None:
    from brainage_core.data.synth import cohort as synth
    seen = {}

    def fake_generate(config, out, *, n_jobs=2, progress=True):
        seen.update(config=config, out=Path(out), n_jobs=n_jobs)
        return Path(out)

    monkeypatch.setattr(synth, "generate_cohort", fake_generate)
    study = {"name": "x", "data": {"synthetic": {"n_subjects": 30, "sigma_gap": 2.0}}}
    cfg = tmp_path / "study.yaml"
    cfg.write_text(yaml.safe_dump(study))
    args = ["synth", "--config", str(cfg), "--n", "12", "--out", str(tmp_path / "ds"),
            "--n-jobs", "1", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    config = seen["config"]
    assert (config.n_subjects, config.sigma_gap, config.resolution) == (12, 2.0, 2)
    assert seen["out"] == tmp_path / "ds" and seen["n_jobs"] == 1

    cfg.write_text(yaml.safe_dump({"n_subject": 3}))
    assert main(["synth", "--config", str(cfg), "--out", str(tmp_path / "x")]) == 1
    assert "n_subject" in capsys.readouterr().err
    assert main(["synth", "--config", str(tmp_path / "no.yaml"), "--out", "x"]) == 1
    assert f"{tmp_path / 'no.yaml'}: config file does not exist" in capsys.readouterr().err


def test_synth_then_prepare(tmp_path: Path, capsys) -> None:
    """The README's two commands: generate a cohort, then prepare it like any BIDS folder."""
    ds = tmp_path / "ds"
    args = ["synth", "--n", "5", "--resolution", "4", "--seed", "1", "--out", str(ds),
            "--n-jobs", "1", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    assert "synthetic cohort:" in capsys.readouterr().out
    assert main(_prepare_args("--bids", str(ds), out=tmp_path / "cache")) == 0
    cohort = PreparedCohort.open(_cache_root(capsys.readouterr().out))
    truth = pd.read_csv(ds / "participants.tsv", sep="\t")
    assert list(cohort.table["participant_id"]) == list(truth["participant_id"])
    assert {"gap", "group"} <= set(cohort.table.columns)
    desc = json.loads((ds / "dataset_description.json").read_text())
    assert cohort.metadata["oracle_mae"] == pytest.approx(desc["SyntheticCohort"]["oracle_mae"])
    assert cohort.metadata["source"] == "synthetic"
    assert cohort.metadata["source_root"] == str(ds.resolve())


@pytest.mark.slow
def test_bench_data_smoke(tmp_path: Path, capsys) -> None:
    """The data benchmark runs end to end on a tiny cohort and reports its figures."""
    from brainage_core.bench import data as bench_data

    figures = bench_data.run(["--n", "2", "--resolution", "8", "--n-jobs", "1",
                              "--workdir", str(tmp_path)])  # fmt: skip
    out = capsys.readouterr().out
    assert "generation :" in out and "preparation:" in out
    assert figures["grid_shape"] == [20, 24, 21]
    for key in ("generate_s_per_subject", "prepare_s_per_subject", "prepare_peak_rss_main_mb",
                "cache_disk_mb", "dataset_disk_mb"):  # fmt: skip
        assert figures[key] > 0, key
    assert list(tmp_path.iterdir()) == []  # the temporary dataset and cache are removed


def test_data_notebook_is_clean_and_parameterised() -> None:
    """notebooks/01_data.ipynb: a 'parameters' cell with run_dir, committed without outputs."""
    import nbformat

    path = Path(__file__).resolve().parents[2] / "notebooks" / "01_data.ipynb"
    nb = nbformat.read(path, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    assert tagged[0].source.startswith('run_dir = "runs/quick"')
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")
    assert nb.metadata["kernelspec"]["name"] == "python3"
    assert any("load_cohort(" in c.source for c in nb.cells)
