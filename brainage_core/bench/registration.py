"""Registration of native-space images, against a known answer (``bench data --registration``).

Two synthetic cohorts of the same ``--n`` subjects are generated: once in MNI space and once
in native space (:mod:`brainage_core.data.synth.native`: a random rigid pose, another voxel
size, field of view and orientation code, the transform recorded). Every native image is
registered (:mod:`brainage_core.data.register`) and the benchmark prints:

- the residual displacement of the estimated transform against the known one (mean over the
  template brain's voxels, mm) per subject, and the share of subjects below one voxel of the
  2 mm grid (target: at least 95 %);
- seconds per registration;
- with ``--run-dir``: the trained run's MAE on the registered native-space images against
  its MAE on the same subjects generated in MNI space (target: within 10 %), through
  ``predict``; the MNI-space images are prepared as the run's training images were
  (registered as well, for a run trained with ``data.register: true``); and, to tell the
  causes apart, its MAE on the native images moved back with the known head pose (the
  resampling round trip alone) and with the known best affine (the round trip and the
  removal of each subject's own head size and pose, as a perfect affine registration
  would do); these two are not registered again.

The cohorts follow the run's ``data.synthetic`` settings (or the generator's defaults
without a run) with a new seed. The known transform is ``native_from_template``: the head
pose composed with the best affine (least squares over the template brain) of the subject's
own anatomy. Its smooth deformations are not affine, but a smooth field on a coarse grid
has an affine part (a slight stretch or tilt of the whole brain) that a registration
recovers with the head size, rotation and shift; the residual against the drawn head size,
rotation and shift alone (``native_from_template_drawn``) is printed too, and the mean
non-affine part of the anatomy (what no affine holds). ``--anatomy none`` switches the
subjects' own anatomy off to measure the registration alone.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

#: Share of subjects whose residual must be below one voxel of 2 mm, and the MAE tolerance.
GOALS = {"share_below_2mm": 0.95, "mae_ratio_max": 1.10}

#: Generator settings that make a subject's MNI image the template's pose exactly.
NO_ANATOMY = {"rotation_deg": 0.0, "translation_mm": 0.0, "head_size_sd": 0.0,
              "head_size_sex_difference": 0.0, "deformation_mm": 0.0,
              "local_deformation_mm": 0.0}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's options on ``bench data``'s parser."""
    group = parser.add_argument_group("registration (--registration)")
    group.add_argument("--registration", action="store_true",
                       help="benchmark registration of native-space images instead")
    group.add_argument("--run-dir", default=None,
                       help="a trained run: also compare its MAE on registered native-space "
                       "images with its MAE in MNI space")
    group.add_argument("--anatomy", choices=("run", "none"), default="run",
                       help="subjects' own anatomy and misregistration: as the run's cohort "
                       "(default) or none (the pose is then the whole truth)")


