"""Each picture builds on tiny inputs, has a title and labelled axes, and renders to PNG."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from imsvd import plots
from imsvd.errors import DataError

# Rendered pictures are kept here so a person can look at them after the run.
OUT = Path(os.environ.get("IMSVD_PLOT_DIR", "/tmp/imsvd_plots"))


def _soft_codes(n: int, blocks: int, bins: int, seed: int, sharpness: float = 3.0) -> np.ndarray:
    """(N, B, bin) softmax codes of random logits."""
    logits = sharpness * np.random.default_rng(seed).normal(size=(n, blocks, bins))
    e = np.exp(logits - logits.max(2, keepdims=True))
    return e / e.sum(2, keepdims=True)


def _render(fig: Figure, name: str) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.png"
    fig.savefig(path)
    assert path.stat().st_size > 5_000
    return path


def _titled(fig: Figure) -> bool:
    return bool((fig._suptitle and fig._suptitle.get_text()) or any(ax.get_title() for ax in fig.axes))


def _labelled(fig: Figure) -> bool:
    supx = fig._supxlabel.get_text() if fig._supxlabel else ""
    main = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    return bool(supx or any(ax.get_xlabel() for ax in main)) and any(ax.get_ylabel() for ax in main)


def test_joint_matrix_figure():
    codes = _soft_codes(500, 6, 8, seed=0).reshape(500, -1)
    codes2 = codes  # the same view twice: diagonal blocks are sharp diagonals
    joint = codes.T @ codes2 / len(codes)
    fig = plots.joint_matrix_figure(joint, bin_size=8, blocks=4)
    assert isinstance(fig, Figure) and _titled(fig) and _labelled(fig)
    colourbar = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert colourbar and "log" in colourbar[0].get_ylabel()
    _render(fig, "joint_matrix")
    with pytest.raises(DataError):
        plots.joint_matrix_figure(joint, bin_size=5)


def test_attribution_figure():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(40, 12, 12, 3), dtype=np.uint8)
    images[:, 3:9, 3:9] = (np.arange(40)[:, None, None, None] * 6).astype(np.uint8)  # visible variety
    codes = _soft_codes(40, 3, 8, seed=1)
    fig = plots.attribution_figure(images, codes, block=1, units=4, per_unit=5)
    assert isinstance(fig, Figure) and _titled(fig) and _labelled(fig)
    assert len(fig.axes) == 4 * 5
    assert fig.axes[0].get_xlabel().startswith("p = ")
    _render(fig, "attribution")
    gray = plots.attribution_figure(images[..., :1], codes, block=0, units=[0, 7], per_unit=3)
    assert len(gray.axes) == 6
    _render(gray, "attribution_gray")


def test_bin_occupancy_figure():
    codes = _soft_codes(300, 8, 16, seed=2)
    codes[:, 0] = 0.0
    codes[:, 0, 3] = 1.0  # one collapsed block shows as a single bright cell
    fig = plots.bin_occupancy_figure(codes)
    assert isinstance(fig, Figure) and _titled(fig) and _labelled(fig)
    _render(fig, "bin_occupancy")


def test_loss_curve_figure():
    steps = np.arange(0, 200, 5)
    history = pd.DataFrame(
        {
            "epoch": steps // 40,
            "step": steps,
            "loss": 3 * np.exp(-steps / 60) + 0.5,
            "diagonal": 2 * np.exp(-steps / 50),
            "off_block": np.exp(-steps / 80) + 0.5,
            "lr": 0.1 * np.minimum(1, (steps + 5) / 40) * (1 + np.cos(np.pi * steps / 200)) / 2,
            "images_per_second": 500.0,
        }
    )
    fig = plots.loss_curve_figure(history)
    assert isinstance(fig, Figure) and _titled(fig) and _labelled(fig)
    legends = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    assert {"total (loss)", "diagonal", "off_block", "learning rate"} <= set(legends)
    assert "images_per_second" not in legends
    _render(fig, "loss_curve")
    no_total = plots.loss_curve_figure(history.drop(columns=["loss", "lr"]))
    _render(no_total, "loss_curve_no_total")
    with pytest.raises(DataError, match="step"):
        plots.loss_curve_figure(history.drop(columns=["step"]))


def test_loss_curve_figure_shows_the_online_monitor_in_its_own_panel():
    steps = np.arange(1, 101)
    history = pd.DataFrame(
        {"step": steps, "total": 5 - np.log(steps), "diagonal": -np.log(steps), "data_wait_share": 0.1}
    )
    history["monitor_knn_top1"] = np.where(steps % 25 == 0, 40 + steps / 4, np.nan)
    fig = plots.loss_curve_figure(history)
    assert [ax.get_ylabel() for ax in fig.axes] == ["loss", "loss term", "kNN top-1 (%)"]
    knn = next(ax for ax in fig.axes if ax.get_ylabel() == "kNN top-1 (%)")
    (line,) = knn.get_lines()
    assert list(line.get_xdata()) == [25, 50, 75, 100]
    legends = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    assert "monitor_knn_top1" not in legends and "data_wait_share" not in legends
    _render(fig, "loss_curve_monitor")


@pytest.mark.parametrize(("n", "method"), [(30, "PCA"), (120, "t-SNE")])
def test_embedding_map_figure(n: int, method: str):
    rng = np.random.default_rng(3)
    labels = np.arange(n) % 3
    features = rng.normal(size=(n, 16)) + 4 * np.eye(16)[labels]
    fig = plots.embedding_map_figure(features, labels, ("zero", "one", "two"), seed=0)
    assert isinstance(fig, Figure) and _titled(fig) and _labelled(fig)
    assert method in fig.axes[0].get_title()
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == [f"zero ({n // 3})", f"one ({n // 3})", f"two ({n // 3})"]
    _render(fig, f"embedding_map_{method.lower()}")
