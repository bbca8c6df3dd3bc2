"""The ridge-solver benchmark runs (tiny sizes, a smoke test)."""

from __future__ import annotations

from brainage_core.bench import ridge


def test_ridge_bench_compares_both_solvers():
    table = ridge.run(["--sizes", "30x80", "80x30"])
    assert list(table["form"]) == ["dual", "primal"]
    assert (table["torch_alpha"] == table["sklearn_alpha"]).all()
    assert (table["loo_max_rel_diff"] < 1e-5).all()

