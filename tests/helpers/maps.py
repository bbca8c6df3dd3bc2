"""Tiny in-memory data for the importance-map tests (H4).

A 16^3 "brain" is split into eight octant regions. Age is planted in one of them only:
its intensity rises linearly with age. :class:`RegionPredictor` is a tiny frozen CNN whose
output depends only on that region's mean intensity, so every faithful importance map must
rank the planted region first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

SHAPE = (16, 16, 16)
AGE_MIN, AGE_MAX = 45.0, 85.0
#: Intensity of the planted region at AGE_MIN and its rise up to AGE_MAX.
BASE, RISE = 0.2, 0.6


@dataclass
class ToyAtlas:
    """Duck-typed stand-in for :class:`brainage_core.data.atlas.Atlas`."""

    labels: np.ndarray
    names: list[str]
    affine: np.ndarray
    resolution: int = 8


@dataclass
class ToyData:
    images: torch.Tensor  # (N, 1, X, Y, Z)
    ages: torch.Tensor  # (N,)
    brain: np.ndarray  # bool grid
    truth: np.ndarray  # bool grid: the planted region
    atlas: ToyAtlas
    planted: str


def make_atlas(shape: tuple[int, int, int] = SHAPE) -> ToyAtlas:
    """Eight octant regions filling a box 2 voxels inside the grid."""
    labels = np.zeros(shape, dtype=np.int16)
    lo = 2
    hi = [s - 2 for s in shape]
    mid = [(lo + h) // 2 for h in hi]
    names = ["Background"]
    label = 0
    for i in range(2):
        for j in range(2):
            for k in range(2):
                label += 1
                xs = slice(lo, mid[0]) if i == 0 else slice(mid[0], hi[0])
                ys = slice(lo, mid[1]) if j == 0 else slice(mid[1], hi[1])
                zs = slice(lo, mid[2]) if k == 0 else slice(mid[2], hi[2])
                labels[xs, ys, zs] = label
                names.append(f"Region {chr(ord('A') + label - 1)}")
    affine = np.diag([8.0, 8.0, 8.0, 1.0])
    affine[:3, 3] = [-60.0, -80.0, -50.0]
    return ToyAtlas(labels=labels, names=names, affine=affine)


def make_data(n: int = 24, *, planted: str = "Region C", seed: int = 0, shape=SHAPE) -> ToyData:
    """Images whose ``planted`` region brightens with age; the rest is age-free texture."""
    rng = np.random.default_rng(seed)
    atlas = make_atlas(shape)
    brain = atlas.labels > 0
    truth = atlas.labels == atlas.names.index(planted)
    # A fixed anatomy: each region has its own base intensity, shared by all subjects.
    base = np.linspace(0.35, 0.75, len(atlas.names))[atlas.labels] * brain
    ages = rng.uniform(AGE_MIN, AGE_MAX, size=n)
    images = np.empty((n, 1, *shape), dtype=np.float32)
    for i, age in enumerate(ages):
        img = base + 0.03 * rng.standard_normal(shape)
        img[truth] = BASE + RISE * (age - AGE_MIN) / (AGE_MAX - AGE_MIN)
        img[truth] += 0.03 * rng.standard_normal(int(truth.sum()))
        images[i, 0] = img * brain
    return ToyData(
        images=torch.from_numpy(images),
        ages=torch.tensor(ages, dtype=torch.float32),
        brain=brain,
        truth=truth,
        atlas=atlas,
        planted=planted,
    )


class RegionPredictor(nn.Module):
    """A tiny CNN predicting age from the mean intensity of one region only.

    ``f(x) = AGE_MIN + (AGE_MAX - AGE_MIN) * (mean_region(conv(x)) - BASE) / RISE`` with an
    identity 1x1x1 convolution, so it has weights (to check they never change) and is
    exact on clean :func:`make_data` images up to their small texture noise.
    """

    def __init__(self, region: np.ndarray) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 1, kernel_size=1)
        self.head = nn.Linear(1, 1)
        with torch.no_grad():
            self.conv.weight.fill_(1.0)
            self.conv.bias.zero_()
            scale = (AGE_MAX - AGE_MIN) / RISE
            self.head.weight.fill_(scale)
            self.head.bias.fill_(AGE_MIN - scale * BASE)
        weights = torch.as_tensor(region, dtype=torch.float32)
        self.register_buffer("weights", weights / weights.sum())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        pooled = (h[:, 0] * self.weights).flatten(1).sum(1, keepdim=True)
        return self.head(pooled)[:, 0]


# -- a tiny prepared cohort on the real 8 mm template grid ----------------------------------
PLANTED_PATTERN = "Precentral"


def make_cohort(root, n: int = 20, *, seed: int = 0, pattern: str = PLANTED_PATTERN):
    """A prepared cohort (through the real data layer) with age planted in one atlas region.

    Images are the 8 mm template with mild per-subject noise; inside the regions matching
    ``pattern`` the intensity falls linearly with age. Returns ``(cohort, region_mask)``.
    """
    import nibabel as nib
    import pandas as pd

    from brainage_core._utils.io import save_nifti
    from brainage_core.data.atlas import load_atlas
    from brainage_core.data.cache import prepare_cohort
    from brainage_core.data.template import load_template

    template = load_template(8)
    region = load_atlas(8).region_mask(pattern) & template.mask
    rng = np.random.default_rng(seed)
    ages = rng.uniform(AGE_MIN, AGE_MAX, size=n)
    rows = []
    for i, age in enumerate(ages):
        img = template.t1.astype(np.float32) * (1 + 0.05 * rng.standard_normal(template.shape))
        img[region] *= 1.3 - 0.8 * (age - AGE_MIN) / (AGE_MAX - AGE_MIN)
        img = (img * template.mask).astype(np.float32)
        path = save_nifti(template.to_image(img), root / "raw" / f"sub-{i:03d}_T1w.nii.gz")
        rows.append(
            {
                "participant_id": f"sub-{i:03d}",
                "path": str(path),
                "age": float(age),
                "sex": "F" if i % 2 else "M",
                "site": "toy",
            }
        )
    manifest = pd.DataFrame(rows)
    assert isinstance(nib.load(rows[0]["path"]), nib.Nifti1Image)
    cohort = prepare_cohort(
        manifest,
        root / "cache",
        resolution=8,
        n_jobs=1,
        progress=False,
        split_fractions=(0.6, 0.2, 0.2),
    )
    return cohort, region


def fit_region_predictor(cohort, region: np.ndarray) -> RegionPredictor:
    """A :class:`RegionPredictor` whose linear head is fitted to the cohort's ages."""
    images = np.asarray(cohort.images, dtype=np.float64)
    means = images[:, region].mean(axis=1)
    ages = cohort.table["age"].to_numpy(dtype=float)
    slope, intercept = np.polyfit(means, ages, 1)
    model = RegionPredictor(region)
    with torch.no_grad():
        model.head.weight.fill_(float(slope))
        model.head.bias.fill_(float(intercept))
    return model
