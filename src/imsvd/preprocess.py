"""Model inputs from uint8 images, one definition for training and evaluation.

:func:`normalize` is the only place pixels become the encoder's float input: training
calls it on each batch of views on the device, and evaluation (:func:`model_input`, which
resizes first) on each batch of test images, so the two cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torchvision.transforms import v2

from imsvd.data import Images, LazyImages

#: Pixels per channel counted at once by :func:`channel_stats` (their int64 copy: 512 KiB).
BINCOUNT_ROWS = 2**16


#: The most rows of a lazily read image set (the image store) that :func:`channel_stats` reads.
STATS_SAMPLE = 10_000


def channel_stats(
    train_images: Images, chunk_mb: float = 64.0, sample: int | None = STATS_SAMPLE
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation in [0, 1] units.

    Images in memory are counted whole. Images read from the store (:class:`LazyImages`)
    beyond ``sample`` rows are counted on ``sample`` evenly spaced ones: every row read is
    one more decode and resize, about 3 ms a photo on one core, so 160,000 photos would
    cost over 8 minutes before the first step for statistics that only normalise the
    input (``None``: every row).

    Computed from each channel's histogram of the 256 uint8 values, which gives the sums of
    values and of squares exactly with no float copy of the images: a float64 copy of a
    64 MB chunk, its square and its scaled copy took 1.5 GB and were the peak of a
    pretraining run on photos (2.12 against 1.46 GiB while training).

    Args:
        train_images: (N, H, W, C) uint8.
        chunk_mb: uint8 megabytes read at a time (the store decodes them).

    Returns:
        (mean, std), each a tuple of C floats.
    """
    if isinstance(train_images, LazyImages) and sample is not None and len(train_images) > sample:
        train_images = train_images.take(
            np.unique(np.linspace(0, len(train_images) - 1, sample).round().astype(int))
        )
    channels = train_images.shape[-1]
    chunk = max(1, int(chunk_mb * 2**20 // max(1, int(np.prod(train_images.shape[1:])))))
    counts = np.zeros((channels, 256), dtype=np.int64)
    for start in range(0, len(train_images), chunk):
        block = np.asarray(train_images[start : start + chunk]).reshape(-1, channels)
        for row in range(0, len(block), BINCOUNT_ROWS):  # bincount casts to int64: 8 bytes a value
            for c in range(channels):
                counts[c] += np.bincount(block[row : row + BINCOUNT_ROWS, c], minlength=256)
    values = np.arange(256, dtype=np.float64) / 255.0
    count = max(1, train_images.size // channels)
    mean = counts @ values / count
    std = np.sqrt(np.maximum(counts @ values**2 / count - mean**2, 0.0))
    return tuple(mean.tolist()), tuple(std.tolist())


def normalize(
    batch: torch.Tensor, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """uint8 ``(B, C, H, W)`` -> float32 ``(B, C, H, W)``, ``(x / 255 - mean) / std``.

    ``mean`` and ``std`` hold one value per channel (in [0, 1] units), as sequences or tensors.
    """
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=batch.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=batch.device).view(1, -1, 1, 1)
    return (batch.float() / 255.0 - mean_t) / std_t


def random_hflip(batch: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Flip each image of ``batch`` (B, C, H, W) left-right with probability ``p``.

    Args:
        batch: (B, C, H, W), any dtype, on any device.
        generator: draws the flips; lives on the CPU or on ``batch``'s device.
        p: flip probability.

    Returns:
        (B, C, H, W), same dtype and device.
    """
    flip = torch.rand(len(batch), generator=generator, device=generator.device) < p
    flip = flip.to(batch.device).view(-1, 1, 1, 1)
    return torch.where(flip, batch.flip(-1), batch)


def at_most(images: Images, size: int, batch_size: int = 64) -> np.ndarray:
    """``images`` (N, H, W, C) uint8 in memory, those larger than ``size`` x ``size``
    resized to it as :func:`model_input` resizes them, in batches.

    For slices that are kept across a run (the online monitor's): photos read from the
    store at their common size would otherwise be held at that size. :func:`model_input`
    then resizes nothing, so the encoder sees the same pixels.
    """
    n, height, width, _ = images.shape
    if height * width <= size * size:
        return np.asarray(images[np.arange(n)])
    resize = v2.Resize((size, size), antialias=True)
    parts = []
    for start in range(0, n, batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])).permute(0, 3, 1, 2)
        parts.append(resize(x).permute(0, 2, 3, 1).numpy())
    return np.concatenate(parts) if parts else np.zeros((0, size, size, images.shape[3]), np.uint8)


def model_input(images: np.ndarray, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 ``(N, H, W, C)`` images -> normalised float32 ``(N, C, size, size)``.

    Resized with antialiasing (torchvision), then :func:`normalize`, as training sees them.
    """
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    x = v2.Resize((size, size), antialias=True)(x)
    return normalize(x, mean, std)
