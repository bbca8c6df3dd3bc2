"""One clear error line for every failure, precise input checks, housekeeping (issue 10)."""
# ruff: noqa: F811  (pytest fixtures imported from _fixtures_data)

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path

import nbformat
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from _fixtures_data import RES, make_bids, t1w_path, tiny_bids, truncate_gzip  # noqa: F401
from _fixtures_synth import TINY_CONFIG, tiny_cohort  # noqa: F401
from _reliability import cache_files, published

from brainage_core import _io, cache
from brainage_core._locks import LockBusy, file_lock
from brainage_core._validation import BrainAgeInputError
from brainage_core.cli import main
from brainage_core.config import load_config
from brainage_core.manifest import load_bids, validate_manifest
from brainage_core.pipeline import LOCK_FILE, StepFailed, load_state, run_pipeline
from brainage_core.preprocess import preprocess_image
from brainage_core.rundir import RunDir
from brainage_core.template import load_template

FORK = multiprocessing.get_context("fork")
QUICK_DATA = ["-p", "data.synthetic.n_subjects", "12", "-p", "data.synthetic.resolution", "8",
              "-p", "data.resolution", "8"]  # fmt: skip


def _prepare_cli(source: Path, out: Path, *extra: str) -> list[str]:
    return ["prepare", "--bids", str(source), "--out", str(out), "--resolution", str(RES),
            "--n-jobs", "1", "--no-progress", *extra]  # fmt: skip


def _one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"brainage-study {command}: error: ")
    return lines[0][len(f"brainage-study {command}: error: ") :]


# -- read-only output folders -------------------------------------------------------------
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


def test_read_only_output_folders_are_one_error_line(read_only: Path, tiny_bids, capsys):
    assert main(["synth", "--n", "4", "--resolution", "8", "--out", str(read_only / "s"),
                 "--no-progress"]) == 1  # fmt: skip
    reason = f"is not writable: permission denied or read-only file system in {read_only}"
    assert _one_error_line(capsys, "synth") == f"{read_only / 's'}: --out {reason}"
    assert main(_prepare_cli(tiny_bids, read_only / "p")) == 1
    assert _one_error_line(capsys, "prepare") == f"{read_only / 'p'}: --out {reason}"
    run = ["run", "--preset", "quick", "--dry-run", *QUICK_DATA]
    assert main([*run, "--run-dir", str(read_only / "r")]) == 1
    assert _one_error_line(capsys, "run") == f"{read_only / 'r'}: --run-dir {reason}"
    assert main([*run, "-p", "data.cache_dir", str(read_only / "c")]) == 1
    assert _one_error_line(capsys, "run") == f"{read_only / 'c'}: data.cache_dir {reason}"
    assert list(read_only.iterdir()) == []


def test_an_os_error_while_working_is_one_error_line(tiny_bids, tmp_path, monkeypatch, capsys):
    def fails(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "c" / "x.lock"))

    monkeypatch.setattr("brainage_core.cli.prepare.prepare_cohort", fails)
    assert main(_prepare_cli(tiny_bids, tmp_path / "c")) == 1
    assert _one_error_line(capsys, "prepare") == (
        f"{tmp_path / 'c' / 'x.lock'}: Permission denied (is the folder read-only?)"
    )


