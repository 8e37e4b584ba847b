"""Pictures of a trained representation: joint matrix, attributions, bin usage, loss, embedding map.

Each function builds and RETURNS a ``matplotlib.figure.Figure`` on the Agg canvas and
saves nothing; the caller (a Kedro dataset, a notebook) decides where it goes. Figures
are created without ``pyplot``, so no global figure registry grows in long runs and no
interactive backend is ever touched.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm, PowerNorm
from matplotlib.figure import Figure

from imsvd.data import Images, LazyImages
from imsvd.errors import DataError
from imsvd.memmaps import read_rows
from imsvd.metrics import CodeStatistics, bin_occupancy, block_marginals

#: Columns of a training history that are not loss terms.
HISTORY_META_COLUMNS = ("epoch", "step", "lr", "images_per_second", "data_wait_share", "monitor_knn_top1")
MONITOR_COLUMN = "monitor_knn_top1"
#: Column names taken as the total loss, in order of preference.
TOTAL_LOSS_COLUMNS = ("loss", "total", "total_loss", "train_loss")
#: Below this many samples the embedding map uses PCA instead of t-SNE.
TSNE_MIN_SAMPLES = 50


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _wrap(text: str, width_inches: float) -> str:
    """Break a title into lines that fit a figure ``width_inches`` wide (about 11 chars/inch)."""
    return textwrap.fill(text, width=max(20, int(width_inches * 11)))


def joint_matrix_figure(joint: np.ndarray, bin_size: int, blocks: int = 4) -> Figure:
    """The top-left ``blocks x blocks`` blocks of the joint matrix P, as in the IMSVD paper.

    Diagonal blocks are the joint of a variable with itself across views (ideally a
    diagonal: the views agree); off-diagonal blocks are pairs of distinct variables
    (ideally the outer product of uniform marginals: independent). A log colour scale
    shows both at once.

    Args:
        joint: (D, D) joint matrix ``P = p1^T p2 / N``.
        bin_size: bins per block.
        blocks: how many blocks to show along each side (clipped to D // bin_size).

    Returns:
        The figure.
    """
    p = np.asarray(joint, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != p.shape[1] or bin_size < 1 or p.shape[0] % bin_size:
        raise DataError(f"joint must be (D, D) with D divisible by bin_size={bin_size}, got {p.shape}")
    blocks = max(1, min(blocks, p.shape[0] // bin_size))
    size = blocks * bin_size
    shown = p[:size, :size]
    positive = shown[shown > 0]
    vmin = float(positive.min()) if positive.size else 1e-8
    vmax = float(shown.max()) if positive.size else 1.0
    fig = _new_figure(6.4, 5.6)
    ax = fig.add_subplot()
    image = ax.imshow(
        np.clip(shown, vmin, None),
        norm=LogNorm(vmin=vmin, vmax=max(vmax, vmin * 10)),
        cmap="viridis",
        interpolation="nearest",
    )
    for edge in range(1, blocks):
        ax.axhline(edge * bin_size - 0.5, color="white", linewidth=1.2)
        ax.axvline(edge * bin_size - 0.5, color="white", linewidth=1.2)
    centres = [b * bin_size + (bin_size - 1) / 2 for b in range(blocks)]
    ax.set_xticks(centres, [f"block {b}" for b in range(blocks)])
    ax.set_yticks(centres, [f"block {b}" for b in range(blocks)], rotation=90, va="center")
    ax.set_xlabel(f"view 2: code unit (blocks of {bin_size} bins)")
    ax.set_ylabel(f"view 1: code unit (blocks of {bin_size} bins)")
    ax.set_title(f"Joint distribution P of two views, first {blocks}x{blocks} blocks")
    fig.colorbar(image, ax=ax, label="P (joint probability, log colour scale)")
    return fig


def attribution_figure(
    images: Images,
    codes: np.ndarray,
    block: int = 0,
    units: int | Sequence[int] = 6,
    per_unit: int = 8,
) -> Figure:
    """For a few bins of one block, the test images that fall most surely in each bin.

    Each row is one bin (unit) of ``block``; its images are those with the highest
    probability of that bin, highest first, each with that probability written under it.
    When ``units`` is a number, the most used bins (largest argmax share) are shown, so
    the rows are not spent on dead bins.

    Args:
        images: (N, H, W, C) uint8 images, C = 1 or 3.
        codes: (N, B, bin) soft codes of the same images.
        block: which block (variable) to show.
        units: how many bins to show, or the bin indices themselves.
        per_unit: images per bin (clipped to N).

    Returns:
        The figure.
    """
    if not isinstance(images, LazyImages):  # lazy images are read only where shown
        images = np.asarray(images)
    p = np.asarray(codes, dtype=np.float64)
    if images.ndim != 4 or images.dtype != np.uint8 or images.shape[3] not in (1, 3):
        raise DataError(
            f"images must be (N, H, W, C) uint8 with C in (1, 3), got {images.dtype} {images.shape}"
        )
    if p.ndim != 3 or p.shape[0] != images.shape[0]:
        raise DataError(f"codes must be (N, B, bin) for the {images.shape[0]} images, got {p.shape}")
    if not 0 <= block < p.shape[1]:
        raise DataError(f"block {block} is out of range for {p.shape[1]} blocks")
    usage = bin_occupancy(p)[block]
    if isinstance(units, int):
        bins = [int(u) for u in np.argsort(-usage, kind="stable")[: max(1, units)]]
    else:
        bins = [int(u) for u in units]
        if not bins or not all(0 <= u < p.shape[2] for u in bins):
            raise DataError(f"units must be bin indices in [0, {p.shape[2]}), got {bins}")
    per_unit = max(1, min(per_unit, images.shape[0]))
    rows, cols = len(bins), per_unit
    width = max(6.0, 1.25 * cols + 1.2)
    fig = _new_figure(width, 1.45 * rows + 1.0)
    axes = fig.subplots(rows, cols, squeeze=False)
    for r, unit in enumerate(bins):
        prob = p[:, block, unit]
        order = np.argsort(-prob, kind="stable")[:per_unit]
        for c, index in enumerate(order):
            ax = axes[r, c]
            picture = images[index]
            if picture.shape[2] == 1:
                ax.imshow(picture[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            else:
                ax.imshow(picture, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(f"p = {prob[index]:.2f}", fontsize=9)
            if c == 0:
                ax.set_ylabel(f"bin {unit}\n({usage[unit]:.0%} of images)", fontsize=9)
    fig.suptitle(
        _wrap(f"Block {block}: test images most surely in each bin (p = probability of that bin)", width)
    )
    fig.supxlabel("images ranked by probability of the bin, highest first")
    fig.supylabel("bin of the block")
    return fig


def bin_occupancy_figure(codes: np.ndarray | CodeStatistics) -> Figure:
    """Heatmap of the share of samples whose most probable bin is each bin, per block.

    A healthy code spreads each row evenly (about 1/bin everywhere); a collapsed block is
    a row with a single bright cell.

    Args:
        codes: (N, B, bin) soft codes, or their :class:`~imsvd.metrics.CodeStatistics`.

    Returns:
        The figure.
    """
    if isinstance(codes, CodeStatistics):
        samples, occupancy, marginal = codes.n, codes.occupancy(), codes.marginals()
    else:
        p = np.asarray(codes, dtype=np.float64)
        samples, occupancy, marginal = p.shape[0], bin_occupancy(p), block_marginals(p)
    blocks, bins = occupancy.shape
    entropy = -(marginal * np.log(np.clip(marginal, 1e-300, None))).sum(1).mean() / np.log(bins)
    width = min(12.0, max(6.5, 3.0 + 0.22 * bins))
    fig = _new_figure(width, min(10.0, 2.6 + 0.22 * blocks))
    ax = fig.add_subplot()
    # A square-root scale keeps the even rows (about 1/bin) visible beside a collapsed cell at 1.
    image = ax.imshow(
        occupancy,
        aspect="auto",
        cmap="magma",
        norm=PowerNorm(0.5, vmin=0.0, vmax=1.0),
        interpolation="nearest",
    )
    ax.set_xlabel("bin (unit within the block)")
    ax.set_ylabel("block (variable)")
    fig.suptitle(
        _wrap(
            f"Bin occupancy over {samples} samples (even use = 1/{bins} = {1 / bins:.3f} per cell; "
            f"mean normalised marginal entropy {entropy:.2f})",
            width,
        )
    )
    colourbar = fig.colorbar(image, ax=ax, label="share of samples whose argmax is this bin (sqrt scale)")
    ticks = sorted({0.0, 1 / bins, 0.25, 0.5, 1.0})
    colourbar.set_ticks(ticks, labels=[f"1/{bins} (even)" if t == 1 / bins else f"{t:g}" for t in ticks])
    colourbar.ax.axhline(1 / bins, color="cyan", linewidth=2)
    if bins <= 32:
        ax.set_xticks(range(bins))
    if blocks <= 32:
        ax.set_yticks(range(blocks))
    return fig


def loss_curve_figure(history: pd.DataFrame) -> Figure:
    """Training loss against optimiser step: total, each term, and the learning rate.

    Columns other than those of ``HISTORY_META_COLUMNS`` are loss terms. The total is the
    column named ``loss`` (or ``total``, ``total_loss``, ``train_loss``); without one, the
    plain sum of the terms is drawn and labelled so. The top panel shows the total with
    the learning rate on a twin axis; the next each term, since terms often differ in
    scale from the total; a last one the online kNN monitor, where the history has it.

    Args:
        history: one row per logged step, with at least a ``step`` column.

    Returns:
        The figure.
    """
    if "step" not in history.columns:
        raise DataError(f"history needs a 'step' column, got {list(history.columns)}")
    data = history.sort_values("step")
    numeric = [c for c in data.columns if pd.api.types.is_numeric_dtype(data[c])]
    total_name = next((c for c in TOTAL_LOSS_COLUMNS if c in numeric), None)
    terms = [c for c in numeric if c not in HISTORY_META_COLUMNS and c != total_name]
    if total_name is not None:
        total, total_label = data[total_name], f"total ({total_name})"
    elif terms:
        total, total_label = data[terms].sum(axis=1, min_count=1), "sum of terms (unweighted)"
    else:
        raise DataError(f"history has no loss column, got {list(history.columns)}")
    step = data["step"]
    monitor = data[MONITOR_COLUMN].dropna() if MONITOR_COLUMN in numeric else pd.Series(dtype=float)
    panels = 1 + bool(terms) + (not monitor.empty)

    fig = _new_figure(8.0, 2.4 + 2.0 * panels if panels > 1 else 4.0)
    axes = fig.subplots(panels, 1, sharex=True, squeeze=False)[:, 0]
    ax = axes[0]
    mask = total.notna()
    ax.plot(step[mask], total[mask], color="black", linewidth=2, label=total_label)
    ax.set_ylabel("loss")
    ax.set_title(
        "Pretraining loss per optimiser step" + (" (learning rate dashed)" if "lr" in numeric else "")
    )
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if "lr" in numeric:
        twin = ax.twinx()
        lr_mask = data["lr"].notna()
        (line,) = twin.plot(
            step[lr_mask], data["lr"][lr_mask], color="tab:gray", linestyle="--", label="learning rate"
        )
        twin.set_ylabel("learning rate")
        handles.append(line)
        labels.append("learning rate")
    ax.legend(handles, labels, loc="upper right")
    if terms:
        term_ax = axes[1]
        for name in terms:
            term_mask = data[name].notna()
            term_ax.plot(step[term_mask], data[name][term_mask], label=name)
        term_ax.set_ylabel("loss term")
        term_ax.set_title("Loss terms")
        term_ax.grid(alpha=0.3)
        term_ax.legend(loc="upper right")
    if not monitor.empty:
        knn_ax = axes[-1]
        knn_ax.plot(step[monitor.index], monitor, color="tab:green", marker="o", label="online kNN top-1")
        knn_ax.set_ylabel("kNN top-1 (%)")
        knn_ax.set_title("Online kNN on a labelled slice of the training images (frozen backbone)")
        knn_ax.grid(alpha=0.3)
        knn_ax.legend(loc="lower right")
    axes[-1].set_xlabel("optimiser step")
    return fig


def embedding_map_figure(
    features: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    seed: int = 0,
    max_points: int = 5000,
) -> Figure:
    """A 2-D map of features coloured by class: t-SNE, or PCA for fewer than 50 points.

    t-SNE (scikit-learn) uses PCA initialisation and ``random_state=seed``, perplexity
    ``min(30, (N - 1) / 3)``. Above ``max_points`` a seeded random subset is drawn, since
    t-SNE time grows with N. The title says which method made the map.

    Args:
        features: (N, F) features.
        labels: (N,) class indices into ``class_names`` (-1 or out of range: "unknown").
        class_names: name of each class index.
        seed: t-SNE random state and subset choice.
        max_points: most points drawn.

    Returns:
        The figure.
    """
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    y = np.asarray(labels).astype(np.int64)
    shape = tuple(features.shape)
    if len(shape) != 2 or y.shape != (shape[0],) or shape[0] < 2:
        raise DataError(f"features must be (N, F) with N >= 2 and labels (N,), got {shape} and {y.shape}")
    keep: np.ndarray | slice = slice(None)
    if shape[0] > max_points:  # drawn before the float64 copy: a memory map is read only there
        keep = np.random.default_rng(seed).choice(shape[0], max_points, replace=False)
    x, y = np.asarray(read_rows(features, keep), dtype=np.float64), y[keep]
    n = x.shape[0]
    if n < TSNE_MIN_SAMPLES or x.shape[1] < 2:
        components = min(2, x.shape[1], n)
        pca = PCA(n_components=components, random_state=seed)
        xy = pca.fit_transform(x)
        method = f"PCA (N = {n} < {TSNE_MIN_SAMPLES}: too few points for t-SNE)"
        axis_names = [
            f"PC {i + 1} ({share:.0%} of variance)" for i, share in enumerate(pca.explained_variance_ratio_)
        ]
    else:
        perplexity = min(30.0, (n - 1) / 3)
        xy = TSNE(n_components=2, init="pca", random_state=seed, perplexity=perplexity).fit_transform(x)
        method = f"t-SNE (perplexity {perplexity:.0f}, N = {n})"
        axis_names = ["t-SNE 1", "t-SNE 2"]
    if xy.shape[1] < 2:
        xy = np.column_stack([xy[:, 0], np.zeros(n)])
        axis_names = [axis_names[0], "(constant)"]

    fig = _new_figure(8.0, 6.4)
    ax = fig.add_subplot()
    classes = sorted(set(y.tolist()))
    cmap_name = "tab10" if len(classes) <= 10 else "tab20"
    cmap = matplotlib.colormaps[cmap_name]
    colours = [cmap(i % cmap.N) for i in range(len(classes))]
    for colour, cls in zip(colours, classes, strict=True):
        mask = y == cls
        name = class_names[cls] if 0 <= cls < len(class_names) else "unknown"
        ax.scatter(xy[mask, 0], xy[mask, 1], s=14, color=colour, label=f"{name} ({mask.sum()})", alpha=0.8)
    ax.set_xlabel(axis_names[0])
    ax.set_ylabel(axis_names[1])
    ax.set_title(f"Test features, coloured by class: {method}")
    ax.legend(title="class (count)", loc="center left", bbox_to_anchor=(1.01, 0.5), markerscale=2, fontsize=8)
    return fig
