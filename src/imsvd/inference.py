"""Frozen-encoder inference: features for evaluation and the encoder's speed."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from imsvd.data import Images
from imsvd.models import Encoder
from imsvd.preprocess import at_most, model_input


@dataclass(frozen=True)
class Features:
    """Frozen outputs for a set of images.

    Attributes:
        backbone: (N, F) float32 backbone features (what downstream tasks use).
        projector: (N, D) float32 projector outputs (what the loss saw).
    """

    backbone: np.ndarray
    projector: np.ndarray


def _allocate(
    rows: int, width: int, scratch: Path | None, name: str, dtype: type[np.generic] = np.float32
) -> np.ndarray:
    """A (rows, width) array of ``dtype``: in memory, or a memory map in ``scratch``.

    The map's file is unlinked once mapped: the mapping keeps its pages, their disk space
    goes with the array's last reference, and a crash leaves no file behind.
    """
    if scratch is None:
        return np.empty((rows, width), dtype=dtype)
    scratch.mkdir(parents=True, exist_ok=True)
    handle, path = tempfile.mkstemp(prefix=f"imsvd-{name}-", suffix=".npy", dir=scratch)
    os.close(handle)
    try:
        return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(rows, width))
    finally:
        os.unlink(path)


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    images: Images,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 256,
    max_in_memory_mb: float | None = None,
    scratch: Path | None = None,
) -> Features:
    """Backbone and projector outputs of the frozen encoder (eval mode) in batches.

    Images go through :func:`imsvd.preprocess.model_input`, the normalisation training uses.
    Each batch is written into arrays allocated once; when both together would exceed
    ``max_in_memory_mb`` they are memory maps on disk (in ``scratch``, the system's
    temporary folder by default), which the kNN and the linear probe read in chunks.
    """
    encoder.eval()
    device = next(encoder.parameters()).device
    n = len(images)
    backbone = projector = np.zeros((0, 0), dtype=np.float32)
    for start in range(0, n, batch_size):
        x = model_input(images[start : start + batch_size], size, mean, std).to(device)
        h, z = encoder(x)
        if start == 0:
            on_disk = (
                max_in_memory_mb is not None and n * (h.shape[1] + z.shape[1]) * 4 > max_in_memory_mb * 2**20
            )
            folder = (scratch or Path(tempfile.gettempdir())) if on_disk else None
            backbone = _allocate(n, h.shape[1], folder, "backbone")
            projector = _allocate(n, z.shape[1], folder, "projector")
        backbone[start : start + len(h)] = h.float().cpu().numpy()
        projector[start : start + len(z)] = z.float().cpu().numpy()
    return Features(backbone, projector)


def raw_pixels(
    images: Images,
    max_side: int | None = None,
    batch_size: int = 1024,
    max_in_memory_mb: float | None = None,
    scratch: Path | None = None,
) -> np.ndarray:
    """Flattened uint8 pixels, filled batch by batch: the raw-pixel baseline's features, on
    disk (as :func:`extract_features`) above the budget.

    Images with more pixels than ``max_side``² (the encoder's input) are first resized to
    it as the encoder's input is (:func:`at_most`, the uint8 resize of :func:`model_input`):
    the baseline then sees what the encoder sees, and photos of 512 x 512 do not make
    786,432-dimensional features. Smaller images (the digits, Fashion-MNIST at 28) keep
    their own pixels.

    The pixels stay uint8, not floats in [0, 1]: the kNN's cosine and the linear probe's
    standardisation do not see the scale, and the table is a quarter of the size (float32
    was 786 MB on 16,000 images of 64 x 64 RGB, all of it resident during evaluation).
    """
    n, height, width, channels = images.shape
    shrink = max_side is not None and height * width > max_side * max_side
    dims = (max_side * max_side if shrink else height * width) * channels  # type: ignore[operator]
    on_disk = max_in_memory_mb is not None and n * dims > max_in_memory_mb * 2**20
    scratch_dir = (scratch or Path(tempfile.gettempdir())) if on_disk else None
    out = _allocate(n, dims, scratch_dir, "pixels", np.uint8)
    for start in range(0, n, batch_size):
        batch = images[start : start + batch_size]
        if shrink:
            batch = at_most(batch, max_side)  # type: ignore[arg-type]
        out[start : start + len(batch)] = batch.reshape(len(batch), -1)
    return out


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
