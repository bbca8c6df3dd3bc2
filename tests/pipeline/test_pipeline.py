"""Papermill orchestration on tiny dummy notebooks, and the study notebooks' hygiene."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest

from brainage_core._utils.validation import BrainAgeInputError
from brainage_core.cli import main as cli
from brainage_core.pipeline.runner import (
    NOTEBOOK_DIR,
    StepFailed,
    discover_steps,
    load_state,
    prepare_run_dir,
    run_pipeline,
)
from brainage_core.study.config import load_config, run_name
from brainage_core.study.rundir import RunDir

STUDY_NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))


def _notebook(body: str) -> nbformat.NotebookNode:
    """A study-like notebook: a tagged parameters cell, then ``body``."""
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('run_dir = "runs/quick"')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    return nb


def _append_line(name: str) -> str:
    return (
        "from pathlib import Path\n"
        f"with open(Path(run_dir) / 'order.txt', 'a') as f:\n    f.write('{name}\\n')\n"
        f"print('step {name} ran')"
    )


@pytest.fixture
def notebooks(tmp_path: Path) -> Path:
    folder = tmp_path / "notebooks"
    folder.mkdir()
    for name in ("01_first", "02_second", "03_third"):
        nbformat.write(_notebook(_append_line(name)), folder / f"{name}.ipynb")
    (folder / "README.md").write_text("not a step")
    return folder


@pytest.fixture
def config() -> dict:
    return load_config("quick")


def _run(config: dict, run_dir: Path, notebooks: Path, **kwargs):
    return run_pipeline(config, run_dir, notebook_dir=notebooks, progress=False,
                        code_version="test", log=lambda _: None, **kwargs)


def _order(run_dir: Path) -> list[str]:
    return (run_dir / "order.txt").read_text().split()


def test_runs_in_order_into_stable_names(notebooks, config, tmp_path):
    result = _run(config, tmp_path / "run", notebooks)
    run_dir = tmp_path / "run"
    assert _order(run_dir) == ["01_first", "02_second", "03_third"]
    assert result.ran == ["01_first", "02_second", "03_third"]
    assert sorted(p.name for p in (run_dir / "notebooks").iterdir()) == [
        "01_first.ipynb", "02_second.ipynb", "03_third.ipynb"]
    # the config was written first, and the notebooks got the absolute run folder
    assert RunDir(run_dir).load_config() == config
    executed = nbformat.read(run_dir / "notebooks" / "02_second.ipynb", as_version=4)
    injected = [c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert injected and str(run_dir.resolve()) in injected[0].source
    assert "step 02_second ran" in executed.cells[-1].outputs[0]["text"]


def test_notebooks_run_with_this_interpreter(config, tmp_path, monkeypatch):
    """The kernel is this environment's python, whatever 'python3' kernel is installed."""
    folder = tmp_path / "notebooks"
    folder.mkdir()
    body = ("import sys\nfrom pathlib import Path\n"
            "(Path(run_dir) / 'python.txt').write_text(sys.executable)\n"
            "import matplotlib.pyplot as plt\nplt.plot([0, 1])\nplt.show()")
    nbformat.write(_notebook(body), folder / "01_which.ipynb")
    # a user-level kernelspec named python3 pointing elsewhere must not win
    user = tmp_path / "user_jupyter" / "kernels" / "python3"
    user.mkdir(parents=True)
    (user / "kernel.json").write_text(json.dumps(
        {"argv": ["/nonexistent/python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
         "display_name": "elsewhere", "language": "python"}))
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "user_jupyter"))
    monkeypatch.setenv("JUPYTER_PREFER_ENV_PATH", "0")
    monkeypatch.setenv("MPLBACKEND", "Agg")  # as the test suite has: figures must still show
    _run(config, tmp_path / "run", folder)
    assert Path((tmp_path / "run" / "python.txt").read_text()) == Path(sys.executable)
    executed = nbformat.read(tmp_path / "run" / "notebooks" / "01_which.ipynb", as_version=4)
    assert any("image/png" in o.get("data", {}) for o in executed.cells[-1].outputs)


def test_rerun_skips_unchanged_and_reruns_downstream_of_a_change(notebooks, config, tmp_path):
    run_dir = tmp_path / "run"
    _run(config, run_dir, notebooks)
    again = _run(config, run_dir, notebooks)
    assert again.ran == [] and again.skipped == ["01_first", "02_second", "03_third"]
    assert _order(run_dir) == ["01_first", "02_second", "03_third"]

    # editing step 2 re-runs it and everything after it, not step 1
    nbformat.write(_notebook(_append_line("02_second") + "\nx = 1"),
                   notebooks / "02_second.ipynb")
    changed = _run(config, run_dir, notebooks)
    assert changed.skipped == ["01_first"]
    assert changed.ran == ["02_second", "03_third"]

    forced = _run(config, run_dir, notebooks, force=True)
    assert forced.ran == ["01_first", "02_second", "03_third"]
    state = load_state(RunDir(run_dir))
    assert {rec["status"] for rec in state["steps"].values()} == {"ok"}