def run(opts: argparse.Namespace) -> dict[str, Any]:
    """Generate, register, predict; print and return the figures."""
    from brainage_core.data.preprocess import load_image
    from brainage_core.data.register import (
        REGISTRATION_RESOLUTION,
        register_to_template,
        residual_displacement,
    )
    from brainage_core.data.sources.bids import load_bids
    from brainage_core.data.synth import SynthConfig, generate_cohort
    from brainage_core.data.synth.native import read_native_transform, transform_path
    from brainage_core.data.template import load_template
    from brainage_core.study.rundir import RunDir

    settings: dict[str, Any] = {}
    if opts.run_dir:
        settings = dict(RunDir(opts.run_dir).load_config()["data"].get("synthetic") or {})
        settings.pop("native_space", None)  # a run trained on native-space images
    settings.update(n_subjects=opts.n, seed=opts.seed + 1000,
                    resolution=settings.get("resolution", opts.resolution))
    if opts.anatomy == "none":
        settings.update(NO_ANATOMY)
    anatomy = ("none" if opts.anatomy == "none"
               else "the run's cohort" if opts.run_dir else "the generator's defaults")
    print(f"bench data --registration: {opts.n} subjects generated at "
          f"{settings['resolution']} mm (anatomy: {anatomy}), load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    start = time.perf_counter()  # once per process: not part of a subject's time
    load_template(REGISTRATION_RESOLUTION, crop=False)
    template_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory(prefix="bench-reg-", dir=opts.workdir) as tmp:
        work = Path(tmp)
        mni = generate_cohort(SynthConfig.from_dict(settings), work / "mni",
                              n_jobs=opts.n_jobs, progress=False)
        native = generate_cohort(SynthConfig.from_dict({**settings, "native_space": {}}),
                                 work / "native", n_jobs=opts.n_jobs, progress=False)
        rows = []
        for path in sorted(native.glob("sub-*/anat/*_T1w.nii.gz")):
            pid = path.name.split("_")[0]
            start = time.perf_counter()
            reg = register_to_template(load_image(path), path)
            seconds = time.perf_counter() - start
            residual = residual_displacement(reg.native_from_mni,
                                              read_native_transform(native, pid))
            drawn = residual_displacement(
                reg.native_from_mni,
                read_native_transform(native, pid, "native_from_template_drawn"))
            nonaffine = float(json.loads(transform_path(native, pid).read_text())[
                "nonaffine_mm"])
            rows.append({"participant_id": pid, "seconds": seconds, **residual,
                         "drawn_mean_mm": drawn["mean_mm"], "nonaffine_mm": nonaffine})
            print(f"  {pid}: residual {residual['mean_mm']:.2f} mm (max "
                  f"{residual['max_mm']:.2f}); vs the drawn head size, rotation and shift "
                  f"{drawn['mean_mm']:.2f} mm; non-affine anatomy {nonaffine:.2f} mm; "
                  f"{seconds:.1f} s", flush=True)
        table = pd.DataFrame(rows)
        mean = table["mean_mm"].to_numpy()
        results: dict[str, Any] = {
            "n_subjects": len(rows),
            "residual_mean_mm_median": float(np.median(mean)),
            "residual_mean_mm_max": float(mean.max()),
            "residual_max_mm_median": float(table["max_mm"].median()),
            "residual_max_mm_max": float(table["max_mm"].max()),
            "residual_vs_drawn_mean_mm_median": float(table["drawn_mean_mm"].median()),
            "nonaffine_mm_median": float(table["nonaffine_mm"].median()),
            "share_below_2mm": float(np.mean(mean < 2.0)),
            "register_s_per_subject": float(table["seconds"].mean()),
            "register_s_median": float(table["seconds"].median()),
            "template_load_s": template_s,
            "subjects": rows,
        }
        if opts.run_dir:
            from brainage_core.study.predict import predict_subjects

            # the MNI-space images go through what the run's training images went through
            # (registered too, for a run trained with data.register: true)
            a = predict_subjects(opts.run_dir, load_bids(mni, database_dir=work / "idx1"),
                                 work / "pred_mni", progress=False, register=None)
            b = predict_subjects(opts.run_dir, load_bids(native, database_dir=work / "idx2"),
                                 work / "pred_native", progress=False, register=True)
            results.update(mae_mni=a.metrics["mae"], mae_registered=b.metrics["mae"],
                           mae_ratio=b.metrics["mae"] / a.metrics["mae"],
                           predict_registered_s_per_subject=b.metrics["seconds_per_subject"],
                           qc_flagged_registered=b.metrics["n_flagged"],
                           qc_flagged_mni=a.metrics["n_flagged"],
                           mean_error_mni=_mean_error(a), mean_error_registered=_mean_error(b))
            # The causes apart: the native images moved back with the known transforms
            manifest = load_bids(native, database_dir=work / "idx3")
            for which in ("native_from_mni", "native_from_template"):
                moved = _moved_back(manifest, native, which, work / which)
                c = predict_subjects(opts.run_dir, moved, work / f"pred_{which}",
                                     progress=False, register=False)
                results[f"mae_{which}"] = c.metrics["mae"]
                results[f"mean_error_{which}"] = _mean_error(c)
    _print(results)
    if getattr(opts, "json_out", None):
        from brainage_core._utils.io import write_json

        write_json(opts.json_out, results)
    return results


def _mean_error(result: Any) -> float:
    """Mean of predicted minus true age (years) of a :class:`PredictResult`."""
    table = result.table
    return float((table["predicted_age"] - table["age"]).mean())


def _moved_back(manifest: pd.DataFrame, native: Path, which: str, folder: Path
                ) -> pd.DataFrame:
    """The native images given the affine of a recorded transform (no registration)."""
    import nibabel as nib

    from brainage_core.data.preprocess import load_image
    from brainage_core.data.register import apply_registration
    from brainage_core.data.synth.native import read_native_transform

    folder.mkdir(parents=True, exist_ok=True)
    out = manifest.copy()
    out.attrs = dict(manifest.attrs)
    paths = []
    for pid, path in zip(manifest["participant_id"], manifest["path"], strict=True):
        img = apply_registration(load_image(path), read_native_transform(native, pid, which))
        target = folder / f"{pid}_T1w.nii.gz"
        nib.save(img, target)
        paths.append(str(target))
    out["path"] = paths
    return out


def _print(r: dict[str, Any]) -> None:
    ok = r["share_below_2mm"] >= GOALS["share_below_2mm"]
    lines = [
        f"registration of {r['n_subjects']} native-space subjects (SimpleITK affine):",
        f"  residual displacement vs the known transform (the best affine of each "
        f"subject's anatomy), mean over the brain: median "
        f"{r['residual_mean_mm_median']:.2f} mm, worst {r['residual_mean_mm_max']:.2f} mm; "
        f"max over the brain: median {r['residual_max_mm_median']:.2f} mm, worst "
        f"{r['residual_max_mm_max']:.2f} mm",
        f"  (vs the drawn head size, rotation and shift alone: median "
        f"{r['residual_vs_drawn_mean_mm_median']:.2f} mm; the anatomy's non-affine part, "
        f"which no affine holds: median {r['nonaffine_mm_median']:.2f} mm)",
        f"  share below one voxel of 2 mm: {100 * r['share_below_2mm']:.0f} % (goal >= 95 %: "
        f"{'met' if ok else 'NOT met'})",
        f"  seconds per registration: mean {r['register_s_per_subject']:.1f}, median "
        f"{r['register_s_median']:.1f} (one thread; loading the template once: "
        f"{r['template_load_s']:.1f} s)",
    ]
    if "mae_ratio" in r:
        met = r["mae_ratio"] <= GOALS["mae_ratio_max"]
        lines += [
            f"  run's MAE: {r['mae_mni']:.2f} y on MNI-space images, {r['mae_registered']:.2f} y "
            f"on the same subjects registered from native space (ratio {r['mae_ratio']:.3f}; "
            f"goal <= 1.10: {'met' if met else 'NOT met'})",
            f"  predict with registration: {r['predict_registered_s_per_subject']:.1f} s per "
            f"subject; QC flagged {r['qc_flagged_registered']} registered and "
            f"{r['qc_flagged_mni']} MNI-space subject(s)",
            "  the causes apart (MAE; mean predicted minus true age):",
            f"    MNI-space images                                   {r['mae_mni']:.2f} y; "
            f"{r['mean_error_mni']:+.2f} y",
            f"    native, moved back by the known head pose (the resampling round trip alone) "
            f"{r['mae_native_from_mni']:.2f} y; {r['mean_error_native_from_mni']:+.2f} y",
            f"    native, moved by the known best affine (round trip + the subject's own head "
            f"size and pose removed) {r['mae_native_from_template']:.2f} y; "
            f"{r['mean_error_native_from_template']:+.2f} y",
            f"    native, registered (the above + the registration's error) "
            f"{r['mae_registered']:.2f} y; {r['mean_error_registered']:+.2f} y",
        ]
    print("\n".join(lines), flush=True)
