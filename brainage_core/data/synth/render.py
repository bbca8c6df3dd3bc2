"""Rendering synthetic subjects: the aged template, then individual anatomy and scanner."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from brainage_core._utils.io import save_nifti
from brainage_core._utils.validation import (
    BrainAgeInputError,
)
from brainage_core.data.atlas import load_atlas
from brainage_core.data.synth.ages import SUBJECT_STREAM
from brainage_core.data.synth.config import AgeEffect, SynthConfig
from brainage_core.data.template import Template, load_template

#: Largest deformation gradient of one integration step of an expansion flow (keeps every
#: step, hence the whole flow, invertible).
_MAX_STEP_STRAIN = 0.8


# --------------------------------------------------------------------------- ageing model


class AgeingModel:
    """The template, aged in template space: what every subject is made from.

    Parameters
    ----------
    config : SynthConfig
        The cohort's parameters (its resolution, effects and ground-truth threshold).
    effects : list of AgeEffect or None, default=None
        Effects to plant instead of ``config.effects`` (used for per-effect ground truth).

    Attributes
    ----------
    template : Template
        The template grid.
    csf_intensity : float
        Template intensity of CSF (median in the ventricles), the value atrophy tends to.
    region_names : list of list of str
        Atlas regions matched by each effect.
    """

    def __init__(self, config: SynthConfig, effects: list[AgeEffect] | None = None) -> None:
        self.config = config
        self.effects = list(config.effects if effects is None else effects)
        self.template: Template = load_template(config.resolution)
        atlas = load_atlas(config.resolution)
        t = self.template
        self.t1 = np.asarray(t.t1, dtype=np.float32)
        self.mask = t.mask.astype(np.float32)
        self.csf_intensity = float(np.median(t.t1[(t.csf > 0.9) & t.mask]))
        res = float(config.resolution)
        self.region_names = [atlas.region_names(e.regions) for e in self.effects]
        # (index of the effect, effect, ...): the index picks the effect's regional age.
        self._intensity: list[tuple[int, AgeEffect, np.ndarray]] = []
        self._expansion: list[tuple[int, AgeEffect, np.ndarray, float]] = []
        for k, effect in enumerate(self.effects):
            region = atlas.region_mask(effect.regions).astype(np.float32)
            if not region.any():
                raise BrainAgeInputError(
                    f"the regions {effect.regions} of a {effect.kind} effect have no voxels on "
                    f"the {config.resolution} mm grid; choose larger regions or a finer grid."
                )
            sigma = effect.sigma_mm / res
            if effect.kind == "ventricle_expansion":
                smooth = ndimage.gaussian_filter(region, sigma) if sigma > 0 else region
                grad = np.stack(np.gradient(smooth)).astype(np.float32)  # per voxel
                norm = max(float(np.sqrt((grad**2).sum(axis=0)).max()), 1e-12)
                # Velocity of unit top speed (1 mm per unit of strength), in voxels.
                velocity = grad / (norm * res)
                strain = np.sqrt(
                    sum((np.stack(np.gradient(velocity[k])) ** 2).sum(axis=0) for k in range(3))
                )
                self._expansion.append((k, effect, velocity, float(strain.max())))
            else:
                soft = ndimage.gaussian_filter(region, sigma) if sigma > 0 else region
                tissue = t.gm if effect.kind == "cortical_thinning" else t.gm + t.wm
                weight = np.clip(soft, 0, 1) * np.clip(tissue, 0, 1) * t.mask
                self._intensity.append((k, effect, weight.astype(np.float32)))
        if self._expansion:
            speed = sum(np.sqrt((v**2).sum(axis=0)) for _, _, v, _ in self._expansion)
            active = speed > 1e-3 * float(speed.max())
            self._active = ndimage.binary_dilation(active, iterations=1)

    def effect_ages(self, b: float | Sequence[float]) -> list[float]:
        """One age per effect: ``b`` for every effect, or the regional ages as given."""
        if np.ndim(b) == 0:
            return [float(b)] * len(self.effects)
        ages = [float(v) for v in b]
        if len(ages) != len(self.effects):
            raise BrainAgeInputError(
                f"{len(ages)} regional ages were given for {len(self.effects)} effects."
            )
        return ages

    def intensity(self, b: float | Sequence[float]) -> np.ndarray:
        """Template intensities with the intensity effects of biological age ``b``.

        ``b`` is one age for every effect, or one regional age per effect.
        """
        if not self._intensity:
            return self.t1
        ages = self.effect_ages(b)
        w = np.zeros_like(self.t1)
        for k, effect, weight in self._intensity:
            w += np.float32(effect.strength * float(effect.profile(ages[k]))) * weight
        np.clip(w, 0.0, 1.0, out=w)
        return self.t1 + w * (np.float32(self.csf_intensity) - self.t1)

    def expand(self, b: float | Sequence[float], coords: np.ndarray) -> np.ndarray:
        """Move template coordinates (voxels, ``(3, N)``) along the expansion flow at ``b``.

        The displacement is the flow of the velocity ``sum_k m_k(b) u_k`` over unit time,
        integrated with enough Euler steps that each step is invertible, so the deformation
        never folds however strong the effect. Points move toward the ventricles' centre, so
        sampling the template there makes the CSF spaces grow.
        """
        if not self._expansion:
            return coords
        ages = self.effect_ages(b)
        magnitudes = [e.strength * float(e.profile(ages[k])) for k, e, _, _ in self._expansion]
        strain = sum(m * lip for m, (_, _, _, lip) in zip(magnitudes, self._expansion, strict=True))
        if strain <= 0:
            return coords
        n_steps = int(np.ceil(strain / _MAX_STEP_STRAIN))
        idx = np.rint(coords).astype(np.intp)
        shape = np.array(self._active.shape)[:, None]
        inside = np.all((idx >= 0) & (idx < shape), axis=0)
        moving = np.flatnonzero(inside)[self._active[tuple(idx[:, inside])]]
        pts = coords[:, moving]
        for _ in range(n_steps):
            step = np.zeros_like(pts)
            for m, (_, _, velocity, _) in zip(magnitudes, self._expansion, strict=True):
                for k in range(3):
                    step[k] += (m / n_steps) * ndimage.map_coordinates(
                        velocity[k], pts, order=1, mode="nearest"
                    )
            pts = pts + step
        out = coords.copy()
        out[:, moving] = pts
        return out

    def sample(
        self, b: float | Sequence[float], coords: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Aged template and brain mask at voxel coordinates ``coords`` (shape ``(3, N)``).

        The expansion moves template coordinates ``z`` along its flow; intensities (with
        the intensity effects of ``b``) and the mask are then read there (trilinear).
        """
        coords = self.expand(b, coords)
        values = ndimage.map_coordinates(self.intensity(b), coords, order=1, cval=0.0)
        inside = ndimage.map_coordinates(self.mask, coords, order=1, cval=0.0)
        return values, inside

    def render(self, b: float | Sequence[float]) -> np.ndarray:
        """Noise-free aged template on the grid (no nuisance), zero outside the brain."""
        coords = np.indices(self.t1.shape, dtype=np.float64).reshape(3, -1)
        values, inside = self.sample(b, coords)
        return (values * (inside >= 0.5)).reshape(self.t1.shape).astype(np.float32)

    def change(self, b_lo: float, b_hi: float) -> np.ndarray:
        """Absolute noise-free intensity change between two biological ages."""
        return np.abs(self.render(b_hi) - self.render(b_lo))


