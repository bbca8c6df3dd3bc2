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

A step's *fingerprint* hashes its source notebook, its own sections of the config, the
code it uses and the fingerprints of the steps it needs. A notebook declares the last two
in its metadata, for example::

    "brainage": {"config_sections": ["maps", "seed"], "needs": ["02_train"]}

(without a declaration: the whole config, and the step before it). The code is every
module of ``brainage_core`` that the notebook imports, followed through the package's own
imports. A re-run skips a step whose fingerprint matches a successful earlier execution
whose notebook is still there; so editing a plot re-runs the steps that draw it (and those
that need them), never the training upstream.

A failing cell stops the run with :class:`StepFailed`, which names the notebook and the
cell; the partially executed notebook is kept at its stable name for inspection.

One run folder is used by one pipeline at a time: a second ``run`` on the same folder
waits for the first (then finds its steps unchanged), or is refused with ``wait=False``;
the lock names the process holding it (see :mod:`brainage_core._utils.locks`). A step stopped
by Ctrl-C is recorded as ``interrupted`` (and re-runs next time).
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from brainage_core._utils.io import check_output_folder, write_json, write_text
from brainage_core._utils.locks import file_lock
from brainage_core._utils.validation import BrainAgeInputError
from brainage_core.study.config import config_hash, dump_config, run_name
from brainage_core.study.rundir import RunDir

#: The package whose modules the steps' code fingerprints cover.
PACKAGE_DIR = Path(__file__).resolve().parents[1]

#: Where the source notebooks live (a checkout's ``notebooks/`` folder).
NOTEBOOK_DIR = Path(__file__).resolve().parents[2] / "notebooks"

#: File in the run folder holding one record per executed step.
STATE_FILE = ".pipeline.json"

#: Lock file of a run folder: one pipeline at a time.
LOCK_FILE = ".run.lock"

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
    """One notebook of the pipeline.

    Attributes
    ----------
    name : str
        The notebook's stem, e.g. ``"02_train"``.
    source : pathlib.Path
        The source notebook.
    config_sections : tuple of str or None
        Top-level config keys the step reads (None: the whole config).
    needs : tuple of str or None
        Steps whose results it reads (None: the step before it).
    """

    name: str
    source: Path
    config_sections: tuple[str, ...] | None = None
    needs: tuple[str, ...] | None = None


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
    return [_read_step(p) for p in sources]


def _read_step(source: Path) -> Step:
    try:
        meta = json.loads(source.read_text(encoding="utf-8")).get("metadata", {})
    except json.JSONDecodeError as err:
        raise BrainAgeInputError(f"not a valid notebook ({err})", source) from err
    declared = meta.get("brainage", {})
    sections, needs = declared.get("config_sections"), declared.get("needs")
    return Step(
        source.stem,
        source,
        None if sections is None else tuple(sections),
        None if needs is None else tuple(needs),
    )


def code_fingerprint(
    modules: Iterable[str] | None = None, package_dir: str | os.PathLike = PACKAGE_DIR
) -> str:
    """Hash of the package code that ``modules`` import (all of it without ``modules``).

    Parameters
    ----------
    modules : iterable of str or None, default=None
        Dotted module names (``"brainage_core.plotting.maps"``); their files, the package
        modules they import (transitively, local imports included) and the ``__init__``
        files of their packages are hashed. None hashes every module (the CLI and
        benchmarks excluded).
    package_dir : str or os.PathLike, default=PACKAGE_DIR
        The ``brainage_core`` folder to read.
    """
    package = Path(package_dir)
    if modules is None:
        files = sorted(
            p for p in package.rglob("*.py")
            if p.relative_to(package).parts[0] not in ("cli", "bench")
        )
    else:
        files = sorted(_import_closure(set(modules), package))
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(package)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def notebook_modules(source: str | os.PathLike) -> set[str]:
    """The ``brainage_core`` modules a notebook's code cells import."""
    cells = json.loads(Path(source).read_text(encoding="utf-8")).get("cells", [])
    code = "\n".join(
        "".join(c.get("source", "")) for c in cells if c.get("cell_type") == "code"
    )
    # IPython magics and shell escapes are not Python
    code = "\n".join(ln for ln in code.splitlines() if not ln.lstrip().startswith(("%", "!")))
    return _imported_modules(code, package="")


