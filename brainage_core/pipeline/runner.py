"""Run the study notebooks in order with papermill, skipping the steps that have not changed.

A study run executes the notebooks ``notebooks/NN_step.ipynb`` (01_data, 02_train,
03_explain, 04_average, 05_visualise, 06_compare_methods: those present, in that order)
into the run folder under the same stable names::

    runs/<name>/config.yaml             written first; every notebook reads it
    runs/<name>/notebooks/NN_step.ipynb the executed notebooks
    runs/<name>/.pipeline.json          one record per step: fingerprint, status, time

Each notebook receives one parameter, ``run_dir`` (absolute). The kernel runs in the
directory the command was started from, so relative paths in the config (such as
``data.cache_dir``) resolve there.

A step's *fingerprint* hashes its source notebook, the resolved config, the package code
and the fingerprint of the step before it (which covers all earlier steps). A re-run skips
a step whose fingerprint matches a successful earlier execution whose notebook is still
there; a changed step re-runs, and so does everything after it.

A failing cell stops the run with :class:`StepFailed`, which names the notebook and the
cell; the partially executed notebook is kept at its stable name for inspection.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from brainage_core._utils.io import write_json, write_text
from brainage_core._utils.validation import BrainAgeInputError
from brainage_core.study.config import config_hash, dump_config, run_name
from brainage_core.study.rundir import RunDir

#: The study's steps in execution order (notebooks/<step>.ipynb).
STUDY_STEPS = (
    "01_data",
    "02_train",
    "03_explain",
    "04_average",
    "05_visualise",
    "06_compare_methods",
)

#: Where the source notebooks live (a checkout's ``notebooks/`` folder).
NOTEBOOK_DIR = Path(__file__).resolve().parents[2] / "notebooks"

#: File in the run folder holding one record per executed step.
STATE_FILE = ".pipeline.json"

#: Kernel the notebooks declare and run with (mapped to this interpreter, see
#: :func:`python_kernel`).
KERNEL_NAME = "python3"

_STEP_PATTERN = re.compile(r"^\d\d_[A-Za-z0-9_]+\.ipynb$")


class StepFailed(RuntimeError):
    """A notebook of the pipeline failed.

    Attributes
    ----------
    step : str
        The step (notebook stem), e.g. ``"02_train"``.
    notebook : pathlib.Path
        The partially executed notebook, kept for inspection.
    cell : int or None
        Execution count of the failing cell (``In [cell]``), if known.
    """

    def __init__(self, step: str, notebook: Path, cell: int | None, detail: str) -> None:
        self.step = step
        self.notebook = notebook
        self.cell = cell
        where = f"cell In [{cell}]" if cell is not None else "a cell"
        super().__init__(
            f"step {step} failed in {where} of notebooks/{step}.ipynb: {detail}\n"
            f"The partially executed notebook is kept at {notebook}"
        )


@dataclass(frozen=True)
class Step:
    """One notebook of the pipeline."""

    name: str
    source: Path


@dataclass
class StepResult:
    """What happened to one step in a pipeline run."""

    name: str
    status: str  # "ran" | "skipped" | "failed"
    seconds: float
    notebook: Path


@dataclass
class PipelineResult:
    """The outcome of :func:`run_pipeline`."""

    run_dir: Path
    steps: list[StepResult] = field(default_factory=list)

    @property
    def ran(self) -> list[str]:
        return [s.name for s in self.steps if s.status == "ran"]

    @property
    def skipped(self) -> list[str]:
        return [s.name for s in self.steps if s.status == "skipped"]


# -- steps and fingerprints ---------------------------------------------------------------
def discover_steps(notebook_dir: str | os.PathLike = NOTEBOOK_DIR) -> list[Step]:
    """Return the notebooks ``NN_name.ipynb`` of ``notebook_dir``, in order of their number."""
    notebook_dir = Path(notebook_dir)
    if not notebook_dir.is_dir():
        raise BrainAgeInputError("notebook folder does not exist", notebook_dir)
    sources = sorted(p for p in notebook_dir.iterdir() if _STEP_PATTERN.match(p.name))
    if not sources:
        raise BrainAgeInputError("holds no study notebooks named NN_step.ipynb", notebook_dir)
    return [Step(p.stem, p) for p in sources]


def code_fingerprint() -> str:
    """Hash of the package's computational code (the CLI and benchmarks excluded).

    A change to a model, a loss or a plot invalidates the steps that used it.
    """
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*")):
        rel = path.relative_to(package)
        if rel.parts[0] in ("cli", "bench", "__pycache__") or path.suffix not in (".py", ".yaml"):
            continue
        digest.update(str(rel).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def step_fingerprint(step: Step, config: Mapping[str, Any], upstream: str, code: str) -> str:
    """Fingerprint of one step: its notebook, the config, the code and the step before."""
    digest = hashlib.sha256()
    digest.update(step.source.read_bytes())
    digest.update(config_hash(config, length=64).encode())
    digest.update(code.encode())
    digest.update(upstream.encode())
    return digest.hexdigest()[:16]


# -- the kernel ---------------------------------------------------------------------------
@contextlib.contextmanager
def python_kernel(name: str = KERNEL_NAME) -> Iterator[str]:
    """Make the kernel ``name`` run *this* interpreter (``sys.executable``) while inside.

    A kernelspec pointing at ``sys.executable`` is written to a temporary folder that is
    put first on ``JUPYTER_PATH``, so a ``python3`` kernel registered elsewhere (another
    environment, the user's ``~/.local``) cannot shadow the study's environment. The
    kernel draws matplotlib figures inline even if ``MPLBACKEND`` is set (e.g. to Agg).
    """
    with tempfile.TemporaryDirectory(prefix="brainage-kernel-") as tmp:
        spec_dir = Path(tmp) / "kernels" / name
        spec_dir.mkdir(parents=True)
        spec = {
            # log_level=ERROR: the kernel's own log (not the cells' output) stays quiet,
            # e.g. ipykernel's notice that a local kernel talks over TCP.
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}",
                     "--IPKernelApp.log_level=ERROR"],
            "display_name": f"Python 3 ({Path(sys.prefix).name})",
            "language": "python",
            # Figures go into the notebook whatever MPLBACKEND the caller has (a test
            # runner's "Agg" would silently drop every plt.show()).
            "env": {"MPLBACKEND": "module://matplotlib_inline.backend_inline"},
            "metadata": {"debugger": True},
        }
        (spec_dir / "kernel.json").write_text(json.dumps(spec, indent=1), encoding="utf-8")
        old = os.environ.get("JUPYTER_PATH")
        os.environ["JUPYTER_PATH"] = os.pathsep.join(filter(None, [tmp, old]))
        try:
            yield name
        finally:
            if old is None:
                os.environ.pop("JUPYTER_PATH", None)
            else:
                os.environ["JUPYTER_PATH"] = old


# -- run folders --------------------------------------------------------------------------
def prepare_run_dir(
    config: Mapping[str, Any],
    run_dir: str | os.PathLike | None = None,
    *,
    runs_root: str | os.PathLike = "runs",
) -> RunDir:
    """Return the run folder of ``config`` and write its ``config.yaml``.

    Parameters
    ----------
    config : mapping
        The resolved configuration.
    run_dir : str or os.PathLike or None, default=None
        An explicit run folder. ``None`` derives ``runs_root/<name>-<hash>`` from the
        config, so a run with other parameters gets another folder.
    runs_root : str or os.PathLike, default="runs"
        Parent of derived run folders.

    Raises
    ------
    BrainAgeInputError
        If the folder already holds a run of a *different* configuration: the existing
        run is never overwritten.
    """
    run = RunDir(Path(run_dir) if run_dir is not None else Path(runs_root) / run_name(config))
    if run.config_path.exists():
        existing = run.load_config()
        if existing != dict(config):
            changed = _diff_keys(existing, config)
            raise BrainAgeInputError(
                "this run folder holds a run of another configuration (differs in "
                f"{', '.join(changed) or 'its contents'}); it is not overwritten. Choose "
                "another --run-dir, leave --run-dir out to get a folder named after the "
                "parameters, or delete the folder.",
                run.root,
            )
    else:
        run.root.mkdir(parents=True, exist_ok=True)
        write_text(run.config_path, dump_config(config))
    return run


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        keys = sorted(set(a) | set(b))
        out: list[str] = []
        for key in keys:
            out += _diff_keys(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def load_state(run: RunDir) -> dict[str, Any]:
    """Return the step records of ``run`` (empty if it has none or they are unreadable)."""
    path = run.root / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {"steps": {}}
    state.setdefault("steps", {})
    return state


# -- execution ----------------------------------------------------------------------------
def run_pipeline(
    config: Mapping[str, Any],
    run_dir: str | os.PathLike | None = None,
    *,
    notebook_dir: str | os.PathLike = NOTEBOOK_DIR,
    runs_root: str | os.PathLike = "runs",
    force: bool = False,
    cwd: str | os.PathLike | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    code_version: str | None = None,
) -> PipelineResult:
    """Execute the study notebooks for ``config`` into a run folder.

    Parameters
    ----------
    config : mapping
        The resolved configuration (see :func:`brainage_core.study.config.load_config`).
    run_dir : str or os.PathLike or None, default=None
        The run folder; ``None`` derives it from the config (see :func:`prepare_run_dir`).
    notebook_dir : str or os.PathLike, default=NOTEBOOK_DIR
        Folder of the source notebooks ``NN_step.ipynb``.
    runs_root : str or os.PathLike, default="runs"
        Parent of derived run folders.
    force : bool, default=False
        Re-execute every step, changed or not.
    cwd : str or os.PathLike or None, default=None
        Working directory of the kernel; ``None`` is the current directory.
    progress : bool, default=True
        Show papermill's per-cell progress bar.
    log : callable, default=print
        Receives one line per step.
    code_version : str or None, default=None
        Identifies the package code in the fingerprints; ``None`` hashes the package
        (:func:`code_fingerprint`), so that editing the code re-runs the steps.

    Returns
    -------
    PipelineResult
        The run folder and, per step, whether it ran or was skipped.

    Raises
    ------
    StepFailed
        When a notebook raises; names the notebook and the cell, keeps the partial notebook.
    BrainAgeInputError
        For a run folder of another configuration or a missing notebook folder.
    """
    import papermill
    from papermill.exceptions import PapermillExecutionError

    steps = discover_steps(notebook_dir)
    run = prepare_run_dir(config, run_dir, runs_root=runs_root)
    root = run.root.resolve()
    state = load_state(run)
    code = code_fingerprint() if code_version is None else code_version
    result = PipelineResult(run_dir=root)
    upstream = ""
    log(f"run folder: {root}  ({len(steps)} steps)")
    with python_kernel() as kernel:
        for number, step in enumerate(steps, start=1):
            fingerprint = step_fingerprint(step, config, upstream, code)
            upstream = fingerprint
            output = run.notebooks / f"{step.name}.ipynb"
            record = state["steps"].get(step.name, {})
            label = f"[{number}/{len(steps)}] {step.name}"
            if (
                not force
                and record.get("status") == "ok"
                and record.get("fingerprint") == fingerprint
                and output.is_file()
            ):
                log(f"{label}: unchanged, skipped")
                result.steps.append(StepResult(step.name, "skipped", 0.0, output))
                continue
            log(f"{label}: running ...")
            start = time.perf_counter()
            state["steps"][step.name] = {"fingerprint": fingerprint, "status": "running",
                                         "started": _now()}
            _save_state(run, state)
            try:
                papermill.execute_notebook(
                    str(step.source),
                    str(output),
                    parameters={"run_dir": str(root)},
                    kernel_name=kernel,
                    language="python",
                    cwd=str(cwd if cwd is not None else Path.cwd()),
                    progress_bar=progress,
                    log_output=False,
                    request_save_on_cell_execute=True,
                )
            except PapermillExecutionError as err:
                seconds = time.perf_counter() - start
                state["steps"][step.name].update(status="failed", seconds=round(seconds, 1),
                                                 error=f"{err.ename}: {err.evalue}")
                _save_state(run, state)
                result.steps.append(StepResult(step.name, "failed", seconds, output))
                first_line = next((ln for ln in err.source.splitlines() if ln.strip()), "")
                raise StepFailed(
                    step.name, output, err.exec_count,
                    f"{err.ename}: {err.evalue} (cell starts with: {first_line.strip()!r})",
                ) from err
            except Exception as err:
                seconds = time.perf_counter() - start
                state["steps"][step.name].update(status="failed", seconds=round(seconds, 1),
                                                 error=f"{type(err).__name__}: {err}")
                _save_state(run, state)
                raise StepFailed(step.name, output, None, f"{type(err).__name__}: {err}") from err
            seconds = time.perf_counter() - start
            state["steps"][step.name].update(status="ok", seconds=round(seconds, 1),
                                             finished=_now())
            _save_state(run, state)
            log(f"{label}: done in {seconds:.1f} s")
            result.steps.append(StepResult(step.name, "ran", seconds, output))
    # Forget steps whose notebook no longer exists, so the record matches the run.
    names = {s.name for s in steps}
    state["steps"] = {k: v for k, v in state["steps"].items() if k in names}
    _save_state(run, state)
    return result


def _save_state(run: RunDir, state: dict[str, Any]) -> None:
    write_json(run.root / STATE_FILE, state)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_run_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Return the ``config.yaml`` of a run folder (a clear error if there is none)."""
    return RunDir(run_dir).load_config()


def failed_steps(run_dir: str | os.PathLike) -> list[str]:
    """Return the steps of a run whose last execution did not succeed."""
    state = load_state(RunDir(run_dir))
    return [name for name, rec in state["steps"].items() if rec.get("status") != "ok"]


__all__ = [
    "STUDY_STEPS",
    "NOTEBOOK_DIR",
    "PipelineResult",
    "Step",
    "StepFailed",
    "StepResult",
    "code_fingerprint",
    "discover_steps",
    "failed_steps",
    "load_state",
    "prepare_run_dir",
    "python_kernel",
    "read_run_config",
    "run_pipeline",
    "step_fingerprint",
]
