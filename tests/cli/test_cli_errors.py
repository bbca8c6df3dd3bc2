"""Every failure of synth, prepare and run is one error line (issue 10)."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from helpers.cli import one_error_line
from helpers.data import RES, make_bids, t1w_path, truncate_gzip

from brainage_core._utils.validation import BrainAgeInputError
from brainage_core.cli import main
from brainage_core.data.manifest import validate_manifest
from brainage_core.data.sources.bids import load_bids
from brainage_core.pipeline.runner import StepFailed
from brainage_core.study.config import load_config

FORK = multiprocessing.get_context("fork")
QUICK_DATA = ["-p", "data.synthetic.n_subjects", "12", "-p", "data.synthetic.resolution", "8",
              "-p", "data.resolution", "8"]  # fmt: skip


def _prepare_cli(source: Path, out: Path, *extra: str) -> list[str]:
    return ["prepare", "--bids", str(source), "--out", str(out), "--resolution", str(RES),
            "--n-jobs", "1", "--no-progress", *extra]  # fmt: skip


@pytest.fixture
def read_only(tmp_path: Path):
    """A read-only folder: permissions for a user, a read-only bind mount for root."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    mounted = subprocess.run(
        ["mount", "--bind", "-o", "ro", str(folder), str(folder)], capture_output=True
    )
    if mounted.returncode != 0:  # root without CAP_SYS_ADMIN: no way to make one
        pytest.skip(f"cannot make a read-only folder as root: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_read_only_output_folders_areone_error_line(read_only: Path, tiny_bids, capsys):
    assert main(["synth", "--n", "4", "--resolution", "8", "--out", str(read_only / "s"),
                 "--no-progress"]) == 1  # fmt: skip
    reason = f"is not writable: permission denied or read-only file system in {read_only}"
    assert one_error_line(capsys, "synth") == f"{read_only / 's'}: --out {reason}"
    assert main(_prepare_cli(tiny_bids, read_only / "p")) == 1
    assert one_error_line(capsys, "prepare") == f"{read_only / 'p'}: --out {reason}"
    run = ["run", "--preset", "quick", "--dry-run", *QUICK_DATA]
    assert main([*run, "--run-dir", str(read_only / "r")]) == 1
    assert one_error_line(capsys, "run") == f"{read_only / 'r'}: --run-dir {reason}"
    assert main([*run, "-p", "data.cache_dir", str(read_only / "c")]) == 1
    assert one_error_line(capsys, "run") == f"{read_only / 'c'}: data.cache_dir {reason}"
    assert list(read_only.iterdir()) == []


def test_an_os_error_while_working_isone_error_line(tiny_bids, tmp_path, monkeypatch, capsys):
    def fails(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "c" / "x.lock"))

    monkeypatch.setattr("brainage_core.cli.prepare.prepare_cohort", fails)
    assert main(_prepare_cli(tiny_bids, tmp_path / "c")) == 1
    assert one_error_line(capsys, "prepare") == (
        f"{tmp_path / 'c' / 'x.lock'}: Permission denied (is the folder read-only?)"
    )


def test_run_folders_that_are_files_are_refused(tmp_path: Path, capsys) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["run", "--preset", "quick", "--dry-run", "--run-dir", str(afile)]) == 1
    assert one_error_line(capsys, "run") == f"{afile}: --run-dir is a file, not a folder"
    assert main(["run", "--preset", "quick", "--dry-run", "--runs-root", str(afile)]) == 1
    assert one_error_line(capsys, "run") == f"{afile}: --runs-root is a file, not a folder"
    assert main(["run", "--preset", "quick", "--dry-run", "--run-dir", str(afile / "sub")]) == 1
    assert one_error_line(capsys, "run") == (
        f"{afile / 'sub'}: --run-dir cannot be created: {afile} is a file, not a folder"
    )
    assert afile.read_text() == "x"


@pytest.mark.parametrize("command", ["run", "synth"])
def test_config_files_that_are_not_text_or_are_folders(command, tmp_path, capsys) -> None:
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(bytes(range(256)))
    base = ["run", "--preset", "quick", "--dry-run"] if command == "run" else [
        "synth", "--out", str(tmp_path / "s")]
    assert main([*base, "--config", str(binary)]) == 1
    assert one_error_line(capsys, command) == (
        f"{binary}: not a text file (byte 128 is not UTF-8); a YAML config file was expected"
    )
    nul = tmp_path / "nul.yaml"
    nul.write_bytes(b"name: x\x00\x00")
    assert main([*base, "--config", str(nul)]) == 1
    assert one_error_line(capsys, command) == (
        f"{nul}: not a text file (it holds NUL bytes); a YAML config file was expected"
    )
    assert main([*base, "--config", str(tmp_path)]) == 1
    assert one_error_line(capsys, command) == (
        f"{tmp_path}: this is a folder; a config file (YAML) was expected"
    )


def test_cache_dir_of_the_wrong_type_fails_at_validation(capsys) -> None:
    assert main(["run", "--preset", "quick", "-p", "data.cache_dir", "5", "--dry-run"]) == 1
    assert one_error_line(capsys, "run") == (
        "config section 'data': 'data.cache_dir' must be a folder or file path (text); 5 was "
        "provided."
    )
    assert main(["run", "--preset", "quick", "-p", "data.path", "[1, 2]", "--dry-run"]) == 1
    assert one_error_line(capsys, "run") == (
        "config section 'data': 'data.path' must be a folder or file path (text); [1, 2] was "
        "provided."
    )
    with pytest.raises(BrainAgeInputError, match=r"'data.age_range' must be two finite"):
        load_config("quick", overrides=[("data.age_range", "[90, 10]")])


