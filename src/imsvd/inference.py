"""Frozen-encoder inference: features for evaluation and the encoder's speed."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from imsvd.models import Encoder
from imsvd.preprocess import model_input


@dataclass(frozen=True)
class Features:
    """Frozen outputs for a set of images.

    Attributes:
        backbone: (N, F) float32 backbone features (what downstream tasks use).
        projector: (N, D) float32 projector outputs (what the loss saw).
    """

    backbone: np.ndarray
    projector: np.ndarray


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    images: np.ndarray,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 256,
) -> Features:
    """Backbone and projector outputs of the frozen encoder (eval mode) in batches.

    Images go through :func:`imsvd.preprocess.model_input`, the normalisation training uses.
    """
    encoder.eval()
    device = next(encoder.parameters()).device
    backbone, projector = [], []
    for start in range(0, len(images), batch_size):
        x = model_input(images[start : start + batch_size], size, mean, std).to(device)
        h, z = encoder(x)
        backbone.append(h.float().cpu().numpy())
        projector.append(z.float().cpu().numpy())
    return Features(np.concatenate(backbone), np.concatenate(projector))


@torch.no_grad()
def images_per_second(
    encoder: Encoder, channels: int, size: int, batch_size: int = 256, repeats: int = 3
) -> float:
    """Backbone inference throughput on this machine (median of ``repeats`` batches)."""
    encoder.eval()
    x = torch.randn(batch_size, channels, size, size, generator=torch.Generator().manual_seed(0))
    encoder.backbone(x)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        encoder.backbone(x)
        times.append(time.perf_counter() - start)
    return batch_size / float(np.median(times))
