"""Helpers of the command-line tests."""

from __future__ import annotations


def one_error_line(capsys, command: str) -> str:
    """Assert standard error holds one line ``brainage-study COMMAND: error: ...``; return
    the message after that prefix."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    prefix = f"brainage-study {command}: error: "
    assert lines[0].startswith(prefix), lines[0]
    return lines[0][len(prefix) :]
