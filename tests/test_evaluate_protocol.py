"""The evaluation protocol on a real (tiny, untrained) encoder: every metric key, and an
unlabelled test split reported instead of crashing."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch

from imsvd import evaluate
from imsvd.config import EvaluateConfig, IMSVDConfig, PretrainConfig
from imsvd.data import UNLABELLED, ImageData
from imsvd.models import build_encoder
from imsvd.sources import load_digits


def payload(in_channels: int = 1) -> dict:
    cfg = PretrainConfig(width=0.125, projector="64-64", imsvd=IMSVDConfig(bin_size=16))
    torch.manual_seed(0)
    encoder = build_encoder(cfg.backbone, cfg.width, cfg.projector_dims, in_channels)
    return {
        "state_dict": encoder.state_dict(),
        "config": dataclasses.asdict(cfg),
        "in_channels": in_channels,
        "mean": [0.3],
        "std": [0.3],
        "image_size": 8,
    }


@pytest.fixture(scope="module")
def digits() -> ImageData:
    data = load_digits(0.25, 0)
    keep = np.r_[np.flatnonzero(data.splits == "train")[:300], np.flatnonzero(data.splits == "test")[:100]]
    return ImageData(
        data.images[keep], data.labels[keep], data.splits[keep], data.ids[keep], data.class_names
    )


def test_labelled_split_gets_every_protocol_and_baseline(digits):
    cfg = EvaluateConfig(linear_epochs=20)
    metrics = evaluate.compute_metrics(evaluate.embed(digits, payload(), cfg), cfg)
    for key in [
        "knn_top1",
        "knn_top5",
        "knn200_top1",
        "linear_top1",
        "linear_top5",
        "knn_top1_raw_pixels",
        "linear_top1_raw_pixels",
        "knn_top1_random_encoder",
        "code_knn_top1",
        "effective_rank",
        "mean_abs_offdiag_correlation",
        "backbone_mean_abs_offdiag_correlation",
        "backbone_effective_rank",
        "code_mean_abs_offblock_correlation",
        "code_effective_rank",
        "bin_entropy",
        "dead_bin_share",
        "off_block_mutual_information",
        "code_bits",
        "inference_images_per_second",
        "bytes_per_embedding",
    ]:
        assert key in metrics, key
    assert metrics["labelled"] == 1
    assert metrics["code_bits"] == 4 * 4  # 64 / 16 blocks x log2(16) bits
    assert metrics["bytes_per_embedding"] == metrics["feature_dim"] * 4
    assert 1 <= metrics["backbone_effective_rank"] <= metrics["feature_dim"]
    assert 0 <= metrics["code_mean_abs_offblock_correlation"] <= 1
    assert 50 < metrics["knn_top1_raw_pixels"] <= 100  # real digits
    assert all(0 <= metrics[k] <= 100 for k in metrics if k.startswith(("knn", "linear")))


def test_unlabelled_test_split_is_reported_not_a_crash(digits, caplog):
    unlabelled = dataclasses.replace(
        digits, labels=np.where(digits.splits == "test", UNLABELLED, digits.labels)
    )
    cfg = EvaluateConfig(linear_epochs=5)
    caplog.set_level(logging.WARNING, logger="imsvd.evaluate")
    embeddings = evaluate.embed(unlabelled, payload(), cfg)
    metrics = evaluate.compute_metrics(embeddings, cfg)
    assert metrics["labelled"] == 0
    assert "kNN and linear probe skipped" in metrics["note"]
    assert "knn_top1" not in metrics and "effective_rank" in metrics
    assert "kNN and linear probe skipped" in caplog.text
    pictures = evaluate.pictures(unlabelled, embeddings, cfg)
    assert len(pictures) == 4 and all(fig.axes for fig in pictures)