def test_failure_names_notebook_and_cell_and_keeps_partial_notebook(notebooks, config, tmp_path):
    nbformat.write(
        _notebook("print('before the error')\nraise ValueError('planted failure')"),
        notebooks / "02_second.ipynb",
    )
    run_dir = tmp_path / "run"
    with pytest.raises(StepFailed) as info:
        _run(config, run_dir, notebooks)
    message = str(info.value)
    assert "02_second.ipynb" in message
    assert "In [" in message and "ValueError" in message and "planted failure" in message
    assert info.value.step == "02_second"
    partial = run_dir / "notebooks" / "02_second.ipynb"
    assert info.value.notebook == partial and partial.is_file()
    executed = nbformat.read(partial, as_version=4)
    assert any("before the error" in json.dumps(c.get("outputs", [])) for c in executed.cells)
    # step 3 never ran; the state records the failure, so a re-run executes step 2 again
    assert _order(run_dir) == ["01_first"]
    assert load_state(RunDir(run_dir))["steps"]["02_second"]["status"] == "failed"
    nbformat.write(_notebook(_append_line("02_second")), notebooks / "02_second.ipynb")
    fixed = _run(config, run_dir, notebooks)
    assert fixed.skipped == ["01_first"] and fixed.ran == ["02_second", "03_third"]


def test_a_run_folder_of_another_config_is_refused(config, tmp_path):
    run_dir = tmp_path / "run"
    prepare_run_dir(config, run_dir)
    prepare_run_dir(config, run_dir)  # same config: fine
    other = load_config("quick", overrides=[("prediction.epochs", 99)])
    with pytest.raises(BrainAgeInputError, match=r"another configuration.*prediction\.epochs"):
        prepare_run_dir(other, run_dir)
    assert RunDir(run_dir).load_config() == config  # untouched


def test_derived_run_folders_differ_with_parameters(config, tmp_path):
    other = load_config("quick", overrides=[("prediction.epochs", 99)])
    a = prepare_run_dir(config, runs_root=tmp_path)
    b = prepare_run_dir(other, runs_root=tmp_path)
    assert a.root != b.root and a.root.parent == b.root.parent == tmp_path
    assert a.root.name.startswith("quick-") and b.root.name.startswith("quick-")


def test_discover_steps_orders_by_number_and_needs_notebooks(notebooks, tmp_path):
    assert [s.name for s in discover_steps(notebooks)] == ["01_first", "02_second", "03_third"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(BrainAgeInputError, match="no study notebooks"):
        discover_steps(tmp_path / "empty")


@pytest.mark.parametrize("path", STUDY_NOTEBOOKS, ids=[p.name for p in STUDY_NOTEBOOKS])
def test_study_notebooks_are_clean_and_parameterised(path):
    nb = nbformat.read(path, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: needs exactly one cell tagged 'parameters'"
    assert tagged[0].cell_type == "code"
    assert "run_dir" in tagged[0].source, f"{path.name}: the parameters cell must set run_dir"
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert not cell.outputs, f"{path.name}: cell {index} has outputs (commit it clean)"
            assert cell.execution_count is None, f"{path.name}: cell {index} has a count"
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"


def test_runs_name_links_to_the_latest_run(tmp_path):
    from brainage_core.cli.run import _link_latest

    first, second = tmp_path / "quick-aaaa", tmp_path / "quick-bbbb"
    first.mkdir()
    second.mkdir()
    _link_latest(str(tmp_path), "quick", first)
    assert (tmp_path / "quick").resolve() == first.resolve()
    _link_latest(str(tmp_path), "quick", second)
    assert (tmp_path / "quick").resolve() == second.resolve()
    assert first.is_dir()  # the older run is untouched
    real = tmp_path / "other"
    real.mkdir()
    _link_latest(str(tmp_path), "other", second)
    assert not real.is_symlink()  # a real folder of that name is never replaced


def test_a_parameter_override_gives_a_separate_run(tmp_path):
    # two small steps that print the run's configuration, as notebook 05 does (the real
    # notebooks' parameters are checked by the quick run): what is tested is the run folder
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    show = ("import yaml\nfrom brainage_core.study.rundir import RunDir\n"
            "print(run_dir)\nprint(yaml.safe_dump(RunDir(run_dir).load_config()))")
    for name in ("01_first", "02_second"):
        nbformat.write(_notebook(show), notebooks / f"{name}.ipynb")
    runs_root = tmp_path / "runs"
    overrides = [("prediction.epochs", 1), ("maps.epochs", 1)]
    assert cli(["run", "--preset", "quick", "--runs-root", str(runs_root),
                "--notebooks", str(notebooks),
                *[arg for key, value in overrides for arg in ("-p", key, str(value))]]) == 0
    expected = runs_root / run_name(load_config("quick", overrides=overrides))
    assert sorted(runs_root.iterdir()) == [runs_root / "quick", expected]
    assert (runs_root / "quick").resolve() == expected.resolve()  # link to the latest run
    assert RunDir(expected).load_config()["prediction"]["epochs"] == 1
    # the executed notebooks got the new run folder and show the new value
    for name in ("01_first", "02_second"):
        shown = nbformat.read(expected / "notebooks" / f"{name}.ipynb", as_version=4)
        printed = "".join(o.get("text", "") for c in shown.cells if c.cell_type == "code"
                          for o in c.outputs)
        assert str(expected.resolve()) in printed, name
        # the prediction section's own lines (indented), up to the next top-level key
        section = printed.split("\nprediction:\n")[1].split("\n")
        section = section[:next(i for i, line in enumerate(section) if not line.startswith(" "))]
        assert "  epochs: 1" in section, name
    # a second override of the same key gives a third folder; the link follows it
    again = [("prediction.epochs", 2)]
    assert cli(["run", "--preset", "quick", "--runs-root", str(runs_root),
                "--notebooks", str(notebooks), "-p", "prediction.epochs", "2"]) == 0
    third = runs_root / run_name(load_config("quick", overrides=again))
    assert sorted(runs_root.iterdir()) == sorted([runs_root / "quick", expected, third])
    assert (runs_root / "quick").resolve() == third.resolve()
    assert RunDir(expected).load_config()["prediction"]["epochs"] == 1  # untouched
