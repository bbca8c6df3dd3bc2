"""The heavy steps of a run as processes of ``torchrun``: one launcher, PyTorch's own.

Each heavy step is a function of the run folder that runs the same code as one process
or as one of the processes started by ``torchrun`` (``python -m torch.distributed.run``):

``train``
    the predictor (:func:`~brainage_core.models.training.train_predictor`, DDP), into
    ``checkpoints/predictor.pt``;
``noise``
    the noise model (:func:`~brainage_core.study.explain.fit_noise_model`, DDP), into
    ``checkpoints/noise_model.pt``;
``maps``
    the per-subject maps, each process explaining its shard of the test subjects
    (:func:`~brainage_core.study.explain.write_subject_maps` with
    ``shard=(rank, world_size)``);
``compare``
    the comparison of every attribution method
    (:func:`~brainage_core.study.compare.compare_methods`): each process explains and
    scores its shard of the compared subjects, the noise model's sanity refits are
    trained by all processes together (DDP), and rank 0 gathers the results and writes
    the tables, maps and metrics.

``brainage-study predict --nproc N`` runs its own command under ``torchrun`` the same
way (:func:`torchrun_command`), each process predicting a shard of the new subjects.

The notebooks stay the record: notebook 02 calls ``launch_step("train", run_dir)`` and
notebook 03 ``launch_step("noise", ...)`` and ``launch_step("maps", ...)`` before their
own calls, which then find the finished checkpoints and maps and only load them, evaluate
and show the results; notebook 06 calls ``launch_step("compare", ...)`` and then reads
the comparison back (:func:`~brainage_core.study.compare.load_comparison`). With one
process (the default) ``launch_step`` does nothing and the notebook computes in its own
kernel as before. ``brainage-study run --nproc N`` sets
:data:`NPROC_ENV` for the notebooks. On a cluster, run the module under ``torchrun``
yourself, for example on 2 nodes of 4 GPUs::

    torchrun --nnodes 2 --nproc_per_node 4 --rdzv_backend c10d \\
        --rdzv_endpoint $HEAD_NODE:29500 --rdzv_id $JOB_ID \\
        -m brainage_core.study.launch train runs/paper-1a2b3c4d
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from brainage_core.study.rundir import RunDir

#: Environment variable holding the number of processes per node of the heavy steps.
NPROC_ENV = "BRAINAGE_NPROC"

#: The heavy steps, by name.
STEPS = ("train", "noise", "maps", "compare")


def nproc() -> int:
    """Processes the heavy steps use (:data:`NPROC_ENV`; 1 when unset)."""
    value = os.environ.get(NPROC_ENV, "1")
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        from brainage_core._utils.validation import BrainAgeInputError

        raise BrainAgeInputError(f"'{NPROC_ENV}' must be a positive integer; {value!r} is set.")
    return n


def launch_step(step: str, run_dir: str | os.PathLike,
                overrides: dict[str, Any] | None = None, *, processes: int | None = None
                ) -> bool:
    """Run a heavy step under ``torchrun`` when more than one process is asked for.

    Parameters
    ----------
    step : {"train", "noise", "maps", "compare"}
        The step.
    run_dir : str or os.PathLike
        The run folder.
    overrides : dict or None, default=None
        Settings the notebook overrides: ``prediction`` keys for "train", ``maps`` keys
        (as :meth:`MapsStudy.open` takes them) for the other steps; None values are
        ignored.
    processes : int or None, default=None
        Processes on this node (None: :func:`nproc`).

    Returns
    -------
    bool
        True if the step ran under ``torchrun`` (the caller then only loads its results);
        False with one process (the caller computes in its own process).

    Raises
    ------
    BrainAgeInputError
        If ``torchrun`` fails; the message holds the end of its output.
    """
    from brainage_core._utils.validation import BrainAgeInputError, check_choice

    check_choice("step", step, STEPS)
    n = nproc() if processes is None else int(processes)
    if n <= 1:
        return False
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    log = launch_log(run_dir, step)
    print(f"{step}: {n} processes (torchrun); their output goes to {log}", flush=True)
    with open(log, "w", encoding="utf-8") as out:  # streamed: `tail -f` shows a long step
        done = subprocess.run(
            torchrun_command(n, ["brainage_core.study.launch", step, str(run_dir),
                                 "--overrides", json.dumps(overrides)]),
            env=torchrun_env(), stdout=out, stderr=subprocess.STDOUT, text=True, check=False)
    text = log.read_text(encoding="utf-8", errors="replace")
    if done.returncode != 0:
        raise BrainAgeInputError(
            f"torchrun of step '{step}' on {n} processes failed (log {log}):\n{text[-3000:]}",
            run_dir)
    summary = [line for line in text.splitlines() if line.startswith(SUMMARY_PREFIXES)]
    print("\n".join([*summary, f"{step}: done"]))
    return True


#: Lines of a launched step's log that the notebook repeats (the rest stays in the log).
SUMMARY_PREFIXES = ("global batch", "min_steps")


def launch_log(run_dir: str | os.PathLike, step: str) -> Path:
    """``RUN_DIR/logs/launch-<step>.log``: the output of a step run under ``torchrun``."""
    return RunDir(run_dir).logs / f"launch-{step}.log"


def torchrun_command(processes: int, module_args: Sequence[str]) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc_per_node=N -m MODULE ARGS``.

    Parameters
    ----------
    processes : int
        Processes on this node.
    module_args : sequence of str
        The module to run (``-m``) and its arguments.
    """
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={int(processes)}", "-m", *module_args]


def torchrun_env() -> dict[str, str]:
    """The environment of ``torchrun``: this one, with one CPU thread per process unless
    ``OMP_NUM_THREADS`` says otherwise."""
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def run_step(step: str, run_dir: str | os.PathLike, overrides: dict[str, Any] | None = None
             ) -> None:
    """Run one heavy step in this process (one of ``torchrun``'s, or alone)."""
    if step == "train":
        _train(Path(run_dir), overrides or {})
        return
    from brainage_core.study import explain
    from brainage_core.study.maps import MapsStudy

    study = MapsStudy.open(run_dir, overrides=overrides, progress=False)
    if step == "compare":
        from brainage_core.study.compare import compare_methods

        compare_methods(study, explain.load_noise_model(study), progress=False)
        return
    fit = explain.fit_noise_model(study, progress=False)
    if step == "maps":
        from brainage_core.models.distributed import process_context

        here = process_context()
        explain.write_subject_maps(study, fit.explainer, shard=(here.rank, here.world_size),
                                   progress=False)


def _train(run_dir: Path, overrides: dict[str, Any]) -> None:
    from brainage_core.data.cohort import load_cohort
    from brainage_core.models.training import TrainConfig, cohort_datasets, train_predictor
    from brainage_core.study.rundir import RunDir

    run = RunDir(run_dir)
    config = run.load_config()
    settings = {"seed": config.get("seed", 0), **(config.get("prediction") or {}),
                **{k: v for k, v in overrides.items() if v is not None}}
    train_config = TrainConfig.from_dict(settings)
    cohort = load_cohort(config["data"], progress=False)
    datasets = cohort_datasets(cohort, train_config)
    train_predictor(train_config, datasets["train"], datasets["val"],
                    checkpoint=run.predictor_checkpoint, progress=False)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m brainage_core.study.launch",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=STEPS)
    parser.add_argument("run_dir")
    parser.add_argument("--overrides", default="{}", help="maps settings, as JSON")
    args = parser.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        run_step(args.step, args.run_dir, json.loads(args.overrides))
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
