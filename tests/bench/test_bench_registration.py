"""``bench data --registration``: registration against the generator's known transforms."""

from __future__ import annotations

import json

from brainage_core.bench import data


def test_the_registration_bench_measures_against_the_best_affine(tmp_path, capsys):
    out = tmp_path / "figures.json"
    results = data.run(["--registration", "--n", "1", "--resolution", "8", "--n-jobs", "1",
                        "--workdir", str(tmp_path), "--json", str(out)])
    printed = capsys.readouterr().out
    assert "share below one voxel of 2 mm" in printed and "non-affine part" in printed
    assert results["n_subjects"] == 1 and len(results["subjects"]) == 1
    for row in results["subjects"]:
        # 8 mm cohorts have 6 x 6 x 10 mm native voxels: within half a voxel
        assert 0.0 < row["mean_mm"] < 3.0, row
        assert row["mean_mm"] <= row["max_mm"]
        assert row["nonaffine_mm"] > 0.0  # the generator's defaults have an anatomy
    assert results["template_load_s"] >= 0.0 and results["register_s_per_subject"] > 0.0
    assert json.loads(out.read_text())["share_below_2mm"] == results["share_below_2mm"]
