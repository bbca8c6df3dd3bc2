"""Rendering synthetic subjects: the aged template, then individual anatomy and scanner.

The ageing is planted on a fine grid (``render_resolution``); every image is rendered on
the study grid split into ``k**3`` sub-voxels and averaged back (partial volume).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from brainage_core._utils.io import save_nifti, write_json
from brainage_core._utils.validation import (
    BrainAgeInputError,
)
from brainage_core.data.atlas import load_atlas
from brainage_core.data.synth.ages import SUBJECT_STREAM
from brainage_core.data.synth.config import MAX_FRACTION, AgeEffect, SynthConfig
from brainage_core.data.synth.native import NATIVE_STREAM, NativeSpace, to_native, transform_path
from brainage_core.data.template import Template, load_template

#: Largest deformation gradient of one integration step of an expansion flow (keeps every
#: step, hence the whole flow, invertible).
_MAX_STEP_STRAIN = 0.8


# --------------------------------------------------------------------------- ageing model


def render_grid(resolution: int, render_resolution: int) -> tuple[int, int]:
    """The fine grid a cohort is rendered on: ``(fine resolution in mm, factor k)``.

    Images of a ``resolution`` mm cohort are rendered on a grid ``k`` times finer (every
    study voxel split into ``k**3`` sub-voxels) and averaged back (partial volume). The fine
    grid is ``render_resolution`` mm when it divides ``resolution``, else 1 mm; a cohort at
    least as fine as ``render_resolution`` is rendered on its own grid (``k = 1``).
    """
    if resolution <= render_resolution:
        return resolution, 1
    fine = render_resolution if resolution % render_resolution == 0 else 1
    return fine, resolution // fine


@dataclass(frozen=True)
class _Structure:
    """One connected component of a shrinking structure, on the fine grid."""

    label: np.ndarray  # float32 0/1 on the fine grid
    centre: np.ndarray  # (3, 1) centroid, fine voxels
    lo: np.ndarray  # (3, 1) bounding box (fine voxels, with a margin)
    hi: np.ndarray


class AgeingModel:
    """The template, aged in template space on a fine grid: what every subject is made from.

    Parameters
    ----------
    config : SynthConfig
        The cohort's parameters (its resolution, render resolution, effects and
        ground-truth threshold).
    effects : list of AgeEffect or None, default=None
        Effects to plant instead of ``config.effects`` (used for per-effect ground truth).

    Attributes
    ----------
    template : Template
        The study grid (``config.resolution``); images and ground truth live on it.
    fine : Template
        The fine grid the ageing is planted on and images are rendered at.
    factor : int
        Sub-voxels per study voxel along each axis.
    csf_intensity : float
        Template intensity of CSF (median in the ventricles), the value that fills the
        space left by atrophy and thinning.
    region_names : list of list of str
        Atlas regions matched by each effect.
    """

    def __init__(self, config: SynthConfig, effects: list[AgeEffect] | None = None) -> None:
        self.config = config
        self.effects = list(config.effects if effects is None else effects)
        self.template: Template = load_template(config.resolution)
        fine_res, self.factor = render_grid(config.resolution, config.render_resolution)
        self.fine: Template = load_template(fine_res)
        atlas = load_atlas(fine_res)
        t = self.fine
        self.t1 = np.asarray(t.t1, dtype=np.float32)
        self.mask = t.mask.astype(np.float32)
        self.csf_intensity = float(np.median(t.t1[(t.csf > 0.9) & t.mask]))
        res = float(fine_res)
        self.region_names = [atlas.region_names(e.regions) for e in self.effects]
        # Study voxel -> fine voxel of the render grid's sub-voxels: render voxel r (on the
        # study grid split k times) sits at study voxel (r + 0.5) / k - 0.5.
        k = self.factor
        render_to_mm = self.template.affine @ np.array(
            [[1 / k, 0, 0, (1 / k - 1) / 2], [0, 1 / k, 0, (1 / k - 1) / 2],
             [0, 0, 1 / k, (1 / k - 1) / 2], [0, 0, 0, 1]]
        )
        self.render_to_fine = np.linalg.inv(t.affine) @ render_to_mm
        self.render_shape = tuple(int(s) * k for s in self.template.shape)
        # (index of the effect, effect, ...): the index picks the effect's regional age.
        self._blend: list[tuple[int, AgeEffect, np.ndarray]] = []
        self._thinning: list[tuple[int, AgeEffect, np.ndarray, np.ndarray, np.ndarray]] = []
        self._atrophy: list[tuple[int, AgeEffect, list[_Structure]]] = []
        self._expansion: list[tuple[int, AgeEffect, np.ndarray, float]] = []
        for idx, effect in enumerate(self.effects):
            region = atlas.region_mask(effect.regions).astype(np.float32)
            if not region.any():
                raise BrainAgeInputError(
                    f"the regions {effect.regions} of a {effect.kind} effect have no voxels on "
                    f"the {fine_res} mm grid; choose larger regions or a finer grid."
                )
            sigma = effect.sigma_mm / res
            soft = ndimage.gaussian_filter(region, sigma) if sigma > 0 else region
            if effect.kind == "ventricle_expansion":
                grad = np.stack(np.gradient(soft)).astype(np.float32)  # per voxel
                norm = max(float(np.sqrt((grad**2).sum(axis=0)).max()), 1e-12)
                # Velocity of unit top speed (1 mm per unit of strength), in voxels.
                velocity = grad / (norm * res)
                strain = np.sqrt(
                    sum((np.stack(np.gradient(velocity[j])) ** 2).sum(axis=0) for j in range(3))
                )
                self._expansion.append((idx, effect, velocity, float(strain.max())))
            elif effect.kind == "atrophy":
                self._atrophy.append((idx, effect, _structures((region > 0.5) & t.mask)))
            elif effect.kind == "cortical_thinning":
                weight = (np.clip(soft, 0, 1) * t.mask).astype(np.float32)
                depth, thickness = _cortical_depth(t, res)
                self._thinning.append((idx, effect, weight, depth, thickness))
            else:  # intensity-only effects (the earlier generator's atrophy and thinning)
                tissue = t.gm if effect.kind == "cortical_thinning_intensity" else t.gm + t.wm
                weight = np.clip(soft, 0, 1) * np.clip(tissue, 0, 1) * t.mask
                self._blend.append((idx, effect, weight.astype(np.float32)))
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

    def magnitude(self, effect: AgeEffect, age: float) -> float:
        """The effect's magnitude ``strength * h`` at a regional age (fractions kept < 1)."""
        m = effect.strength * float(effect.profile(age))
        return m if effect.kind == "ventricle_expansion" else min(m, MAX_FRACTION)

    def intensity(self, b: float | Sequence[float]) -> np.ndarray:
        """Fine-grid template intensities with the cortical thinning of age ``b``.

        The grey-matter ribbon of the thinned regions loses the outer fraction ``m`` of its
        local thickness: a voxel at depth ``d`` below the pial surface, in a ribbon of
        thickness ``T``, becomes CSF once ``d < m T`` (partial volume over one fine voxel),
        so the pial boundary moves inward and the sulcal CSF widens. The white-matter
        boundary stays. Intensity-only effects (the ``*_intensity`` kinds) blend tissue
        toward CSF instead.
        """
        if not self._thinning and not self._blend:
            return self.t1
        ages = self.effect_ages(b)
        w = np.zeros_like(self.t1)
        res = float(self.fine.resolution)
        for k, effect, weight, depth, thickness in self._thinning:
            m = self.magnitude(effect, ages[k])
            if m > 0:
                lost = np.clip((m * thickness - depth) / res + 0.5, 0.0, 1.0)
                w += weight * lost.astype(np.float32)
        for k, effect, weight in self._blend:
            w += np.float32(self.magnitude(effect, ages[k])) * weight
        np.clip(w, 0.0, 1.0, out=w)
        return self.t1 + w * (np.float32(self.csf_intensity) - self.t1)

    def expand(self, b: float | Sequence[float], coords: np.ndarray) -> np.ndarray:
        """Move fine-grid coordinates (voxels, ``(3, N)``) along the expansion flow at ``b``.

        The displacement is the flow of the velocity ``sum_k m_k(b) u_k`` over unit time,
        integrated with enough Euler steps that each step is invertible, so the deformation
        never folds however strong the effect. Points move toward the ventricles' centre, so
        sampling the template there makes the CSF spaces grow.
        """
        if not self._expansion:
            return coords
        ages = self.effect_ages(b)
        magnitudes = [self.magnitude(e, ages[k]) for k, e, _, _ in self._expansion]
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

    def shrink_scale(self, effect: AgeEffect, age: float) -> float:
        """Linear scale of an atrophying structure: its Jacobian ``scale**3 = 1 - m``."""
        return float((1.0 - self.magnitude(effect, age)) ** (1.0 / 3.0))

    def sample(
        self, b: float | Sequence[float], coords: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Aged template and brain mask at fine-grid voxel coordinates ``coords`` ``(3, N)``.

        The expansion moves coordinates along its flow; intensities (with the cortical
        thinning of ``b``) and the mask are read there (trilinear). Each atrophying
        structure then shrinks about its centroid by the linear scale ``s = (1 - m)**(1/3)``
        (a deformation with Jacobian ``1 - m`` inside it): with ``p`` the structure's
        occupancy at a point and ``p_w`` that of the shrunk structure, the intensity is
        ``p_w T_w + max(p - p_w, 0) c_csf + (1 - max(p, p_w)) I``, where ``T_w`` is the
        template read through the shrinking map, ``c_csf`` the CSF intensity that fills the
        space, and ``I`` the intensity without the structure's ageing.
        """
        coords = self.expand(b, coords)
        image = self.intensity(b)
        values = ndimage.map_coordinates(image, coords, order=1, cval=0.0)
        inside = ndimage.map_coordinates(self.mask, coords, order=1, cval=0.0)
        if self._atrophy:
            ages = self.effect_ages(b)
            csf = np.float32(self.csf_intensity)
            for k, effect, structures in self._atrophy:
                s = self.shrink_scale(effect, ages[k])
                if s >= 1.0:
                    continue
                for st in structures:
                    sel = np.flatnonzero(np.all((coords >= st.lo) & (coords <= st.hi), axis=0))
                    if not sel.size:
                        continue
                    pts = coords[:, sel]
                    warped = st.centre + (pts - st.centre) / s
                    p = ndimage.map_coordinates(st.label, pts, order=1, cval=0.0)
                    p_w = ndimage.map_coordinates(st.label, warped, order=1, cval=0.0)
                    t_w = ndimage.map_coordinates(image, warped, order=1, cval=0.0)
                    values[sel] = (p_w * t_w + np.maximum(p - p_w, 0.0) * csf
                                   + (1.0 - np.maximum(p, p_w)) * values[sel])
        return values, inside

    def warped_label(self, b: float | Sequence[float], effect_index: int) -> np.ndarray:
        """Occupancy (fine grid) of an atrophy effect's structures at age ``b``.

        Its sum is the structures' volume in fine voxels: ``(1 - m)`` times the young one.
        """
        ages = self.effect_ages(b)
        for k, effect, structures in self._atrophy:
            if k == effect_index:
                s = self.shrink_scale(effect, ages[k])
                grid = np.indices(self.t1.shape, dtype=np.float64).reshape(3, -1)
                out = np.zeros(grid.shape[1], dtype=np.float32)
                for st in structures:
                    warped = st.centre + (grid - st.centre) / s
                    out += ndimage.map_coordinates(st.label, warped, order=1, cval=0.0)
                return out.reshape(self.t1.shape)
        raise BrainAgeInputError(f"effect {effect_index} is not an atrophy effect.")

    def render_fine(self, b: float | Sequence[float]) -> np.ndarray:
        """Noise-free aged template on the fine grid (no nuisance), zero outside the brain."""
        coords = np.indices(self.t1.shape, dtype=np.float64).reshape(3, -1)
        values, inside = self.sample(b, coords)
        return (values * (inside >= 0.5)).reshape(self.t1.shape).astype(np.float32)

    def render(self, b: float | Sequence[float]) -> np.ndarray:
        """Noise-free aged template on the study grid (no nuisance), zero outside the brain.

        Rendered on the fine render grid and averaged over each study voxel's sub-voxels
        (partial volume), exactly as the subjects are.
        """
        grid = np.indices(self.render_shape, dtype=np.float64).reshape(3, -1)
        values, inside = self.sample(b, self.to_fine(grid))
        return block_mean((values * (inside >= 0.5)).reshape(self.render_shape), self.factor)

    def to_fine(self, render_coords: np.ndarray) -> np.ndarray:
        """Render-grid voxel coordinates ``(3, N)`` to fine-grid voxel coordinates."""
        m = self.render_to_fine
        return m[:3, :3] @ render_coords + m[:3, 3:4]

    def change(self, b_lo: float, b_hi: float) -> np.ndarray:
        """Absolute noise-free intensity change between two biological ages (study grid)."""
        return np.abs(self.render(b_hi) - self.render(b_lo))


def block_mean(volume: np.ndarray, factor: int) -> np.ndarray:
    """Mean over ``factor**3`` blocks: a fine render averaged onto the study grid."""
    if factor == 1:
        return volume.astype(np.float32)
    x, y, z = (s // factor for s in volume.shape)
    blocks = volume.reshape(x, factor, y, factor, z, factor)
    return blocks.mean(axis=(1, 3, 5), dtype=np.float64).astype(np.float32)


def _structures(mask: np.ndarray) -> list[_Structure]:
    """The connected components of a structure (e.g. left and right hippocampus)."""
    labels, n = ndimage.label(mask)
    out = []
    for j in range(1, n + 1):
        comp = labels == j
        idx = np.argwhere(comp)
        out.append(
            _Structure(
                label=comp.astype(np.float32),
                centre=idx.mean(axis=0)[:, None],
                lo=(idx.min(axis=0) - 1.5)[:, None],
                hi=(idx.max(axis=0) + 1.5)[:, None],
            )
        )
    return out


def _cortical_depth(template: Template, res: float) -> tuple[np.ndarray, np.ndarray]:
    """Depth below the pial surface and local ribbon thickness (mm) of grey-matter voxels.

    Grey matter is where its probability exceeds white matter's and CSF's. The depth is
    the distance to the nearest CSF or non-brain voxel, the thickness that depth plus the
    distance to the nearest white-matter voxel (each measured to the boundary halfway
    between voxel centres). Elsewhere the depth is infinite (never thinned).
    """
    gm, wm, csf = template.gm, template.wm, template.csf
    grey = template.mask & (gm >= wm) & (gm >= csf) & (gm > 0.2)
    outside = ~template.mask | ((csf > gm) & (csf >= wm))
    white = template.mask & (wm > gm) & (wm >= csf)
    to_out = ndimage.distance_transform_edt(~outside) * res - 0.5 * res
    to_white = ndimage.distance_transform_edt(~white) * res - 0.5 * res
    depth = np.where(grey, to_out, np.inf).astype(np.float32)
    thickness = np.where(grey, to_out + to_white, 0.0).astype(np.float32)
    return depth, thickness


# --------------------------------------------------------------------------- subjects


@dataclass(frozen=True)
class _Draws:
    """A subject's random draws (:meth:`SubjectRenderer._draws`)."""

    log_size: float
    angles: np.ndarray
    shift_mm: np.ndarray
    gamma: np.float64  # numpy scalars: they keep the rendering in float64 (NEP 50)
    scale: np.float64
    coarse: np.ndarray
    local: np.ndarray
    noise: np.ndarray


@dataclass(frozen=True)
class SubjectSpec:
    """What a worker needs to render and write one subject."""

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

    Each image is rendered on the fine render grid (every study voxel split into
    ``model.factor**3`` sub-voxels), then averaged over each study voxel (partial volume),
    and the scanner noise is added on the study grid.
    """

    def __init__(self, model: AgeingModel) -> None:
        self.model = model
        c = model.config
        self.config = c
        t = model.template
        self.affine = t.affine
        k = model.factor
        # Study voxels that a (larger, shifted) subject brain may reach, and their sub-voxels.
        margin = int(np.ceil(12.0 / c.resolution))
        support = ndimage.binary_dilation(t.mask, iterations=margin)
        self.support = support
        fine_support = support
        for axis in range(3):
            fine_support = np.repeat(fine_support, k, axis=axis)
        self.fine_support = fine_support
        self.points = np.argwhere(fine_support).T.astype(np.float64)  # (3, N) render voxels
        self.centre = (np.argwhere(t.mask).mean(axis=0) + 0.5) * k - 0.5
        self.render_mm = c.resolution / k  # render-grid spacing
        shape = np.array(model.render_shape)
        self._upsample = {
            spacing: [_linear_weights(int(n), spacing / self.render_mm) for n in shape]
            for spacing in (c.deformation_spacing_mm, c.local_deformation_spacing_mm)
        }

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
        draws = self._draws(index, sex)
        z = self._template_points(draws)
        values, inside = self.model.sample(ages, self.model.to_fine(z))

        bias = np.exp(s * c.bias_field_sd * draws.coarse[3])
        values = draws.scale * bias * np.power(np.clip(values, 0.0, None), draws.gamma)
        values = values * (inside >= 0.5)
        fine = np.zeros(self.model.render_shape, dtype=np.float32)
        fine[self.fine_support] = values
        brain = np.zeros(self.model.render_shape, dtype=np.float32)
        brain[self.fine_support] = inside >= 0.5
        out = block_mean(fine, self.model.factor)
        in_brain = block_mean(brain, self.model.factor)[self.support] > 0
        out[self.support] += (s * c.noise_sd) * draws.noise * in_brain
        return np.clip(out, 0.0, None)

    def _draws(self, index: int, sex: str) -> _Draws:
        """Every random draw of subject ``index``, in the stream's order."""
        c = self.config
        s = c.nuisance_scale
        rng = np.random.default_rng(
            np.random.SeedSequence(c.seed, spawn_key=(index, SUBJECT_STREAM))
        )
        # Every draw happens whatever the amplitudes, so that the stream stays aligned.
        log_size, angles, shift_mm = self._draw_pose(rng, sex)
        gamma = np.exp(s * c.contrast_sd * rng.normal())
        scale = np.exp(s * c.scale_sd * rng.normal())
        coarse = self._smooth_fields(rng, 4, c.deformation_spacing_mm)
        local = self._smooth_fields(rng, 3, c.local_deformation_spacing_mm)
        noise = rng.standard_normal(int(self.support.sum())).astype(np.float32)
        return _Draws(log_size, angles, shift_mm, gamma, scale, coarse, local,
                      noise)

    def _template_points(self, draws: _Draws) -> np.ndarray:
        """Render voxel y -> render voxel z of the template, for every render point (3, N).

        Rigid misregistration and head size about the brain's centre, plus the multi-scale
        smooth deformation (individual anatomy; mm converted to render voxels).
        """
        c = self.config
        s = c.nuisance_scale
        rot = _rotation(draws.angles) / np.exp(draws.log_size)
        y = self.points
        z = (rot @ (y - self.centre[:, None])) + self.centre[:, None]
        z += (draws.shift_mm / self.render_mm)[:, None]
        z += (s * c.deformation_mm / self.render_mm) * draws.coarse[:3]
        z += (s * c.local_deformation_mm / self.render_mm) * draws.local
        return z

    def subject_affine_fit(self, index: int, sex: str) -> tuple[np.ndarray, float]:
        """The best affine of a subject's whole anatomy: ``subject_from_template`` (4x4, mm).

        :meth:`subject_affine` leaves the smooth deformations out; but a smooth field on a
        coarse grid has an affine part of its own (a slight stretch, tilt or shift of the
        whole brain), which an affine registration recovers with the rest. This is the
        least-squares affine from each template point to the subject's point showing it,
        over the template brain: the transform an ideal affine registration finds.

        Returns
        -------
        subject_from_template : numpy.ndarray of shape (4, 4)
            The fitted affine (mm).
        nonaffine_mm : float
            Mean distance over those points between the fit and the whole mapping: the
            part of the anatomy no affine holds.
        """
        z = self._template_points(self._draws(index, sex))
        k = self.model.factor
        t = self.model.template
        # render voxel -> study voxel of the same point -> mm
        to_mm = t.affine @ np.diag([1.0 / k, 1.0 / k, 1.0 / k, 1.0])
        to_mm[:3, 3] += t.affine[:3, :3] @ np.full(3, 0.5 / k - 0.5)
        z_mm = nib.affines.apply_affine(to_mm, z.T)
        y_mm = nib.affines.apply_affine(to_mm, self.points.T)
        voxel = np.rint(nib.affines.apply_affine(np.linalg.inv(t.affine), z_mm)).astype(int)
        inside = np.all((voxel >= 0) & (voxel < np.asarray(t.shape)), axis=1)
        inside[inside] = t.mask[tuple(voxel[inside].T)]
        design = np.c_[z_mm[inside], np.ones(int(inside.sum()))]
        coef, *_ = np.linalg.lstsq(design, y_mm[inside], rcond=None)
        out = np.eye(4)
        out[:3, :] = coef.T
        nonaffine = np.linalg.norm(design @ coef - y_mm[inside], axis=1).mean()
        return out, float(nonaffine)

    def _draw_pose(self, rng: np.random.Generator, sex: str
                   ) -> tuple[float, np.ndarray, np.ndarray]:
        """The first draws of a subject's stream: log head size, rotation angles, shift."""
        c = self.config
        s = c.nuisance_scale
        sex_sign = 0.5 if sex == "M" else -0.5
        log_size = s * (c.head_size_sex_difference * sex_sign + c.head_size_sd * rng.normal())
        angles = np.deg2rad(s * c.rotation_deg) * rng.normal(size=3)
        shift_mm = s * c.translation_mm * rng.normal(size=3)
        return float(log_size), angles, shift_mm

    def subject_affine(self, index: int, sex: str) -> np.ndarray:
        """The affine part of a subject's nuisance: ``subject_from_template`` (4x4, mm).

        Head size, rotation and shift about the brain's centre (the smooth deformations,
        which no affine holds, are left out): where a point of the template lands in the
        subject's MNI-space image.
        """
        rng = np.random.default_rng(
            np.random.SeedSequence(self.config.seed, spawn_key=(index, SUBJECT_STREAM)))
        log_size, angles, shift_mm = self._draw_pose(rng, sex)
        t = self.model.template
        centre = nib.affines.apply_affine(t.affine, np.argwhere(t.mask).mean(axis=0))
        inverse = np.exp(log_size) * _rotation(angles).T  # inv(rotation / size)
        out = np.eye(4)
        out[:3, :3] = inverse
        out[:3, 3] = centre - inverse @ (centre + shift_mm)
        return out

    def _smooth_fields(self, rng: np.random.Generator, n: int, spacing: float) -> np.ndarray:
        """``n`` smooth unit-variance random fields at the render points.

        White noise on a control grid of the given spacing (mm), smoothed there and
        upsampled (separable trilinear interpolation) to the render grid.
        """
        wx, wy, wz = self._upsample[spacing]
        coarse = rng.standard_normal((n, wx.shape[1], wy.shape[1], wz.shape[1]))
        out = np.empty((n, self.points.shape[1]), dtype=np.float64)
        for k in range(n):
            smooth = ndimage.gaussian_filter(coarse[k], 1.0, mode="nearest")
            smooth /= max(float(smooth.std()), 1e-6)
            fine = np.tensordot(wx, smooth, axes=(1, 0))
            fine = np.tensordot(fine, wy, axes=(1, 1))  # (X, cz, Y)
            fine = np.tensordot(fine, wz, axes=(1, 1))  # (X, Y, Z)
            out[k] = fine[self.fine_support]
        return out

    def write(self, subject: SubjectSpec) -> bool:
        """Render and save a subject unless a valid file exists; True if written.

        With ``native_space`` set, the image is written in its native space and the
        transform goes to the ground truth first (an image never exists without it).
        """
        path = Path(subject.path)
        native = NativeSpace.from_dict(self.config.native_space)
        root = path.parents[2]  # <root>/sub-X/anat/<file>
        if native is None and valid_image(path, self.model.template):
            return False
        if native is not None and _valid_native(path, transform_path(root,
                                                                    subject.participant_id)):
            return False
        img = self.model.template.to_image(self.render(subject))
        if native is not None:
            rng = np.random.default_rng(np.random.SeedSequence(
                self.config.seed, spawn_key=(subject.index, NATIVE_STREAM)))
            t = self.model.template
            centre = nib.affines.apply_affine(t.affine, np.argwhere(t.mask).mean(axis=0))
            img, pose = to_native(img, native, rng, centre, self.config.resolution)
            drawn = self.subject_affine(subject.index, subject.sex)
            fitted, nonaffine = self.subject_affine_fit(subject.index, subject.sex)
            write_json(transform_path(root, subject.participant_id), {
                "native_from_mni": pose.tolist(),
                "native_from_template": (pose @ fitted).tolist(),
                "native_from_template_drawn": (pose @ drawn).tolist(),
                "nonaffine_mm": nonaffine,
                "description": "RAS+ mm. native_from_mni: the head pose, a point of the "
                               "subject's MNI-space image -> the same point of the native "
                               "image. native_from_template: a point of the template -> "
                               "the native image, through the best affine (least squares "
                               "over the template brain) of the subject's whole anatomy: "
                               "what an affine registration to the template should find. "
                               "native_from_template_drawn: the same through the drawn "
                               "head size, rotation and shift alone (without the affine "
                               "part of the smooth deformations). nonaffine_mm: mean "
                               "distance over the brain between the best affine and the "
                               "whole anatomy (what no affine holds).",
                "native_space": native.to_dict(),
            })
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


def _valid_native(path: Path, sidecar: Path) -> bool:
    """True if a native-space image and its recorded transform are both readable."""
    if not (path.is_file() and sidecar.is_file()):
        return False
    try:
        return bool(np.isfinite(np.asarray(nib.load(path).dataobj)).all())
    except Exception:  # noqa: BLE001 - any unreadable file is simply regenerated
        return False


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
