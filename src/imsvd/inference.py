"""Frozen-encoder inference: features for evaluation and the encoder's speed."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from imsvd.data import Images
from imsvd.memmaps import allocate, release
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


@torch.no_grad()
def embed_split(
    encoders: Sequence[nn.Module],
    images: Images,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 256,
    max_in_memory_mb: float | None = None,
    scratch: Path | None = None,
    pixels: bool = False,
    pixels_size: int | None = None,
) -> tuple[list[Features], np.ndarray | None]:
    """One pass over ``images``: each encoder's features and, with ``pixels``, the raw-pixel
    baseline's, reading (for the image store: decoding) every image once.

    Each batch is shrunk to the encoder's input once (:func:`at_most`, the uint8 resize of
    :func:`model_input`), then normalised by :func:`model_input` as in training, for every
    encoder (eval mode). Each output is written into arrays allocated once; when all of
    them together (every encoder's two outputs and the pixels) would exceed
    ``max_in_memory_mb`` they are all memory maps on disk (in ``scratch``, the system's
    temporary folder by default), which the kNN and the linear probe read in chunks. The
    maps' pages leave the process as each batch is written (:func:`imsvd.memmaps.release`),
    so writing them holds one batch.

    The pixels are the flattened uint8 batch the encoders see: images larger than
    ``size``² shrunk to it (photos of 512 x 512 do not make 786,432-dimensional
    features), or to ``pixels_size``² when that is smaller, smaller ones (the digits,
    Fashion-MNIST at 28) at their own size. They stay
    uint8, not floats in [0, 1]: the kNN's cosine and the linear probe's standardisation
    do not see the scale, and the table is a quarter of the size (float32 was 786 MB on
    16,000 images of 64 x 64 RGB, all of it resident during evaluation).

    Returns:
        (one :class:`Features` per encoder, the (N, pixels) uint8 table or ``None``).
    """
    for encoder in encoders:
        encoder.eval()
    devices = [next(encoder.parameters()).device for encoder in encoders]
    n, height, width, channels = images.shape
    shrink = height * width > size * size
    pixel_side = size if not pixels_size else min(size, pixels_size)
    shrink_pixels = height * width > pixel_side * pixel_side
    folder = scratch or Path(tempfile.gettempdir())
    dims = (pixel_side * pixel_side if shrink_pixels else height * width) * channels
    outputs: list[tuple[np.ndarray, np.ndarray]] = []
    flat: np.ndarray | None = None
    for start in range(0, n, batch_size):
        batch = images[start : start + batch_size]
        if shrink:
            batch = at_most(batch, size)  # model_input's own resize, done once for every use
        results = []
        if encoders:
            x = model_input(batch, size, mean, std)
            results = [encoder(x.to(device)) for encoder, device in zip(encoders, devices, strict=True)]
        if start == 0:
            # The widths are known once the first batch has gone through every encoder.
            row_bytes = (dims if pixels else 0) + 4 * sum(h.shape[1] + z.shape[1] for h, z in results)
            on_disk = max_in_memory_mb is not None and n * row_bytes > max_in_memory_mb * 2**20
            where = folder if on_disk else None
            if pixels:
                flat = allocate(n, dims, where, "pixels", np.uint8)
            outputs = [
                (allocate(n, h.shape[1], where, "backbone"), allocate(n, z.shape[1], where, "projector"))
                for h, z in results
            ]
        if flat is not None:
            seen = at_most(batch, pixel_side) if pixel_side < size and shrink_pixels else batch
            flat[start : start + len(batch)] = seen.reshape(len(batch), -1)
            release(flat)
        for (backbone, projector), (h, z) in zip(outputs, results, strict=True):
            backbone[start : start + len(h)] = h.float().cpu().numpy()
            projector[start : start + len(z)] = z.float().cpu().numpy()
            release(backbone)
            release(projector)
    if n == 0:
        empty = np.zeros((0, 0), dtype=np.float32)
        outputs = [(empty, empty) for _ in encoders]
        flat = np.zeros((0, dims), dtype=np.uint8) if pixels else None
    return [Features(b, z) for b, z in outputs], flat


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
    """Backbone and projector outputs of the frozen encoder (eval mode) in batches: one
    encoder's part of :func:`embed_split`."""
    features, _ = embed_split([encoder], images, size, mean, std, batch_size, max_in_memory_mb, scratch)
    return features[0]


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
