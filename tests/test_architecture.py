"""The package's architecture contract: imports only point down (import-linter)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _lint(root: Path) -> subprocess.CompletedProcess:
    """Run ``lint-imports`` on the package found under ``root`` (with its pyproject.toml)."""
    code = (
        f"import sys; sys.path.insert(0, {str(root)!r}); "
        "from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True))"
    )
    return subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300
    )


def test_layers_contract_is_kept() -> None:
    result = _lint(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Layers: imports only point down KEPT" in result.stdout


def test_an_upward_import_breaks_the_contract(tmp_path: Path) -> None:
    """The contract is not vacuous: a copy of the package whose data layer imports a study
    module is refused, and the report names the offending import."""
    shutil.copytree(
        REPO / "brainage_core", tmp_path / "brainage_core",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "brainage_core" / "data" / "upward.py").write_text(
        '"""An upward import, for the test."""\n'
        "from brainage_core.study.rundir import RunDir  # noqa: F401\n"
    )
    result = _lint(tmp_path)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout
    assert "brainage_core.data.upward -> brainage_core.study.rundir" in result.stdout
