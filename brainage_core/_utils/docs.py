"""Parameter docs written once (nilearn's docdict): the same parameter, the same words.

A docstring names an entry as ``%(predictor)s``; :func:`fill_doc` replaces it with the text
below, indented like the placeholder::

    @fill_doc
    def explain(predictor, mask=None):
        \"\"\"...

        Parameters
        ----------
        %(predictor)s
        %(mask)s
        \"\"\"
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T", bound=Callable)

#: The shared parameter texts, in numpydoc form (name line, then the description).
docdict: dict[str, str] = {
    "predictor": """predictor : torch.nn.Module
    Trained model mapping images ``(N, 1, X, Y, Z)`` to predictions ``(N,)``. It is
    frozen (eval mode, no weight gradients) while explaining and restored afterwards; its
    weights are never changed.""",
    "mask": """mask : array-like of bool or None, default=None
    Brain mask on the image grid; importance (and noise) only inside it, zero outside.
    None means every voxel.""",
    "progress": """progress : bool, default=True
    Show a tqdm progress bar (quiet when ``TQDM_DISABLE=1``, as in CI).""",
    "bench_args": """args : argparse.Namespace, list of str or None, default=None
    A namespace from ``brainage-study bench`` (its ``extra`` list holds this
    benchmark's arguments), a list of command-line strings, or None for defaults.""",
    "output_file": """output_file : str or os.PathLike or None, default=None
    Also save the figure there (written atomically). None only returns it.""",
}


def fill_doc(obj: T) -> T:
    """Replace the ``%(name)s`` entries of ``obj.__doc__`` with :data:`docdict`'s texts."""
    doc = obj.__doc__
    if not doc:
        return obj
    lines = doc.splitlines()
    out = []
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("%(") and stripped.endswith(")s") and stripped[2:-2] in docdict:
            indent = line[: len(line) - len(line.lstrip())]
            text = docdict[stripped[2:-2]].splitlines()
            out.append(indent + text[0])
            out.extend(indent + t if t.strip() else t for t in text[1:])
        else:
            out.append(line)
    obj.__doc__ = "\n".join(out)
    return obj
