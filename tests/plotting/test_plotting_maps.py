"""Smoke-and-content tests of the map figures."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from helpers.maps import make_atlas  # noqa: E402

from brainage_core.analysis.regions import region_table
from brainage_core.data.template import load_template
from brainage_core.plotting.maps import (
    plot_deletion_curves,
    plot_importance_map,
    plot_method_maps,
    plot_region_ranking,
    plot_tradeoff,
)


@pytest.fixture(scope="module")
def img():
    template = load_template(8)
    data = np.zeros(template.shape, np.float32)
    data[8:12, 10:14, 8:12] = 1.0
    return template.to_image(data * template.mask)


@pytest.mark.parametrize("kind", ["stat", "glass"])
def test_importance_map_saves_a_figure(img, kind, tmp_path):
    out = tmp_path / f"{kind}.png"
    fig = plot_importance_map(img, kind=kind, title="toy", output_file=out)
    assert out.stat().st_size > 1000 and fig.axes
    plt.close(fig)


def test_region_ranking_highlights_planted(tmp_path, rng):
    atlas = make_atlas()
    table = region_table(rng.random(atlas.labels.shape) + (atlas.labels == 2), atlas)
    fig = plot_region_ranking(table, n=5, planted=["Region B"], output_file=tmp_path / "r.svg")
    ax = fig.axes[0]
    bars = ax.patches
    assert len(bars) == 5
    labels = [t.get_text() for t in ax.get_yticklabels()]
    red = [
        lab
        for lab, bar in zip(labels, bars, strict=True)
        if bar.get_facecolor()[0] > 0.8 and bar.get_facecolor()[1] < 0.3
    ]
    assert red == ["Region B"]
    plt.close(fig)


def test_tradeoff_and_deletion_and_method_maps(img, tmp_path):
    curve = pd.DataFrame(
        {
            "lam": [0.1, 1.0],
            "mean_sigma": [0.2, 0.5],
            "mae_rise": [0.1, 0.9],
            "chosen": [False, True],
        }
    )
    fig = plot_tradeoff(curve, tolerance=1.0, output_file=tmp_path / "t.png")
    assert len(fig.axes[0].lines) >= 3
    plt.close(fig)
    curves = pd.DataFrame(
        {"method": ["a", "a", "b", "b"], "fraction": [0, 1, 0, 1], "change": [0, 2, 0, 1]}
    )
    fig = plot_deletion_curves(curves)
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["a", "b"]
    plt.close(fig)
    fig = plot_method_maps({"noise": img, "saliency": img}, output_file=tmp_path / "m.png")
    assert (tmp_path / "m.png").is_file()
    plt.close(fig)