# --------------------------------------------------------------------------- subjects


@dataclass(frozen=True)
class SubjectSpec:
    index: int
    participant_id: str
    sex: str
    biological_age: float | tuple[float, ...]  # one age, or one regional age per effect
    path: str


class SubjectRenderer:
    """Draws a subject's nuisance and renders its image (the generator's workers use it).

    Parameters
    ----------
    model : AgeingModel
        The aged template the subjects are made from.

    Notes
    -----
    Subject ``index`` always draws the same nuisance (its own seed stream), whatever the
    ages it is rendered at. So :meth:`render_subject` can re-render a subject of a cohort
    with one effect aged differently: a counterfactual that changes nothing else.
    """

    def __init__(self, model: AgeingModel) -> None:
        self.model = model
        c = model.config
        self.config = c
        t = model.template
        self.affine = t.affine
        shape = np.array(t.shape)
        # Voxels that a (larger, shifted) subject brain may reach.
        margin = int(np.ceil(12.0 / c.resolution))
        support = ndimage.binary_dilation(t.mask, iterations=margin)
        self.support = support
        self.points = np.argwhere(support).T.astype(np.float64)  # (3, N) voxel indices
        self.centre = np.argwhere(t.mask).mean(axis=0)
        spacing = c.deformation_spacing_mm / c.resolution  # voxels between control points
        self._upsample = [_linear_weights(int(n), spacing) for n in shape]
        self.control_shape = tuple(w.shape[1] for w in self._upsample)

    def render(self, subject: SubjectSpec) -> np.ndarray:
        """Image of a cohort subject, on the template grid."""
        return self.render_subject(subject.index, subject.sex, subject.biological_age)

    def render_subject(self, index: int, sex: str, ages: float | Sequence[float]) -> np.ndarray:
        """Image of subject ``index`` at biological age ``ages``.

        Parameters
        ----------
        index : int
            The subject's 0-based index in the cohort (it seeds the nuisance).
        sex : {"M", "F"}
            Sex (it sets the mean head size).
        ages : float or sequence of float
            One biological age for every effect, or one regional age per effect.

        Returns
        -------
        numpy.ndarray of float32
            The image on the template grid, zero outside the subject's brain.
        """
        c = self.config
        s = c.nuisance_scale
        rng = np.random.default_rng(
            np.random.SeedSequence(c.seed, spawn_key=(index, SUBJECT_STREAM))
        )
        # Every draw happens whatever the amplitudes, so that the stream stays aligned.
        sex_sign = 0.5 if sex == "M" else -0.5
        log_size = s * (c.head_size_sex_difference * sex_sign + c.head_size_sd * rng.normal())
        angles = np.deg2rad(s * c.rotation_deg) * rng.normal(size=3)
        shift_mm = s * c.translation_mm * rng.normal(size=3)
        gamma = np.exp(s * c.contrast_sd * rng.normal())
        scale = np.exp(s * c.scale_sd * rng.normal())
        fields = self._smooth_fields(rng, 4)
        noise = rng.standard_normal(self.points.shape[1]).astype(np.float32)

        # Output voxel y -> template voxel z: rigid misregistration and head size about the
        # brain's centre, plus the smooth random deformation (in mm, converted to voxels).
        rot = _rotation(angles) / np.exp(log_size)
        y = self.points
        z = (rot @ (y - self.centre[:, None])) + self.centre[:, None]
        z += (shift_mm / c.resolution)[:, None]
        z += (s * c.deformation_mm / c.resolution) * fields[:3]
        values, inside = self.model.sample(ages, z)

        bias = np.exp(s * c.bias_field_sd * fields[3])
        values = scale * bias * np.power(np.clip(values, 0.0, None), gamma)
        values += (s * c.noise_sd) * noise
        values = np.clip(values, 0.0, None) * (inside >= 0.5)
        out = np.zeros(self.model.t1.shape, dtype=np.float32)
        out[self.support] = values
        return out

    def _smooth_fields(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` smooth unit-variance random fields at the support points.

        White noise on a coarse control grid, smoothed there and upsampled (separable
        trilinear interpolation) to the grid: cheap, and smooth on the scale of
        ``deformation_spacing_mm``.
        """
        coarse = rng.standard_normal((n,) + self.control_shape)
        out = np.empty((n, self.points.shape[1]), dtype=np.float64)
        wx, wy, wz = self._upsample
        for k in range(n):
            smooth = ndimage.gaussian_filter(coarse[k], 1.0, mode="nearest")
            smooth /= max(float(smooth.std()), 1e-6)
            fine = np.tensordot(wx, smooth, axes=(1, 0))
            fine = np.tensordot(fine, wy, axes=(1, 1))  # (X, cz, Y)
            fine = np.tensordot(fine, wz, axes=(1, 1))  # (X, Y, Z)
            out[k] = fine[self.support]
        return out

    def write(self, subject: SubjectSpec) -> bool:
        """Render and save a subject unless a valid file exists; True if written."""
        path = Path(subject.path)
        if valid_image(path, self.model.template):
            return False
        img = self.model.template.to_image(self.render(subject))
        img.set_data_dtype(np.int16)  # nibabel picks the scaling (scl_slope)
        save_nifti(img, path)
        return True


def _linear_weights(n: int, spacing: float) -> np.ndarray:
    """Matrix of linear interpolation from control points (spacing, offset 1) to ``n`` voxels."""
    pos = np.arange(n) / spacing + 1.0
    lo = np.floor(pos).astype(int)
    frac = pos - lo
    weights = np.zeros((n, int(lo.max()) + 2))
    weights[np.arange(n), lo] = 1.0 - frac
    weights[np.arange(n), lo + 1] = frac
    return weights


def _rotation(angles: np.ndarray) -> np.ndarray:
    """Rotation matrix from three angles (radians) about x, y and z."""
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def valid_image(path: Path, template: Template) -> bool:
    """True if ``path`` is a readable image on the template grid."""
    if not path.is_file():
        return False
    try:
        img = nib.load(path)
        ok = img.shape == template.shape and np.allclose(img.affine, template.affine)
        return bool(ok and np.isfinite(np.asarray(img.dataobj)).all())
    except Exception:  # noqa: BLE001 - any unreadable file is simply regenerated
        return False