def _imported_modules(code: str, package: str) -> set[str]:
    """Dotted names imported by ``code`` (relative imports resolved against ``package``)."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return set()
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            # ``from package import submodule`` imports the submodule too
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return {m for m in found if m == "brainage_core" or m.startswith("brainage_core.")}


def _module_file(module: str, package: Path) -> Path | None:
    parts = module.split(".")[1:]
    candidate = package.joinpath(*parts)
    if candidate.with_suffix(".py").is_file():
        return candidate.with_suffix(".py")
    if (candidate / "__init__.py").is_file():
        return candidate / "__init__.py"
    return None


def _import_closure(modules: set[str], package: Path) -> set[Path]:
    """Files of ``modules``, of the package modules they import, and of their packages."""
    files: set[Path] = set()
    todo = list(modules)
    seen: set[str] = set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        parts = module.split(".")
        todo.extend(".".join(parts[:k]) for k in range(1, len(parts)))  # parent packages
        path = _module_file(module, package)
        if path is None:
            continue  # a name imported from a module, not a module
        files.add(path)
        own = module if path.name == "__init__.py" else ".".join(parts[:-1])
        todo.extend(_imported_modules(path.read_text(encoding="utf-8"), own) - seen)
    return files


def step_fingerprint(step: Step, config: Mapping[str, Any], upstream: str, code: str) -> str:
    """Fingerprint of one step: its notebook, its config sections, its code, its needs."""
    if step.config_sections is not None:
        config = {k: config.get(k) for k in step.config_sections}
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
            # log_level=CRITICAL: the kernel's own log (not the cells' output, which
            # papermill records) stays quiet, e.g. ipykernel's notice that a local kernel
            # talks over TCP, or the errors of a kernel shut down in the middle of a cell
            # by Ctrl-C (which is then reported in one line).
            # brainage_core.pipeline.kernel: ipykernel_launcher, tied to the run (dies with it).
            "argv": [sys.executable, "-m", "brainage_core.pipeline.kernel", "-f",
                     "{connection_file}", "--IPKernelApp.log_level=CRITICAL"],
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
    if run_dir is None:
        check_output_folder(runs_root, "runs root")
    run = RunDir(Path(run_dir) if run_dir is not None else Path(runs_root) / run_name(config))
    check_output_folder(run.root, "run folder")
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
    package_dir: str | os.PathLike = PACKAGE_DIR,
    wait: bool | None = None,
    until: str | None = None,
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
        Identifies the package code in the fingerprints; ``None`` hashes, for each step,
        the modules its notebook uses (:func:`code_fingerprint`), so that editing the code
        re-runs the steps that use it.
    package_dir : str or os.PathLike, default=PACKAGE_DIR
        The ``brainage_core`` folder whose code is hashed.
    wait : bool or None, default=None
        When another pipeline uses the run folder: wait for it (True) or raise
        :class:`~brainage_core._utils.locks.LockBusy` naming it (False). None waits unless
        the environment variable ``BRAINAGE_LOCK_WAIT`` is ``"0"`` (``--no-wait``).
    until : str or None, default=None
        Stop after this step (its name, e.g. ``"02_train"``); None runs every step. On a
        cluster the heavy steps run between such partial runs, under ``torchrun``
        (:mod:`brainage_core.study.launch`), and the next run only loads their results.

    Returns
    -------
    PipelineResult
        The run folder and, per step, whether it ran or was skipped.

    Raises
    ------
    StepFailed
        When a notebook raises; names the notebook and the cell, keeps the partial notebook.
    BrainAgeInputError
        For a run folder of another configuration, one that is a file or not writable,
        or a missing notebook folder.
    KeyboardInterrupt
        On Ctrl-C; the step is recorded as ``interrupted``.
    """
    steps = discover_steps(notebook_dir)
    if until is not None:
        names = [step.name for step in steps]
        if until not in names:
            raise BrainAgeInputError(f"'until' must be one of the steps {names}; "
                                     f"{until!r} was given.")
        steps = steps[: names.index(until) + 1]
    target = Path(run_dir) if run_dir is not None else Path(runs_root) / run_name(config)
    check_output_folder(target, "run folder")
    target.mkdir(parents=True, exist_ok=True)
    with file_lock(target / LOCK_FILE, wait=wait, what="this run folder"):
        return _run_steps(
            config, steps, prepare_run_dir(config, target),
            force=force, cwd=cwd, progress=progress, log=log, code_version=code_version,
            package_dir=package_dir,
        )


def _run_steps(
    config: Mapping[str, Any],
    steps: list[Step],
    run: RunDir,
    *,
    force: bool,
    cwd: str | os.PathLike | None,
    progress: bool,
    log: Callable[[str], None],
    code_version: str | None,
    package_dir: str | os.PathLike,
) -> PipelineResult:
    """Execute ``steps`` into ``run`` (the caller holds the run folder's lock)."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    root = run.root.resolve()
    state = load_state(run)
    result = PipelineResult(run_dir=root)
    fingerprints: dict[str, str] = {}
    log(f"run folder: {root}  ({len(steps)} steps)")
    with python_kernel() as kernel:
        for number, step in enumerate(steps, start=1):
            code = (
                code_fingerprint(notebook_modules(step.source), package_dir)
                if code_version is None
                else code_version
            )
            previous = [steps[number - 2].name] if number > 1 else []
            needs = previous if step.needs is None else step.needs
            upstream = "".join(fingerprints.get(name, f"<{name}: not run>") for name in needs)
            fingerprint = step_fingerprint(step, config, upstream, code)
            fingerprints[step.name] = fingerprint
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
            except BaseException:  # Ctrl-C, SystemExit: not "running" forever
                seconds = time.perf_counter() - start
                state["steps"][step.name].update(status="interrupted",
                                                 seconds=round(seconds, 1), finished=_now())
                _save_state(run, state)
                raise
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
    from brainage_core.study.derivatives import write_derivatives

    log(f"BIDS-Derivatives view: {write_derivatives(root)}")
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
    "NOTEBOOK_DIR",
    "PipelineResult",
    "Step",
    "StepFailed",
    "StepResult",
    "code_fingerprint",
    "discover_steps",
    "failed_steps",
    "load_state",
    "LOCK_FILE",
    "prepare_run_dir",
    "python_kernel",
    "read_run_config",
    "run_pipeline",
    "step_fingerprint",
]
