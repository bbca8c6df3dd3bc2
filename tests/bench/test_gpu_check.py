"""The GPU check script runs end to end (on the CPU at 8 mm, as a smoke test)."""

from __future__ import annotations

from brainage_core.bench import gpu_check


def test_gpu_check_runs_every_heavy_step_on_the_cpu(capsys):
    table = gpu_check.run(["--device", "cpu", "--resolution", "8", "--n-subjects", "4",
                           "--preset", "quick"])
    assert list(table["step"].str.split().str[0]) == [
        "train_predictor", "fit_noise_model", "integrated_gradients", "predict"]
    assert (table["seconds"] > 0).all() and (table["subjects_per_second"] > 0).all()
    assert "float32 only" in capsys.readouterr().out  # no mixed precision on the CPU


def test_the_default_size_trains_full_batches_of_the_preset():
    # the peak memory printed must be that of the batch the preset trains with (paper:
    # 32 per GPU), not of a smaller last batch
    n = gpu_check.default_subjects(32)
    train = n - max(n // 4, 1)  # what RandomCohort keeps for training
    assert n == 86 and train >= 2 * 32
    assert gpu_check.default_subjects(4) == 16
