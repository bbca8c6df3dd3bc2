"""The QC page: which subjects its mosaic shows, and what it says."""

from __future__ import annotations

import numpy as np
import pandas as pd

from brainage_core.plotting import qc


def _table(n_flagged: int, n_passed: int) -> pd.DataFrame:
    n = n_flagged + n_passed
    return pd.DataFrame({
        "participant_id": [f"sub-{i:04d}" for i in range(n)],
        "path": [f"/nowhere/sub-{i:04d}.nii.gz" for i in range(n)],
        "qc_pass": [False] * n_flagged + [True] * n_passed,
        "ncc": np.linspace(0.9, 0.1, n),
    })


def test_a_cohort_flagged_whole_gets_a_mosaic_of_the_worst_and_a_full_table(tmp_path,
                                                                           monkeypatch):
    shown = []
    monkeypatch.setattr(qc, "plot_qc_mosaic",
                        lambda table, template, output_file: shown.append(table))
    page = qc.write_qc_page(_table(100, 10), tmp_path, template=None, max_flagged=5)
    mosaic = shown[0]
    flagged = mosaic[~mosaic["qc_pass"]]
    # the five flagged subjects least similar to the template, then three typical ones
    assert list(flagged["participant_id"]) == [f"sub-{i:04d}" for i in range(99, 94, -1)]
    assert mosaic["qc_pass"].sum() == 3
    text = page.read_text()
    assert "100 of 110 subjects flagged" in text
    assert "the 5 flagged subjects least similar to the template (lowest NCC) of 100" in text
    assert all(f"sub-{i:04d}" in text for i in range(110))  # the table keeps every subject


def test_a_few_flagged_subjects_are_all_shown(tmp_path, monkeypatch):
    shown = []
    monkeypatch.setattr(qc, "plot_qc_mosaic",
                        lambda table, template, output_file: shown.append(table))
    page = qc.write_qc_page(_table(3, 10), tmp_path, template=None)
    assert (~shown[0]["qc_pass"]).sum() == 3
    assert "every flagged subject" in page.read_text()
