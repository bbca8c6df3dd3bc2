"""Input validation shared by every module: one error type and a few checkers.

Errors name the parameter (or file) and the value that was given, in the style of
nilearn: ``'resolution' must be one of (1, 2, 4); 3 was provided.``
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any


class BrainAgeInputError(ValueError):
    """Bad input: a file, a table or a parameter the study cannot use.

    Parameters
    ----------
    message : str
        What is wrong.
    path : str or os.PathLike or None, default=None
        The offending file, if any. It is prefixed to the message so that every
        error names the file it is about.
    """

    def __init__(self, message: str, path: str | os.PathLike | None = None) -> None:
        self.path = None if path is None else os.fspath(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """Return ``value`` if it is one of ``choices``, else raise a clear error."""
    choices = tuple(choices)
    if value not in choices:
        raise BrainAgeInputError(f"'{name}' must be one of {choices}; {value!r} was provided.")
    return value


def check_positive(name: str, value: Any, *, integer: bool = False, allow_zero: bool = False):
    """Return ``value`` if it is a (strictly) positive number, else raise a clear error."""
    kind = "integer" if integer else "number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        raise BrainAgeInputError(f"'{name}' must be a positive {kind}; {value!r} was provided.")
    if value < 0 or (value == 0 and not allow_zero):
        bound = "non-negative" if allow_zero else "positive"
        raise BrainAgeInputError(f"'{name}' must be a {bound} {kind}; {value!r} was provided.")
    return value


def check_fraction(name: str, value: Any, *, allow_one: bool = False) -> float:
    """Return ``value`` if it lies in [0, 1) (or [0, 1]), else raise a clear error."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BrainAgeInputError(f"'{name}' must be a number in [0, 1); {value!r} was provided.")
    upper_ok = value <= 1 if allow_one else value < 1
    if not (0 <= value and upper_ok):
        interval = "[0, 1]" if allow_one else "[0, 1)"
        raise BrainAgeInputError(f"'{name}' must lie in {interval}; {value!r} was provided.")
    return float(value)
