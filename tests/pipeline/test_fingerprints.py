"""Change detection: a step re-runs when its notebook, config sections, code or needs change."""

from __future__ import annotations

import shutil
from pathlib import Path

import nbformat
import pytest

from brainage_core._utils.validation import BrainAgeInputError
from brainage_core.pipeline.runner import (
    NOTEBOOK_DIR,
    PACKAGE_DIR,
    code_fingerprint,
    discover_steps,
    notebook_modules,
    run_pipeline,
)
from brainage_core.study.config import load_config


def _step(body: str, **declared) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('run_dir = "runs/quick"')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    if declared:
        nb.metadata["brainage"] = declared
    return nb


def _record(name: str) -> str:
    return (
        "from pathlib import Path\n"
        f"with open(Path(run_dir) / 'order.txt', 'a') as f:\n    f.write('{name}\\n')\n"
    )


@pytest.fixture
def package(tmp_path: Path) -> Path:
    """A copy of the package whose code the fingerprints read (edited by the tests)."""
    return Path(shutil.copytree(PACKAGE_DIR, tmp_path / "brainage_core",
                                ignore=shutil.ignore_patterns("__pycache__")))


@pytest.fixture
def notebooks(tmp_path: Path) -> Path:
    folder = tmp_path / "notebooks"
    folder.mkdir()
    steps = {
        # the data step: the template, nothing else of the package
        "01_data": _step("import brainage_core.data.template\n" + _record("01_data"),
                         config_sections=["data"], needs=[]),
        # a plotting step that needs the data step
        "02_plot": _step("from brainage_core.plotting import maps as plots\n"
                         + _record("02_plot"), config_sections=[], needs=["01_data"]),
        # a maps step that reads the maps section and needs the data step only
        "03_maps": _step("from brainage_core.study import rundir\n" + _record("03_maps"),
                         config_sections=["maps"], needs=["01_data"]),
    }
    for name, nb in steps.items():
        nbformat.write(nb, folder / f"{name}.ipynb")
    return folder


def _run(config, run_dir, notebooks, package):
    result = run_pipeline(config, run_dir, notebook_dir=notebooks, progress=False,
                          log=lambda _: None, package_dir=package)
    return result.ran


def test_editing_a_plot_reruns_only_the_steps_that_use_it(notebooks, package, tmp_path):
    config = load_config("quick")
    run_dir = tmp_path / "run"
    assert _run(config, run_dir, notebooks, package) == ["01_data", "02_plot", "03_maps"]
    assert _run(config, run_dir, notebooks, package) == []
    # a plotting function changes: only the plotting step re-runs
    maps_py = package / "plotting" / "maps.py"
    maps_py.write_text(maps_py.read_text() + "\n# a changed plot\n")
    assert _run(config, run_dir, notebooks, package) == ["02_plot"]
    # the template changes: the data step and every step that needs it re-run
    template_py = package / "data" / "template.py"
    template_py.write_text(template_py.read_text() + "\n# a changed template\n")
    assert _run(config, run_dir, notebooks, package) == ["01_data", "02_plot", "03_maps"]


def test_until_stops_after_a_step_and_the_next_run_goes_on(notebooks, package, tmp_path):
    # The cluster recipe: run up to a step, run the heavy steps under torchrun, then run
    # the rest; the steps already done are not run again.
    config = load_config("quick")
    run_dir = tmp_path / "run"
    first = run_pipeline(config, run_dir, notebook_dir=notebooks, progress=False,
                         log=lambda _: None, package_dir=package, until="01_data")
    assert first.ran == ["01_data"]
    assert (run_dir / "order.txt").read_text().split() == ["01_data"]
    assert _run(config, run_dir, notebooks, package) == ["02_plot", "03_maps"]
    with pytest.raises(BrainAgeInputError, match="'until' must be one of the steps "
                       r"\['01_data', '02_plot', '03_maps'\]; '02_train' was given"):
        run_pipeline(config, tmp_path / "other", notebook_dir=notebooks, progress=False,
                     log=lambda _: None, package_dir=package, until="02_train")
    assert not (tmp_path / "other").exists()  # nothing made for a bad argument


def test_the_study_notebooks_declare_their_sections_and_needs():
    steps = {step.name: step for step in discover_steps(NOTEBOOK_DIR)}
    assert list(steps) == ["01_data", "02_train", "03_explain", "04_average",
                           "05_visualise", "06_compare_methods"]
    config = load_config("quick")
    for step in steps.values():
        assert step.config_sections is not None and step.needs is not None, step.name
        assert set(step.config_sections) <= set(config), step.name
        earlier = list(steps)[: list(steps).index(step.name)]
        assert set(step.needs) <= set(earlier), step.name  # needs point back, never forward
    # the comparison does not wait for the visualisation: it needs the noise model only
    assert steps["06_compare_methods"].needs == ("03_explain",)


def test_code_fingerprint_follows_the_package_imports(package):
    plot_modules = notebook_modules(NOTEBOOK_DIR / "04_average.ipynb")
    assert "brainage_core.plotting.maps" in plot_modules
    data_modules = notebook_modules(NOTEBOOK_DIR / "01_data.ipynb")
    before = (code_fingerprint(plot_modules, package), code_fingerprint(data_modules, package))
    maps_py = package / "plotting" / "maps.py"
    maps_py.write_text(maps_py.read_text() + "\n# edited\n")
    after = (code_fingerprint(plot_modules, package), code_fingerprint(data_modules, package))
    assert after[0] != before[0]  # the averaging step draws with plotting.maps
    assert after[1] == before[1]  # the data step does not
    # a module reached only through the package's own imports counts too
    validation = package / "_utils" / "validation.py"
    validation.write_text(validation.read_text() + "\n# edited\n")
    assert code_fingerprint(data_modules, package) != before[1]
