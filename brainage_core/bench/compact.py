"""A skipped subject in an unsharded ``prepare``: in-place compaction against a copy.

::

    python -m brainage_core.bench.compact                   # 400 rows of 2.4 MB (2 mm)
    python -m brainage_core.bench.compact --rows 100 --resolution 1

Writes a float16 array of ``--rows`` images of the ``--resolution`` grid in a temporary
folder (``--dir``), drops one row (near the start, in the middle, near the end) and
times the former way (every kept row copied into a second file, then moved over the
first) against :func:`~brainage_core.data.cache.compact_in_place` (the rows after the
skipped one move up in the same file, a progress record after each batch). Both results
are checked byte for byte. The copy needs a second file of the array's size on disk;
the in-place compaction none.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from brainage_core.data import cache
from brainage_core.data.template import load_template


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m brainage_core.bench.compact",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=400, help="images in the array (default 400)")
    p.add_argument("--resolution", type=int, default=2, help="grid in mm (default 2)")
    p.add_argument("--dir", default=None, help="folder of the temporary files")
    return p


def run(args: Any = None) -> pd.DataFrame:
    """Time both ways for three positions of the skipped row; print and return them."""
    if args is None or isinstance(args, list):
        ns = build_parser().parse_args(args)
    else:
        ns = build_parser().parse_args(list(getattr(args, "extra", []) or []))
    shape = (ns.rows, *load_template(ns.resolution).shape)
    rows = []
    with tempfile.TemporaryDirectory(dir=ns.dir) as tmp:
        folder = Path(tmp)
        original, work = folder / "original.npy", folder / "images.npy"
        writer = cache.ImageFileWriter.create(original, shape)
        image = np.random.default_rng(0).normal(size=shape[1:]).astype(np.float16)
        for i in range(shape[0]):
            writer.write(i, image)
        writer.close()
        for skipped in (1, shape[0] // 2, shape[0] - 2):
            keep = np.ones(shape[0], dtype=bool)
            keep[skipped] = False
            shutil.copyfile(original, work)
            start = time.perf_counter()
            source = np.load(work, mmap_mode="r")
            copy = cache.ImageFileWriter.create(folder / "copy.npy", (int(keep.sum()),
                                                                       *shape[1:]))
            for j, i in enumerate(np.flatnonzero(keep)):
                copy.write(j, source[i])
            copy.close()
            del source
            os.replace(folder / "copy.npy", work)
            copy_seconds = time.perf_counter() - start
            expected = work.read_bytes()
            shutil.copyfile(original, work)
            start = time.perf_counter()
            cache.compact_in_place(work, keep, folder / "compact.json")
            in_place_seconds = time.perf_counter() - start
            (folder / "compact.json").unlink()
            rows.append({"rows": shape[0], "row_MB": image.nbytes / 2**20,
                         "skipped_row": skipped, "copy_s": copy_seconds,
                         "in_place_s": in_place_seconds,
                         "identical": work.read_bytes() == expected})
            print(pd.DataFrame(rows[-1:]).to_string(index=False), flush=True)
    return pd.DataFrame(rows)


if __name__ == "__main__":  # pragma: no cover
    run()
