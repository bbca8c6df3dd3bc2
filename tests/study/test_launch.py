"""The launcher of the heavy steps: one process runs in the notebook, bad settings fail."""

from __future__ import annotations

import pytest

from brainage_core._utils.validation import BrainAgeInputError
from brainage_core.cli import main
from brainage_core.study import launch


def test_one_process_leaves_the_step_to_the_notebook(monkeypatch, tmp_path):
    monkeypatch.delenv(launch.NPROC_ENV, raising=False)
    assert launch.nproc() == 1
    assert launch.launch_step("train", tmp_path) is False
    assert not any(tmp_path.iterdir())  # nothing was started, nothing written


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_a_bad_process_count_is_one_clear_error(monkeypatch, tmp_path, value):
    monkeypatch.setenv(launch.NPROC_ENV, value)
    with pytest.raises(BrainAgeInputError, match=launch.NPROC_ENV):
        launch.launch_step("train", tmp_path)
    with pytest.raises(BrainAgeInputError, match="'step' must be one of"):
        launch.launch_step("predict", tmp_path, processes=1)


def test_run_rejects_a_bad_nproc(capsys):
    assert main(["run", "--preset", "quick", "--nproc", "0", "--dry-run"]) == 1
    assert "--nproc" in capsys.readouterr().err
