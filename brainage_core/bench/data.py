"""Benchmark of the data layer: generate and prepare a synthetic cohort.

Prints, for generation (:func:`brainage_core.data.synth.cohort.generate_cohort`) and preparation
(:func:`brainage_core.data.cache.prepare_cohort`) of ``--n`` subjects at ``--resolution`` mm:

- seconds per subject (wall clock, with ``--n-jobs`` worker processes);
- peak RAM: ``ru_maxrss`` of the phase's main process and of its largest worker
  (:func:`resource.getrusage`, ``RUSAGE_SELF`` / ``RUSAGE_CHILDREN``);
- size on disk of the dataset and of the cache (allocated blocks and apparent size);
- the time of a second preparation (a cache hit).

Each phase runs in its own Python process so that its memory figures are its own.
With ``--registration`` it benchmarks the registration of native-space images instead
(:mod:`brainage_core.bench.registration`).
Run it with ``brainage-study bench data [--n 1000 --resolution 2]`` or
``python -m brainage_core.bench.data --n 1000 --resolution 2``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from brainage_core.bench import registration

#: Defaults: the figures the study reports (1,000 subjects at 2 mm).
DEFAULT_N = 1000
DEFAULT_RESOLUTION = 2

#: Goals of the generator at 2 mm (issue 11): seconds per subject with 2 workers, and the
#: peak RAM of the main process.
GOALS = {"generate_s_per_subject": 1.0, "generate_peak_rss_main_mb": 1536.0}

_RESULT_TAG = "BENCH-DATA-PHASE "


def build_parser() -> argparse.ArgumentParser:
    """Options of the benchmark (also accepted after ``brainage-study bench data``)."""
    parser = argparse.ArgumentParser(
        prog="brainage-study bench data",
        description="Generate and prepare a synthetic cohort; print seconds per subject, "
        "peak RAM and size on disk.",
    )
    parser.add_argument("--n", type=int, default=DEFAULT_N, help=f"subjects (default: {DEFAULT_N})")
    parser.add_argument(
        "--resolution",
        type=int,
        default=DEFAULT_RESOLUTION,
        help=f"grid of generation and of the cache, mm (default: {DEFAULT_RESOLUTION})",
    )
    parser.add_argument("--n-jobs", type=int, default=2, help="worker processes (default: 2)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (default: 0)")
    parser.add_argument(
        "--workdir",
        default=None,
        help="folder for the temporary dataset and cache (default: the system's temp folder)",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the dataset and cache (prints where)"
    )
    parser.add_argument(
        "--json", dest="json_out", default=None, help="also write the figures to this JSON file"
    )
    registration.add_arguments(parser)
    parser.add_argument("--phase", choices=("generate", "prepare"), help=argparse.SUPPRESS)
    parser.add_argument("--dataset", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    return parser


def run(args: argparse.Namespace | Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print its figures and return them.

    Parameters
    ----------
    args : argparse.Namespace, list of str or None, default=None
        Options of :func:`build_parser`. A namespace from ``brainage-study bench`` brings
        its own options as ``args.extra`` (a list of strings).

    Returns
    -------
    dict
        The figures (see the module docstring).
    """
    opts = _parse(args)
    if opts.registration:  # native-space images registered against a known answer
        return registration.run(opts)
    with tempfile.TemporaryDirectory(prefix="bench-data-", dir=opts.workdir) as tmp:
        work = Path(tmp)
        if opts.keep:
            work = Path(tempfile.mkdtemp(prefix="bench-data-kept-", dir=opts.workdir))
        dataset, cache = work / "dataset", work / "cache"
        print(
            f"bench data: {opts.n} subjects at {opts.resolution} mm, {opts.n_jobs} worker(s), "
            f"{os.cpu_count()} CPU(s) visible, load average {os.getloadavg()[0]:.1f}",
            flush=True,
        )
        gen = _run_phase("generate", opts, dataset, cache)
        prep = _run_phase("prepare", opts, dataset, cache)
        hit = _run_phase("prepare", opts, dataset, cache)
        results = {
            "n_subjects": opts.n,
            "resolution": opts.resolution,
            "n_jobs": opts.n_jobs,
            "cpu_count": os.cpu_count(),
            "generate_s_per_subject": gen["seconds"] / opts.n,
            "generate_total_s": gen["seconds"],
            "generate_peak_rss_main_mb": gen["maxrss_self_mb"],
            "generate_peak_rss_worker_mb": gen["maxrss_children_mb"],
            "prepare_s_per_subject": prep["seconds"] / opts.n,
            "prepare_total_s": prep["seconds"],
            "prepare_peak_rss_main_mb": prep["maxrss_self_mb"],
            "prepare_peak_rss_worker_mb": prep["maxrss_children_mb"],
            "prepare_cache_hit_s": hit["seconds"],
            "dataset_disk_mb": _disk_mb(dataset),
            "cache_disk_mb": _disk_mb(cache),
            "cache_apparent_mb": _disk_mb(cache, apparent=True),
            "grid_shape": prep.get("shape"),
        }
        if opts.keep:
            results["kept"] = str(work)
    _print(results)
    if opts.json_out:
        from brainage_core._utils.io import write_json

        write_json(opts.json_out, results)
    return results