# -- paths that are files, config files that are not YAML ----------------------------------
def test_run_folders_that_are_files_are_refused(tmp_path: Path, capsys) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["run", "--preset", "quick", "--dry-run", "--run-dir", str(afile)]) == 1
    assert _one_error_line(capsys, "run") == f"{afile}: --run-dir is a file, not a folder"
    assert main(["run", "--preset", "quick", "--dry-run", "--runs-root", str(afile)]) == 1
    assert _one_error_line(capsys, "run") == f"{afile}: --runs-root is a file, not a folder"
    assert main(["run", "--preset", "quick", "--dry-run", "--run-dir", str(afile / "sub")]) == 1
    assert _one_error_line(capsys, "run") == (
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
    assert _one_error_line(capsys, command) == (
        f"{binary}: not a text file (byte 128 is not UTF-8); a YAML config file was expected"
    )
    nul = tmp_path / "nul.yaml"
    nul.write_bytes(b"name: x\x00\x00")
    assert main([*base, "--config", str(nul)]) == 1
    assert _one_error_line(capsys, command) == (
        f"{nul}: not a text file (it holds NUL bytes); a YAML config file was expected"
    )
    assert main([*base, "--config", str(tmp_path)]) == 1
    assert _one_error_line(capsys, command) == (
        f"{tmp_path}: this is a folder; a config file (YAML) was expected"
    )


def test_cache_dir_of_the_wrong_type_fails_at_validation(capsys) -> None:
    assert main(["run", "--preset", "quick", "-p", "data.cache_dir", "5", "--dry-run"]) == 1
    assert _one_error_line(capsys, "run") == (
        "'data.cache_dir' must be a folder or file path (text); 5 was provided."
    )
    assert main(["run", "--preset", "quick", "-p", "data.path", "[1, 2]", "--dry-run"]) == 1
    assert _one_error_line(capsys, "run") == (
        "'data.path' must be a folder or file path (text); [1, 2] was provided."
    )
    with pytest.raises(BrainAgeInputError, match=r"'data.age_range' must be two finite"):
        load_config("quick", overrides=[("data.age_range", "[90, 10]")])


# -- Ctrl-C ---------------------------------------------------------------------------------
def test_ctrl_c_is_one_line_and_status_130(tiny_bids, tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("brainage_core.cli.prepare.prepare_cohort", interrupted)
    assert main(_prepare_cli(tiny_bids, tmp_path / "c")) == 130
    assert _one_error_line(capsys, "prepare") == (
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
    assert _one_error_line(capsys, "prepare") == (
        "terminated (SIGTERM); what was finished is kept; run the same command again to resume"
    )
    assert signal.getsignal(signal.SIGTERM) == previous


def _notebook(body: str) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('run_dir = "runs/quick"')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}  # fmt: skip
    return nb


def test_an_interrupted_step_is_recorded_as_interrupted(tmp_path, monkeypatch) -> None:
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    nbformat.write(_notebook("x = 1"), notebooks / "01_step.ipynb")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("papermill.execute_notebook", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(load_config("quick"), tmp_path / "run", notebook_dir=notebooks,
                     progress=False, code_version="t", log=lambda _: None)  # fmt: skip
    record = load_state(RunDir(tmp_path / "run"))["steps"]["01_step"]
    assert record["status"] == "interrupted" and "finished" in record


# -- a run folder is used by one run at a time ------------------------------------------------
def _run_slow_step(notebooks: str, run_dir: str) -> None:
    run_pipeline(load_config("quick"), run_dir, notebook_dir=notebooks, progress=False,
                 code_version="t", log=lambda _: None)  # fmt: skip
    os._exit(0)


def test_two_runs_on_one_folder_wait_or_are_refused(tmp_path: Path, capsys) -> None:
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    body = ("import time\nfrom pathlib import Path\ntime.sleep(2)\n"
            "with open(Path(run_dir) / 'ran.txt', 'a') as f:\n    f.write('ran\\n')")
    nbformat.write(_notebook(body), notebooks / "01_slow.ipynb")
    run_dir = tmp_path / "run"
    first = FORK.Process(target=_run_slow_step, args=(str(notebooks), str(run_dir)))
    first.start()
    deadline = time.monotonic() + 30
    while not (run_dir / ".pipeline.json").exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    argv = ["run", "--preset", "quick", "--notebooks", str(notebooks), "--run-dir",
            str(run_dir), "--no-wait"]  # fmt: skip
    assert main(argv) == 1
    message = _one_error_line(capsys, "run")
    assert message.startswith(
        f"{run_dir / LOCK_FILE}: this run folder is in use by pid {first.pid} on "
    )
    assert message.endswith("wait for it to finish, or leave out --no-wait to wait for it")
    # waiting: the second run starts when the first is done, and finds nothing to redo
    result = run_pipeline(load_config("quick"), run_dir, notebook_dir=notebooks,
                          progress=False, code_version="t", log=lambda _: None)  # fmt: skip
    first.join(60)
    assert first.exitcode == 0
    assert result.skipped == ["01_slow"] and result.ran == []
    assert (run_dir / "ran.txt").read_text() == "ran\n"
    notice = capsys.readouterr().err.strip().splitlines()
    assert len(notice) == 1 and notice[0].startswith(
        f"note: {run_dir / LOCK_FILE}: this run folder is in use by pid {first.pid} on "
    )
    with pytest.raises(LockBusy), file_lock(run_dir / LOCK_FILE):
        with file_lock(run_dir / LOCK_FILE, wait=False):
            pass


# -- inputs ----------------------------------------------------------------------------------
def _set_age(root: Path, pid: str, age: float) -> None:
    tsv = root / "participants.tsv"
    table = pd.read_csv(tsv, sep="\t")
    table.loc[table["participant_id"] == pid, "age"] = age
    table.to_csv(tsv, sep="\t", index=False)


def test_an_implausible_age_names_participant_and_value(tiny_bids, tmp_path, capsys):
    _set_age(tiny_bids, "sub-03", 300)
    image = t1w_path(tiny_bids, "sub-03")
    assert main(_prepare_cli(tiny_bids, tmp_path / "c")) == 1
    assert _one_error_line(capsys, "prepare") == (
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
    assert _one_error_line(capsys, "prepare") == (
        f"{t1w_path(tiny_bids, 'sub-04')}: participant 'sub-04': has an image but is not "
        f"listed in {tsv}, so it has no age (in {tiny_bids}; use --on-error skip to skip such "
        "participants)"
    )


def test_the_skip_hint_speaks_the_callers_language(monkeypatch, capsys) -> None:
    def fails(*args, **kwargs):
        raise StepFailed("01_data", Path("nb.ipynb"), 3,
                         "BrainAgeInputError: x: bad (use on_error='skip' to skip such)")

    monkeypatch.setattr("brainage_core.pipeline.run_pipeline", fails)
    assert main(["run", "--preset", "quick", "--run-dir", "unused-run"]) == 1
    err = capsys.readouterr().err
    assert "(use -p data.on_error skip to skip such)" in err and "on_error='skip'" not in err


def _image_on_disk(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    img = nib.Nifti1Image(data, affine)
    img.set_data_dtype(np.float64)
    nib.save(img, path)


@pytest.mark.parametrize("factor", [1e300, 1e-30])
def test_extreme_intensity_scales_are_handled(factor: float, tmp_path: Path) -> None:
    template = load_template(RES)
    plain = tmp_path / "plain.nii.gz"
    nib.save(nib.load(make_bids(tmp_path / "b", n=1) / "sub-01/anat/sub-01_T1w.nii.gz"), plain)
    data = np.asarray(nib.load(plain).dataobj, dtype=np.float64)
    scaled = tmp_path / "scaled.nii.gz"
    _image_on_disk(scaled, data * factor, nib.load(plain).affine)
    expected = preprocess_image(plain, template)
    got = preprocess_image(scaled, template)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_an_extreme_outlier_is_named_precisely(tmp_path: Path) -> None:
    template = load_template(RES)
    data = np.asarray(template.t1, dtype=np.float64) * 100
    data[0, 0, 0] = 1e300
    path = tmp_path / "outlier.nii.gz"
    _image_on_disk(path, data, template.affine)
    n_lost = int(np.count_nonzero(data)) - 1
    with pytest.raises(BrainAgeInputError) as err:
        preprocess_image(path, template)
    smallest = float(np.min(np.abs(data[data != 0])))
    assert str(err.value) == (
        f"{path}: voxel magnitudes range from {smallest:.3g} to 1e+300, more than 32-bit "
        f"floats hold at once: {n_lost} non-zero voxel(s) would become 0 (an extreme outlier "
        "or a corrupt file?)"
    )


# -- housekeeping ------------------------------------------------------------------------------
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


def test_no_temporary_file_reaches_a_published_cache(tiny_bids, tmp_path) -> None:
    reference = cache.prepare_cohort(load_bids(tiny_bids), tmp_path / "ref", resolution=RES,
                                     n_jobs=1, progress=False)  # fmt: skip
    out = tmp_path / "c"
    shutil.copytree(reference.root, out / (reference.root.name + ".partial"))
    partial = out / (reference.root.name + ".partial")
    (partial / "metadata.json").unlink()  # as if killed during the publication
    (partial / ".table.tsv.k2j4.tmp.tsv").write_text("half a table")
    (partial / "images.compact.npy").write_bytes(b"half")
    again = cache.prepare_cohort(load_bids(tiny_bids), out, resolution=RES, n_jobs=1,
                                 progress=False)  # fmt: skip
    assert cache_files(again.root) == cache_files(reference.root)
    assert published(out) == again.root


def test_a_resumed_generation_removes_the_temporary_files_of_the_kill(
    tiny_cohort: Path, tmp_path: Path
) -> None:
    from brainage_core.synth import SynthConfig, generate_cohort

    config = SynthConfig.from_dict(TINY_CONFIG)
    out = tmp_path / "s"
    shutil.copytree(tiny_cohort, out)
    image = out / "sub-0002" / "anat" / "sub-0002_T1w.nii.gz"
    image.unlink()
    leftover = image.with_name(".sub-0002_T1w.nii.gz.x8w1.tmp.nii.gz")
    leftover.write_bytes(b"half an image")
    generate_cohort(config, out, n_jobs=1, progress=False)
    assert image.is_file() and not leftover.exists()
    assert not [p for p in out.rglob("*") if _io.is_temporary_file(p)]


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_written_files_respect_the_umask(umask: int, tiny_bids, tmp_path) -> None:
    old = os.umask(umask)
    try:
        path = _io.write_text(tmp_path / "a.txt", "x")
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
        cohort = cache.prepare_cohort(load_bids(tiny_bids), tmp_path / f"c{umask}",
                                      resolution=RES, n_jobs=1, progress=False)  # fmt: skip
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in cohort.root.iterdir()}
        assert set(modes.values()) == {0o666 & ~umask}, modes
    finally:
        os.umask(old)
