"""Assemble the Jupyter Book from a study run and build it.

The book's sources (``_config.yml``, ``_toc.yml``, ``references.bib``, ``book/``) are
staged into a build folder together with the run's executed notebooks, which become
``notebooks/NN_step.ipynb`` there (the path of their sources in the repository, which the
launch buttons open). The run is published as papermill executed it: those notebooks are
excluded from execution (``execute.exclude_patterns`` in ``_config.yml``); only the cheap
pages of ``book/`` are executed at build time. Staging also writes

- ``book/results/index.md``: the run's name, its headline metrics and its steps;
- ``book/results/downloads.md``: download links for the maps, tables, metrics and config;
- ``book/results/run_status.md``: included by the status page (config, step timings);
- a placeholder page for a study step the run does not have (``notebooks/NN_step.md``).

The build runs ``jupyter-book build`` with warnings as errors, so a notebook error, a
broken cross-reference or a missing citation fails it. A run with a failed step is refused
before anything is built.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from brainage_core._utils.io import write_text
from brainage_core._utils.validation import BrainAgeInputError
from brainage_core.pipeline.runner import failed_steps, load_state, python_kernel
from brainage_core.study.config import dump_config
from brainage_core.study.rundir import RunDir

#: Root of the checkout that holds ``_config.yml``, ``_toc.yml`` and ``book/``.
BOOK_ROOT = Path(__file__).resolve().parents[2]

#: Files and folders of the book's sources, relative to :data:`BOOK_ROOT`.
BOOK_SOURCES = ("_config.yml", "_toc.yml", "references.bib", "book")

#: Staged folder of the run's executed notebooks. It mirrors the repository's
#: ``notebooks/``, so the Binder and Colab buttons of a results page open the source
#: notebook of that step.
NOTEBOOKS = Path("notebooks")

#: Staged folder of the generated pages (results overview, downloads, run status).
RESULTS = Path("book") / "results"

#: Staged folder of vendored static files (Sphinx copies it into ``html/_static``). Not
#: ``_static``: Jupyter Book would load every ``.js`` file found there on every page.
VENDOR = "_vendor"

#: Parts of MathJax 3's ``es5`` build that the book needs: the TeX-to-CHTML component,
#: its fonts, the TeX extensions it loads on demand, the menu and accessibility code.
MATHJAX_PARTS = ("tex-chtml.js", "output/chtml/fonts/woff-v2", "input/tex/extensions",
                 "ui", "a11y")

#: Where ``npm pack`` keeps NiiVue's tarball between book builds (override with the
#: environment variable ``BRAINAGE_NPM_CACHE``).
NPM_CACHE = BOOK_ROOT / ".cache" / "npm"

#: Seconds ``npm pack`` may take (a 6.8 MB download, once).
NPM_TIMEOUT = 300.0

#: Where MathJax comes from when it cannot be vendored.
MATHJAX_CDN = "https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-chtml.js"


class BookBuildError(RuntimeError):
    """``jupyter-book build`` failed; the message holds the end of its log."""


# -- checks -------------------------------------------------------------------------------
def check_run(run_dir: str | os.PathLike) -> list[Path]:
    """Return the executed notebooks of a run, refusing a run that failed.

    Raises
    ------
    BrainAgeInputError
        If the folder is not a run, holds no executed notebook, a step failed or did not
        finish, or a notebook holds an error output; the message names the notebook.
    """
    run = RunDir(run_dir)
    run.load_config()  # a clear error if this is not a run folder
    notebooks = sorted((run.root / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    if not notebooks:
        raise BrainAgeInputError(
            "holds no executed notebooks; run the study first with 'brainage-study run'",
            run.root / "notebooks",
        )
    failed = failed_steps(run.root)
    if failed:
        raise BrainAgeInputError(
            f"step(s) {failed} of this run failed or did not finish; the book is built only "
            "from a complete run. Fix the notebook and re-run 'brainage-study run'.",
            run.root,
        )
    for path in notebooks:
        nb = json.loads(path.read_text(encoding="utf-8"))
        if nb.get("metadata", {}).get("papermill", {}).get("exception"):
            raise BrainAgeInputError("this executed notebook raised an exception", path)
        for index, cell in enumerate(nb.get("cells", [])):
            for output in cell.get("outputs", []):
                if output.get("output_type") == "error":
                    raise BrainAgeInputError(
                        f"cell {index} holds an error output "
                        f"({output.get('ename')}: {output.get('evalue')})",
                        path,
                    )
    return notebooks


# -- staging ------------------------------------------------------------------------------
def stage_book(
    run_dir: str | os.PathLike,
    src_dir: str | os.PathLike,
    *,
    book_root: str | os.PathLike = BOOK_ROOT,
) -> Path:
    """Copy the book's sources and the run's notebooks and artefacts into ``src_dir``.

    Parameters
    ----------
    run_dir : str or os.PathLike
        A finished run (see :func:`check_run`).
    src_dir : str or os.PathLike
        Staging folder; it is emptied first.
    book_root : str or os.PathLike, default=BOOK_ROOT
        Folder holding ``_config.yml``, ``_toc.yml``, ``references.bib`` and ``book/``.

    Returns
    -------
    pathlib.Path
        ``src_dir``, ready for ``jupyter-book build``.
    """
    notebooks = check_run(run_dir)
    run = RunDir(run_dir)
    book_root, src = Path(book_root), Path(src_dir)
    for name in BOOK_SOURCES:
        if not (book_root / name).exists():
            raise BrainAgeInputError(f"the book's source {name!r} is missing", book_root)
    if src.exists():
        shutil.rmtree(src)
    src.mkdir(parents=True)
    for name in BOOK_SOURCES:
        source = book_root / name
        if source.is_dir():
            shutil.copytree(source, src / name, ignore=shutil.ignore_patterns(
                "results", "_build", ".ipynb_checkpoints", "__pycache__"))
        else:
            shutil.copy2(source, src / name)
    results = src / RESULTS
    results.mkdir(parents=True)
    (src / NOTEBOOKS).mkdir(parents=True)
    present = {p.stem for p in notebooks}
    for path in notebooks:
        _publish_notebook(path, src / NOTEBOOKS / path.name)
    config = run.load_config()
    generated = {"index", "downloads"}
    for page in _toc_files(src / "_toc.yml"):
        if any((src / page).with_suffix(ext).exists() for ext in (".md", ".ipynb")):
            continue
        rel = Path(page)
        if rel.parent == NOTEBOOKS:
            if rel.name not in present:
                write_text(src / f"{page}.md", _placeholder(rel.name, run.root.name))
        elif rel.parent == RESULTS and rel.name in generated:
            continue  # written below
        else:
            print(f"warning: the book page {page} is missing; a placeholder stands in",
                  file=sys.stderr)
            write_text(src / f"{page}.md", f"# {rel.name.replace('_', ' ').capitalize()}\n\n"
                       "```{note}\nThis chapter is not written yet.\n```\n")
    math = vendor_mathjax(src)
    viewer = vendor_niivue(src)
    write_text(results / "index.md", _results_index(run, config, notebooks))
    write_text(results / "downloads.md", _downloads(run, results / "files"))
    write_text(results / "run_status.md", _run_status(run, config, math, viewer))
    return src


def mathjax_source() -> Path | None:
    """MathJax 3's ``es5`` folder from the ``django-static-mathjax`` wheel, if installed.

    That PyPI package (Apache-2.0, no dependencies) ships MathJax 3.2 as static files; it
    is how the book typesets mathematics without a network connection.
    """
    import importlib.util

    spec = importlib.util.find_spec("mathjax")
    if spec is None or not spec.submodule_search_locations:
        return None
    es5 = Path(list(spec.submodule_search_locations)[0]) / "static" / "mathjax" / "es5"
    return es5 if (es5 / "tex-chtml.js").is_file() else None


def vendor_mathjax(src: Path) -> str:
    """Serve MathJax from the book itself when possible; return how math is typeset.

    Copies :data:`MATHJAX_PARTS` into ``src/_vendor/mathjax`` and points the staged
    ``_config.yml`` at it. Without the wheel, the book keeps MathJax's CDN.
    """
    es5 = mathjax_source()
    if es5 is None:
        return (f"MathJax 3 from its CDN ({MATHJAX_CDN}); offline, formulas show as LaTeX "
                "source. Install django-static-mathjax to serve it from the book.")
    target = src / VENDOR / "mathjax"
    for part in MATHJAX_PARTS:
        source = es5 / part
        if source.is_dir():
            shutil.copytree(source, target / part)
        else:
            (target / part).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / part)
    _serve_vendor_folder(src, mathjax_path="mathjax/tex-chtml.js")
    import importlib.metadata as metadata

    version = metadata.version("django-static-mathjax")
    return (f"MathJax {version.rsplit('.', 1)[0]} served from this book (`_static/mathjax`, "
            f"vendored from the django-static-mathjax {version} wheel): works offline.")


def _serve_vendor_folder(src: Path, **sphinx: Any) -> None:
    """Make Sphinx copy ``src/_vendor`` into ``_static`` (and set other Sphinx options)."""
    config_path = src / "_config.yml"
    book_config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    sphinx_config = book_config.setdefault("sphinx", {}).setdefault("config", {})
    sphinx_config.update(sphinx)
    sphinx_config["html_static_path"] = [VENDOR]
    write_text(config_path, yaml.safe_dump(book_config, sort_keys=False))


def niivue_tarball(cache_dir: str | os.PathLike | None = None) -> tuple[Path | None, str]:
    """The pinned NiiVue npm tarball, fetched once with ``npm pack`` and verified.

    The tarball is kept in ``cache_dir`` (:data:`NPM_CACHE`, or ``$BRAINAGE_NPM_CACHE``)
    and checked against the pinned SHA-512 integrity of the npm registry before use.

    Returns
    -------
    tuple of (pathlib.Path or None, str)
        The tarball, or None with the reason it is not available.
    """
    import base64
    import hashlib

    from brainage_core.plotting.niivue import NIIVUE_INTEGRITY, NIIVUE_PACKAGE, NIIVUE_VERSION

    cache = Path(cache_dir or os.environ.get("BRAINAGE_NPM_CACHE") or NPM_CACHE)
    tarball = cache / f"niivue-niivue-{NIIVUE_VERSION}.tgz"

    def verified() -> bool:
        digest = base64.b64encode(hashlib.sha512(tarball.read_bytes()).digest()).decode()
        return f"sha512-{digest}" == NIIVUE_INTEGRITY

    if tarball.is_file() and verified():
        return tarball, ""
    npm = shutil.which("npm")
    if npm is None:
        return None, "npm is not installed (apt-get install -y npm)"
    cache.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run(
            [npm, "pack", f"{NIIVUE_PACKAGE}@{NIIVUE_VERSION}", "--pack-destination",
             str(cache), "--silent"],
            capture_output=True, text=True, timeout=NPM_TIMEOUT, check=False,
        )
    except subprocess.TimeoutExpired:
        return None, f"npm pack did not finish within {NPM_TIMEOUT:.0f} s"
    if proc.returncode != 0 or not tarball.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
        return None, f"npm pack failed (exit {proc.returncode}): {tail[0]}"
    if not verified():
        tarball.unlink()
        return None, "the downloaded tarball does not match the pinned integrity"
    return tarball, ""


def vendor_niivue(src: Path, cache_dir: str | os.PathLike | None = None) -> str:
    """Serve NiiVue's UMD bundle from the book (``_static/niivue``); return how.

    The pinned ``@niivue/niivue`` npm tarball (:func:`niivue_tarball`) provides
    ``dist/niivue.umd.js`` (self-contained, about 2.3 MB) and its licence (BSD-2-Clause,
    written to ``_static/niivue/LICENSE.txt``). Without npm or a network on the first
    build, the book is built without it and its pages show the plotly viewers only.
    """
    import tarfile

    from brainage_core.plotting.niivue import (
        NIIVUE_BUNDLE,
        NIIVUE_LICENSE,
        NIIVUE_PACKAGE,
        NIIVUE_TARBALL_FILE,
        NIIVUE_VERSION,
    )

    tarball, why = niivue_tarball(cache_dir)
    if tarball is None:
        return (f"NiiVue not vendored ({why}): the pages show the plotly slice viewers "
                "only.")
    target = src / VENDOR / NIIVUE_BUNDLE
    target.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tarball, "r:gz") as archive:
        package = json.load(archive.extractfile("package/package.json"))
        target.write_bytes(archive.extractfile(NIIVUE_TARBALL_FILE).read())
    licence = package.get("license", NIIVUE_LICENSE)
    write_text(target.parent / "LICENSE.txt", (
        f"{NIIVUE_PACKAGE} {package.get('version', NIIVUE_VERSION)} (npm), licence {licence}.\n"
        f"Source: {package.get('homepage') or 'https://github.com/niivue/niivue'}\n"
        "File: dist/niivue.umd.js of the npm tarball, unmodified.\n"))
    _serve_vendor_folder(src)
    return (f"NiiVue {NIIVUE_VERSION} ({licence}) served from this book "
            f"(`_static/{NIIVUE_BUNDLE}`, from the npm package `{NIIVUE_PACKAGE}`): works "
            "offline.")


def _publish_notebook(source: Path, target: Path) -> None:
    """Copy an executed notebook into the book, hiding papermill's injected parameters.

    The injected cell holds the machine's absolute run path, which means nothing to a
    reader; the notebook's own ``parameters`` cell stays visible. Outputs are untouched.
    """
    nb = json.loads(source.read_text(encoding="utf-8"))
    for cell in nb.get("cells", []):
        tags = cell.setdefault("metadata", {}).setdefault("tags", [])
        if "injected-parameters" in tags and "remove-cell" not in tags:
            tags.append("remove-cell")
    target.write_text(json.dumps(nb, ensure_ascii=False), encoding="utf-8")


def _toc_files(toc_path: Path) -> list[str]:
    """The pages (``root`` and every ``file``) listed in the table of contents."""

    def walk(node: Any) -> list[str]:
        found: list[str] = []
        if isinstance(node, Mapping):
            for key in ("root", "file"):
                if isinstance(node.get(key), str):
                    found.append(node[key].removesuffix(".md").removesuffix(".ipynb"))
            for value in node.values():
                found += walk(value)
        elif isinstance(node, list):
            for item in node:
                found += walk(item)
        return found

    return walk(yaml.safe_load(toc_path.read_text(encoding="utf-8")))


def _placeholder(step: str, run_name: str) -> str:
    title = step.split("_", 1)[1].replace("_", " ").capitalize()
    return (
        f"# {title}\n\n"
        f"```{{note}}\nThe run `{run_name}` has no `{step}` step: the notebook "
        f"`notebooks/{step}.ipynb` did not exist when the run was made.\n```\n"
    )


def _md_table(rows: list[Mapping[str, Any]]) -> str:
    if not rows:
        return "*(none)*\n"
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value[:10]) + (" …" if len(value) > 10 else "")
    if isinstance(value, Mapping):
        return "; ".join(f"{k}: {_fmt(v)}" for k, v in value.items())
    return str(value).replace("|", "\\|")


def _step_rows(run: RunDir) -> list[dict[str, Any]]:
    steps = load_state(run)["steps"]
    return [
        {"step": name, "status": rec.get("status", "?"),
         "seconds": rec.get("seconds", ""), "finished": rec.get("finished", "")}
        for name, rec in steps.items()
    ]


def _results_index(run: RunDir, config: Mapping[str, Any], notebooks: list[Path]) -> str:
    metrics = run.read_metrics()
    parts = [
        "# Results of this run\n",
        f"The pages of this part are the notebooks of the run **`{run.root.name}`** (preset "
        f"`{config.get('name')}`), executed by papermill when the run was made and published "
        "unchanged. Their figures, tables and maps come from that run; "
        "{doc}`downloads` offers its files.\n",
        "## Headline figures\n",
    ]
    if not metrics:
        parts.append("The run wrote no `metrics.json`.\n")
    for section, values in metrics.items():
        if not isinstance(values, Mapping):
            continue
        nested = {k: v for k, v in values.items() if isinstance(v, Mapping)}
        flat = [{"metric": k, "value": v} for k, v in values.items() if k not in nested]
        parts.append(f"### {section}\n")
        if flat:
            parts.append(_md_table(flat))
        if nested:  # e.g. one row per attribution method, one column per score
            columns: list[str] = []
            for row in nested.values():
                columns += [c for c in row if c not in columns]
            parts.append(_md_table([{"": name, **{c: row.get(c, "") for c in columns}}
                                    for name, row in nested.items()]))
    parts += ["## Steps\n", _md_table(_step_rows(run))]
    return "\n".join(parts)


def _downloads(run: RunDir, files: Path) -> str:
    """Copy the run's artefacts under ``files`` and return the downloads page."""
    files.mkdir(parents=True, exist_ok=True)
    items: list[tuple[str, str, str]] = []  # (group, link target, description)

    def add(group: str, source: Path, description: str) -> None:
        target = files / source.relative_to(run.root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
        items.append((group, target.relative_to(files.parent).as_posix(), description))

    for name, description in (("config.yaml", "the resolved configuration"),
                              ("metrics.json", "all metrics of the run")):
        if (run.root / name).is_file():
            add("Run", run.root / name, description)
    maps = sorted((run.root / "maps").glob("*.nii*")) if (run.root / "maps").is_dir() else []
    subject_maps = [p for p in maps if p.name.startswith("sub-")]
    for path in maps:
        if path not in subject_maps:
            add("Maps (NIfTI, MNI space)", path, "population map" if "population" in path.name
                else "map")
    if subject_maps:
        archive = files / "maps" / "subject_maps.zip"
        archive.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as zf:
            for path in subject_maps:
                zf.write(path, arcname=path.name)
        items.append(("Maps (NIfTI, MNI space)",
                      archive.relative_to(files.parent).as_posix(),
                      f"{len(subject_maps)} per-subject importance maps (zip)"))
    tables = sorted((run.root / "tables").glob("*")) if (run.root / "tables").is_dir() else []
    for path in tables:
        if path.is_file():
            add("Tables (CSV)", path, "table")
    lines = [
        "# Download the run's files\n",
        f"The files of run `{run.root.name}`. The maps are NIfTI images on the template grid "
        "in MNI space; they open in FSLeyes, MRIcroGL, ITK-SNAP or nilearn.\n",
    ]
    group = None
    for item_group, target, description in items:
        if item_group != group:
            group = item_group
            lines.append(f"\n## {group}\n")
        lines.append(f"- {{download}}`{Path(target).name} <{target}>`: {description}")
    return "\n".join(lines) + "\n"


def _run_status(run: RunDir, config: Mapping[str, Any], math: str, viewer: str = "") -> str:
    return "\n".join([
        f"Mathematics: {math}\n",
        f"Image viewer: {viewer}\n",
        f"Run folder: `{run.root.name}`. Steps, as executed by papermill:\n",
        _md_table(_step_rows(run)),
        "Its configuration (`config.yaml`):\n",
        "```yaml",
        dump_config(config).rstrip(),
        "```\n",
    ])


# -- building -----------------------------------------------------------------------------
def jupyter_book_command() -> list[str]:
    """The ``jupyter-book`` executable of this environment."""
    candidate = Path(sys.executable).parent / "jupyter-book"
    if candidate.is_file():
        return [str(candidate)]
    found = shutil.which("jupyter-book")
    if found:
        return [found]
    raise BrainAgeInputError(
        "jupyter-book is not installed; install the book extra: pip install -e '.[book]'"
    )


def build_book(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike = "_build",
    *,
    book_root: str | os.PathLike = BOOK_ROOT,
    warnings_as_errors: bool = True,
    quiet: bool = False,
) -> Path:
    """Stage the book with a run and build it into ``out_dir/html``.

    Parameters
    ----------
    run_dir : str or os.PathLike
        A finished run.
    out_dir : str or os.PathLike, default="_build"
        Receives ``src/`` (the staged sources), ``jupyter-book/`` (Sphinx's working
        files) and ``html/`` (the book; ``html/index.html`` is its first page).
    book_root : str or os.PathLike, default=BOOK_ROOT
        Folder of the book's sources.
    warnings_as_errors : bool, default=True
        Build with ``-W --keep-going``: any warning fails the build (after reporting all).
    quiet : bool, default=False
        Capture Sphinx's log (it is shown if the build fails).

    Returns
    -------
    pathlib.Path
        ``out_dir/html/index.html``.

    Raises
    ------
    BookBuildError
        If ``jupyter-book build`` fails; the message holds the end of its log.
    """
    out = Path(out_dir).resolve()
    src = stage_book(run_dir, out / "src", book_root=book_root)
    work = out / "jupyter-book"
    cmd = [*jupyter_book_command(), "build", str(src), "--path-output", str(work),
           "--builder", "html"]
    if warnings_as_errors:
        cmd += ["-W", "--keep-going"]
    with python_kernel():
        proc = subprocess.run(
            cmd, cwd=src, text=True,
            stdout=subprocess.PIPE if quiet else None,
            stderr=subprocess.STDOUT if quiet else None,
            env={**os.environ, "PYDEVD_DISABLE_FILE_VALIDATION": "1"},
        )
    if proc.returncode != 0:
        log = (proc.stdout or "")[-6000:]
        reports = sorted((work / "_build" / "html" / "reports").glob("**/*.err.log"))
        hint = f"\nExecution reports: {', '.join(map(str, reports))}" if reports else ""
        raise BookBuildError(
            f"jupyter-book build failed (exit {proc.returncode}) for run {run_dir}.\n"
            f"{log}{hint}"
        )
    built = work / "_build" / "html"
    html = out / "html"
    if html.exists():
        shutil.rmtree(html)
    shutil.copytree(built, html)
    return html / "index.html"
