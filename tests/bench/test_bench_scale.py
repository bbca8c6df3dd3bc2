"""The ridge-solver and compaction benchmarks run (tiny sizes, smoke tests)."""

from __future__ import annotations

from brainage_core.bench import compact, ridge


def test_ridge_bench_compares_both_solvers():
    table = ridge.run(["--sizes", "30x80", "80x30"])
    assert list(table["form"]) == ["dual", "primal"]
    assert (table["torch_alpha"] == table["sklearn_alpha"]).all()
    assert (table["loo_max_rel_diff"] < 1e-5).all()


def test_compaction_bench_checks_both_ways_byte_for_byte(tmp_path):
    table = compact.run(["--rows", "6", "--resolution", "8", "--dir", str(tmp_path)])
    assert list(table["skipped_row"]) == [1, 3, 4] and table["identical"].all()
    assert not list(tmp_path.iterdir())  # the temporary folder is gone
