"""The evaluation protocol: frozen features in, a flat metrics dict and pictures out.

The protocol (what is measured on which features, against which baselines) lives here;
the metric functions themselves are in :mod:`imsvd.metrics` and the pictures in
:mod:`imsvd.plots`. Baselines: raw pixels, and a randomly initialised encoder of the
same architecture.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from imsvd.checkpoints import load_encoder
from imsvd.config import EvaluateConfig, PretrainConfig
from imsvd.data import TEST, TRAIN, ImageData, is_labelled
from imsvd.inference import Features, embed_split, images_per_second
from imsvd.losses import soft_discretize
from imsvd.metrics import (
    CodeStatistics,
    bin_usage,
    code_bits,
    code_knn_accuracy,
    code_statistics,
    collapse_report,
    discrete_code,
    effective_rank,
    knn_accuracies,
    knn_accuracy,
    linear_probe,
    mean_abs_off_diagonal_correlation,
    moments,
    off_block_mutual_information,
)
from imsvd.models import build_encoder
from imsvd.plots import attribution_figure, bin_occupancy_figure, embedding_map_figure, joint_matrix_figure

log = logging.getLogger(__name__)

UNLABELLED_NOTE = (
    "kNN and linear probe skipped: the train and test splits must both be labelled "
    "(image_folder: put images in train/<class>/ and test/<class>/)"
)


@dataclass(frozen=True)
class Embeddings:
    """Frozen features of the train and test splits, for the trained and a random encoder,
    and the raw-pixel baseline's (uint8, at most the encoder's input size and
    ``evaluate.raw_pixels_size``)."""

    train: Features
    test: Features
    random_train: Features
    random_test: Features
    raw_train: np.ndarray
    raw_test: np.ndarray
    train_labels: np.ndarray
    test_labels: np.ndarray
    images_per_second: float
    config: PretrainConfig

    @property
    def is_imsvd(self) -> bool:
        return self.config.method == "imsvd"


def embed(data: ImageData, encoder_payload: dict[str, Any], cfg: EvaluateConfig) -> Embeddings:
    """Features of both splits from the trained encoder and a seeded random one."""
    loaded = load_encoder(encoder_payload)
    pre = loaded.config
    torch.manual_seed(cfg.seed)
    random_encoder = build_encoder(pre.backbone, pre.width, pre.projector_dims, loaded.in_channels)
    train, test = data.split(TRAIN), data.split(TEST)

    scratch = Path(cfg.scratch_dir) if cfg.scratch_dir else None

    def one_pass(split: ImageData) -> tuple[list[Features], np.ndarray]:
        # Each split is read once (from the image store: decoded once) for both encoders
        # and the pixels. Its features, all together, may take a quarter of the budget in
        # memory (so both splits half of it; the full-batch probe has the other half),
        # else they are memory maps read in chunks.
        features, pixels = embed_split(
            [loaded.encoder, random_encoder],
            split.images,
            loaded.image_size,
            loaded.mean,
            loaded.std,
            cfg.batch_size,
            max_in_memory_mb=cfg.memory_budget_mb / 4,
            scratch=scratch,
            pixels=True,
            pixels_size=cfg.raw_pixels_size,
        )
        assert pixels is not None
        return features, pixels

    log.info("extracting features of %d train and %d test images", len(train.images), len(test.images))
    (trained_train, random_train), raw_train = one_pass(train)
    (trained_test, random_test), raw_test = one_pass(test)
    return Embeddings(
        train=trained_train,
        test=trained_test,
        random_train=random_train,
        random_test=random_test,
        raw_train=raw_train,
        raw_test=raw_test,
        train_labels=train.labels,
        test_labels=test.labels,
        images_per_second=images_per_second(loaded.encoder, loaded.in_channels, loaded.image_size),
        config=pre,
    )


def _percent(accuracies: dict[int, float], prefix: str) -> dict[str, float]:
    return {f"{prefix}_top{k}": 100.0 * v for k, v in accuracies.items()}


def downstream(
    train: np.ndarray,
    train_y: np.ndarray,
    test: np.ndarray,
    test_y: np.ndarray,
    cfg: EvaluateConfig,
    suffix: str = "",
) -> dict[str, float]:
    """kNN (two protocols) and linear-probe accuracies of one feature set, in percent."""
    knn, knn_l = knn_accuracies(
        train,
        train_y,
        test,
        test_y,
        [(cfg.knn_k, cfg.knn_temperature), (cfg.knn_k_lightly, cfg.knn_temperature_lightly)],
    )
    linear = linear_probe(
        train,
        train_y,
        test,
        test_y,
        epochs=cfg.linear_epochs,
        lr=cfg.linear_lr,
        weight_decay=cfg.linear_weight_decay,
        seed=cfg.seed,
        memory_budget_mb=cfg.memory_budget_mb / 2,  # the features in memory may hold the other half
        batch_size=cfg.linear_batch_size,
        minibatch_epochs=cfg.linear_minibatch_epochs,
    )
    out = {**_percent(knn, "knn"), **_percent(knn_l, f"knn{cfg.knn_k_lightly}"), **_percent(linear, "linear")}
    return {f"{k}{suffix}": v for k, v in out.items()}


def shape_metrics(emb: Embeddings) -> dict[str, Any]:
    """Sizes, inference speed, and redundancy of the projector outputs and of the backbone
    features (what downstream tasks use) on the test split."""
    z = emb.test.projector
    features = emb.test.backbone
    # One chunked pass per matrix gives both its correlation and its rank (Moments: D x D).
    z_moments, backbone_moments = moments(z), moments(features, name="backbone")
    rank = effective_rank(z_moments)
    backbone_rank = effective_rank(backbone_moments)
    return {
        "images_train": len(emb.train_labels),
        "images_test": len(emb.test_labels),
        "feature_dim": int(emb.train.backbone.shape[1]),
        "embedding_dim": int(z.shape[1]),
        "bytes_per_embedding": int(emb.train.backbone.shape[1] * 4),
        "inference_images_per_second": float(emb.images_per_second),
        "mean_abs_offdiag_correlation": mean_abs_off_diagonal_correlation(z_moments),
        "effective_rank": rank,
        "effective_rank_ratio": rank / z.shape[1],
        "backbone_mean_abs_offdiag_correlation": mean_abs_off_diagonal_correlation(backbone_moments),
        "backbone_effective_rank": backbone_rank,
        "backbone_effective_rank_ratio": backbone_rank / features.shape[1],
    }


def code_metrics(emb: Embeddings, cfg: EvaluateConfig) -> tuple[dict[str, Any], dict[str, float]]:
    """IMSVD's soft codes of the test split: bin usage, redundancy between blocks, size.

    The softmax ignores a shift of a block's logits, so the projector outputs' correlation
    and rank can mislead about IMSVD's variables; the codes' own are reported here (the
    correlation between units of different blocks, and the codes' effective rank).

    Returns:
        (metrics, bin usage) for the collapse check.
    """
    z = emb.test.projector
    section = emb.config.imsvd
    stats = _code_statistics(z, section.bin_size, section.temperature)
    usage = bin_usage(stats)
    out = {
        "bin_entropy": usage["normalized_entropy"],
        "dead_bin_share": usage["dead_share"],
        "one_bin_block_share": usage["collapsed_block_share"],
        "off_block_mutual_information": off_block_mutual_information(
            stats.joint(), section.bin_size, seed=cfg.seed
        ),
        "code_bits": code_bits(z.shape[1] // section.bin_size, section.bin_size),
        "code_mean_abs_offblock_correlation": (
            mean_abs_off_diagonal_correlation(stats.moments, block=section.bin_size)
            if z.shape[1] // section.bin_size >= 2
            else float("nan")  # one variable: no pair of blocks
        ),
        "code_effective_rank": effective_rank(stats.moments),
    }
    return out, usage


def collapse_metrics(
    rank: float, dim: int, usage: dict[str, float] | None, cfg: EvaluateConfig
) -> dict[str, Any]:
    """``collapsed`` and, when so, ``collapse_reason`` (also logged as a warning)."""
    collapse = collapse_report(rank, dim, usage, cfg.collapse_rank_ratio)
    out: dict[str, Any] = {"collapsed": bool(collapse["collapsed"])}
    if collapse["collapsed"]:
        log.warning("representation collapse: %s", collapse["reason"])
        out["collapse_reason"] = str(collapse["reason"])
    return out


def labelled_metrics(emb: Embeddings, cfg: EvaluateConfig) -> dict[str, float]:
    """Accuracies of the trained encoder, its projector and codes, raw pixels, a random encoder."""
    ty, vy = emb.train_labels, emb.test_labels
    out = downstream(emb.train.backbone, ty, emb.test.backbone, vy, cfg)
    projector_knn = knn_accuracy(
        emb.train.projector, ty, emb.test.projector, vy, k=cfg.knn_k, temperature=cfg.knn_temperature, ks=(1,)
    )
    out["knn_top1_projector"] = 100.0 * projector_knn[1]
    out.update(downstream(emb.raw_train, ty, emb.raw_test, vy, cfg, "_raw_pixels"))
    out.update(
        downstream(emb.random_train.backbone, ty, emb.random_test.backbone, vy, cfg, "_random_encoder")
    )
    if emb.is_imsvd:
        bin_size = emb.config.imsvd.bin_size
        out["code_knn_top1"] = 100.0 * code_knn_accuracy(
            discrete_code(emb.train.projector, bin_size),
            ty,
            discrete_code(emb.test.projector, bin_size),
            vy,
            bin_size,
            k=cfg.knn_k,
            temperature=cfg.knn_temperature,
        )
    return out


def compute_metrics(emb: Embeddings, cfg: EvaluateConfig) -> dict[str, Any]:
    """Every evaluation figure as flat keys (``knn_top1``, ``effective_rank`` ...).

    Accuracies are percentages. An unlabelled split is reported (``labelled``: 0 and
    ``note``) instead of failing: the label-free metrics are still computed.
    """
    out = shape_metrics(emb)
    usage = None
    if emb.is_imsvd:
        codes, usage = code_metrics(emb, cfg)
        out.update(codes)
    out.update(collapse_metrics(out["effective_rank"], out["embedding_dim"], usage, cfg))
    labelled = is_labelled(emb.test_labels) and is_labelled(emb.train_labels)
    out["labelled"] = int(labelled)
    if labelled:
        out.update(labelled_metrics(emb, cfg))
    else:
        out["note"] = UNLABELLED_NOTE
        log.warning(UNLABELLED_NOTE)
    return {
        k: (float(v) if isinstance(v, (float, np.floating)) and math.isfinite(v) else v)
        for k, v in out.items()
    }


def pictures(data: ImageData, emb: Embeddings, cfg: EvaluateConfig) -> tuple[Figure, Figure, Figure, Figure]:
    """Joint matrix, per-variable attribution, bin occupancy and the 2-D embedding map."""
    test = data.split(TEST)
    z = emb.test.projector
    section = emb.config.imsvd
    bin_size = section.bin_size if emb.is_imsvd else _display_bin(z.shape[1])
    temperature = section.temperature if emb.is_imsvd else 1.0
    stats = _code_statistics(z, bin_size, temperature)
    # The attribution shows block 0 only, so only the first two blocks are discretized
    # (soft_discretize wants two or more), never the whole (N, B, bin) codes.
    first_block = soft_discretize(
        torch.from_numpy(np.ascontiguousarray(z[:, : 2 * bin_size])), bin_size, temperature
    )[:, :1]
    labelled = is_labelled(test.labels)
    labels = test.labels if labelled else np.zeros(len(test.labels), dtype=np.int64)
    names = list(data.class_names) if labelled else ["unlabelled"]
    return (
        joint_matrix_figure(stats.joint(), bin_size, cfg.matrix_blocks),
        attribution_figure(
            test.images, first_block.numpy(), 0, cfg.attribution_units, cfg.attribution_images
        ),
        bin_occupancy_figure(stats),
        embedding_map_figure(emb.test.backbone, labels, names, seed=cfg.seed),
    )


def _code_statistics(z: np.ndarray, bin_size: int, temperature: float) -> CodeStatistics:
    """The soft codes' statistics, from the projector outputs read in chunks."""
    return code_statistics(z, lambda chunk: soft_discretize(chunk, bin_size, temperature), "projector")


def _display_bin(dim: int) -> int:
    """For methods without bins, a bin size that divides D, so the pictures still draw."""
    for size in (32, 16, 8, 4, 2):
        if dim % size == 0:
            return size
    return 1