def _parse(args: argparse.Namespace | Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    if args is None:
        return parser.parse_args([])
    if isinstance(args, argparse.Namespace):
        if hasattr(args, "n") and hasattr(args, "resolution"):
            return args
        return parser.parse_args(list(getattr(args, "extra", None) or []))
    return parser.parse_args(list(args))


def _run_phase(phase: str, opts: argparse.Namespace, dataset: Path, cache: Path) -> dict[str, Any]:
    """Run one phase in a fresh Python process; return its figures."""
    cmd = [
        sys.executable, "-m", "brainage_core.bench.data", "--phase", phase,
        "--n", str(opts.n), "--resolution", str(opts.resolution),
        "--n-jobs", str(opts.n_jobs), "--seed", str(opts.seed),
        "--dataset", str(dataset), "--cache", str(cache),
    ]  # fmt: skip
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"bench data: the {phase} phase failed (exit {proc.returncode})")
    return json.loads(lines[-1][len(_RESULT_TAG) :])


def _phase_main(opts: argparse.Namespace) -> None:
    """Body of one phase (in its own process): time it, report rusage as a JSON line."""
    from brainage_core.data.cache import prepare_cohort
    from brainage_core.data.sources.bids import load_bids
    from brainage_core.data.synth.cohort import generate_cohort
    from brainage_core.data.synth.config import SynthConfig

    out: dict[str, Any] = {}
    start = time.perf_counter()  # after the imports: the figures are the work's own
    if opts.phase == "generate":
        config = SynthConfig.from_dict(
            {"n_subjects": opts.n, "resolution": opts.resolution, "seed": opts.seed}
        )
        generate_cohort(config, opts.dataset, n_jobs=opts.n_jobs, progress=True)
    else:
        cohort = prepare_cohort(
            load_bids(opts.dataset),
            opts.cache,
            resolution=opts.resolution,
            n_jobs=opts.n_jobs,
            progress=True,
        )
        out["shape"] = list(cohort.shape)
    out["seconds"] = time.perf_counter() - start
    # Linux reports ru_maxrss in kB (macOS in bytes).
    unit = 1024.0 if sys.platform.startswith("linux") else 1024.0**2
    out["maxrss_self_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / unit
    out["maxrss_children_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / unit
    print(_RESULT_TAG + json.dumps(out), flush=True)


def _disk_mb(path: Path, *, apparent: bool = False) -> float:
    total = 0
    for p in path.rglob("*"):
        if p.is_file():
            st = p.stat()
            total += st.st_size if apparent else st.st_blocks * 512
    return total / 1024.0**2


def _print(r: dict[str, Any]) -> None:
    n, res = r["n_subjects"], r["resolution"]
    lines = [
        f"--- data benchmark: {n} subjects at {res} mm, grid {r['grid_shape']}, "
        f"{r['n_jobs']} worker(s) on {r['cpu_count']} CPU(s)",
        f"generation : {r['generate_s_per_subject']:.3f} s/subject "
        f"({r['generate_total_s']:.0f} s total); peak RAM main "
        f"{r['generate_peak_rss_main_mb']:.0f} MB, largest worker "
        f"{r['generate_peak_rss_worker_mb']:.0f} MB; dataset {r['dataset_disk_mb']:.0f} MB",
        f"preparation: {r['prepare_s_per_subject']:.3f} s/subject "
        f"({r['prepare_total_s']:.0f} s total); peak RAM main "
        f"{r['prepare_peak_rss_main_mb']:.0f} MB, largest worker "
        f"{r['prepare_peak_rss_worker_mb']:.0f} MB; cache {r['cache_disk_mb']:.0f} MB on disk "
        f"({r['cache_apparent_mb']:.0f} MB apparent)",
        f"second preparation (cache hit): {r['prepare_cache_hit_s']:.2f} s",
    ]
    for key, goal in GOALS.items():
        ok = r[key] <= goal
        lines.append(f"goal {key} <= {goal:g}: {r[key]:.3f} ({'met' if ok else 'NOT met'})")
    print("\n".join(lines), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``python -m brainage_core.bench.data``)."""
    opts = build_parser().parse_args(argv)
    if opts.phase:
        _phase_main(opts)
    else:
        run(opts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