def test_ctrl_c_is_one_line_and_status_130(tiny_bids, tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("brainage_core.cli.prepare.prepare_cohort", interrupted)
    assert main(_prepare_cli(tiny_bids, tmp_path / "c")) == 130
    assert one_error_line(capsys, "prepare") == (
        "interrupted (Ctrl-C); what was finished is kept; run the same command again to resume"
    )


def test_sigterm_is_one_line_and_status_143(tiny_bids, tmp_path, monkeypatch, capsys):
    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
        raise AssertionError("SIGTERM did not stop the command")

    monkeypatch.setattr("brainage_core.cli.prepare.prepare_cohort", terminated)
    previous = signal.getsignal(signal.SIGTERM)
    assert main(_prepare_cli(tiny_bids, tmp_path / "c")) == 143
    assert one_error_line(capsys, "prepare") == (
        "terminated (SIGTERM); what was finished is kept; run the same command again to resume"
    )
    assert signal.getsignal(signal.SIGTERM) == previous


def _set_age(root: Path, pid: str, age: float) -> None:
    tsv = root / "participants.tsv"
    table = pd.read_csv(tsv, sep="\t")
    table.loc[table["participant_id"] == pid, "age"] = age
    table.to_csv(tsv, sep="\t", index=False)


def test_an_implausible_age_names_participant_and_value(tiny_bids, tmp_path, capsys):
    _set_age(tiny_bids, "sub-03", 300)
    image = t1w_path(tiny_bids, "sub-03")
    assert main(_prepare_cli(tiny_bids, tmp_path / "c")) == 1
    assert one_error_line(capsys, "prepare") == (
        f"{image}: participant 'sub-03': age 300 is outside the plausible range [0, 120] "
        f"years, set by --age-range LOW HIGH (in {tiny_bids}; use --on-error skip to skip "
        "such participants)"
    )
    with pytest.raises(BrainAgeInputError) as err:
        validate_manifest(load_bids(tiny_bids), "bids")
    assert "set by age_range=(low, high) (in bids; use on_error='skip' to skip" in str(err.value)
    assert main(_prepare_cli(tiny_bids, tmp_path / "c", "--age-range", "0", "400")) == 0
    _set_age(tiny_bids, "sub-03", -1)
    skipped = validate_manifest(load_bids(tiny_bids), on_error="skip").attrs["skipped"]
    assert skipped["reason"].tolist() == [
        "age -1 is outside the plausible range [0, 120] years, set by age_range=(low, high)"
    ]


def test_a_subject_missing_from_participants_tsv_is_not_listed(tiny_bids, tmp_path, capsys):
    tsv = tiny_bids / "participants.tsv"
    table = pd.read_csv(tsv, sep="\t")
    table[table["participant_id"] != "sub-04"].to_csv(tsv, sep="\t", index=False)
    assert main(_prepare_cli(tiny_bids, tmp_path / "c")) == 1
    assert one_error_line(capsys, "prepare") == (
        f"{t1w_path(tiny_bids, 'sub-04')}: participant 'sub-04': has an image but is not "
        f"listed in {tsv}, so it has no age (in {tiny_bids}; use --on-error skip to skip such "
        "participants)"
    )


def test_the_skip_hint_speaks_the_callers_language(monkeypatch, capsys) -> None:
    def fails(*args, **kwargs):
        raise StepFailed("01_data", Path("nb.ipynb"), 3,
                         "BrainAgeInputError: x: bad (use on_error='skip' to skip such)")

    monkeypatch.setattr("brainage_core.pipeline.runner.run_pipeline", fails)
    assert main(["run", "--preset", "quick", "--run-dir", "unused-run"]) == 1
    err = capsys.readouterr().err
    assert "(use -p data.on_error skip to skip such)" in err and "on_error='skip'" not in err


def test_a_superseded_partial_is_removed_with_a_notice(tiny_bids, tmp_path, capsys) -> None:
    bad = t1w_path(tiny_bids, "sub-05")
    good = bad.read_bytes()
    truncate_gzip(bad)
    out = tmp_path / "c"
    assert main(_prepare_cli(tiny_bids, out)) == 1
    capsys.readouterr()
    (stale,) = out.glob("*.partial")
    other = out / "0123456789abcdef01234567.partial"  # another source's: kept
    other.mkdir()
    (other / "partial.json").write_text(json.dumps({"source_root": "/elsewhere",
                                                    "resolution": RES}))  # fmt: skip
    bad.write_bytes(good)  # the fixed input: a new key
    assert main(_prepare_cli(tiny_bids, out)) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"note: removed {stale} (")
    assert err[0].endswith(
        " MB): an unfinished preparation of the same source and grid whose inputs have "
        "changed since"
    )
    assert not stale.exists() and other.exists()
    assert sorted(p.name for p in out.glob("*.partial")) == [other.name]


def test_a_bad_image_with_2_workers_ends_the_process(tmp_path: Path) -> None:
    """A fresh interpreter: stopping the pool on the error must not hang its exit."""
    bids = make_bids(tmp_path / "bids", n=12)
    truncate_gzip(t1w_path(bids, "sub-05"))
    code = "import sys; from brainage_core.cli import main; sys.exit(main(sys.argv[1:]))"
    args = [sys.executable, "-c", code, "prepare", "--bids", str(bids), "--out",
            str(tmp_path / "c"), "--resolution", str(RES), "--n-jobs", "2", "--no-progress"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("brainage-study prepare: error: ")
    assert "participant 'sub-05'" in lines[0] and "truncated or corrupt" in lines[0]
