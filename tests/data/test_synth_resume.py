"""A resumed generation leaves no temporary file of the interrupted one (issue 10)."""

from __future__ import annotations

import multiprocessing
import shutil
from pathlib import Path

from helpers.synth import TINY_CONFIG

from brainage_core._utils import io as _io

FORK = multiprocessing.get_context("fork")


def test_a_resumed_generation_removes_the_temporary_files_of_the_kill(
    tiny_cohort: Path, tmp_path: Path
) -> None:
    from brainage_core.data.synth import SynthConfig, generate_cohort

    config = SynthConfig.from_dict(TINY_CONFIG)
    out = tmp_path / "s"
    shutil.copytree(tiny_cohort, out)
    image = out / "sub-0002" / "anat" / "sub-0002_T1w.nii.gz"
    image.unlink()
    leftover = image.with_name(".sub-0002_T1w.nii.gz.x8w1.tmp.nii.gz")
    leftover.write_bytes(b"half an image")
    generate_cohort(config, out, n_jobs=1, progress=False)
    assert image.is_file() and not leftover.exists()
    assert not [p for p in out.rglob("*") if _io.is_temporary_file(p)]
