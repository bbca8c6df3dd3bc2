"""Repository hygiene that a merge can silently break."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(
    shutil.which("git") is None or not (REPO / ".git").exists(), reason="not a git checkout"
)
def test_no_virtual_environment_is_tracked():
    """A tracked ``.venv`` (a symlink a worktree committed) replaces the real environment
    of every checkout that merges it: git treats the ignored folder as expendable."""
    tracked = subprocess.run(
        ["git", "ls-files", "--", ".venv", "venv", ".venv/*"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.split()
    assert tracked == []
