"""The augmentation recipe: one transform per view, and views drawn under a per-image seed.

The recipe is the reference CIFAR one of IMSVD / VICReg / Barlow Twins (RandomResizedCrop,
horizontal flip, colour jitter, random grayscale), with Gaussian blur and solarization of
the reference ImageNet recipe as options. Everything is torchvision ``transforms.v2`` on
uint8 ``(C, H, W)`` tensors.

Randomness: torchvision's v2 transforms draw from the global torch RNG, so every image is
drawn under ``torch.manual_seed(f(seed, index))`` inside a forked RNG state; the bytes do
not depend on how many processes draw them, and the caller's RNG is left alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torchvision.transforms import v2

from imsvd.config import AugmentConfig
from imsvd.data import Images
from imsvd.errors import DataError

# Fields of AugmentConfig that do not change the drawn views.
_NOT_RECIPE = ("seed", "workers", "cache_dir", "max_array_mb", "encode_above")


def reference_cifar_recipe() -> AugmentConfig:
    """The paper's CIFAR recipe: crops from 0.2 and horizontal flips (the shipped default,
    made for the digits, crops from 0.5 and does not flip)."""
    return dataclasses.replace(AugmentConfig(), scale_min=0.2, hflip_p=0.5)


def blur_kernel_size(size: int) -> int:
    """Odd Gaussian-blur kernel of about 10% of the image side (23 px at 224), at least 3."""
    return max(3, int(0.1 * size) // 2 * 2 + 1)


def view_transform(cfg: AugmentConfig | None = None, channels: int = 3) -> v2.Compose:
    """The transform that draws one augmented view (reference CIFAR recipe by default).

    Args:
        cfg: the recipe; :func:`reference_cifar_recipe` (the paper's values) when omitted.
        channels: channels of the input images, 1 or 3. With one channel the colour
            jitter keeps only brightness and contrast and random grayscale is dropped.

    Returns:
        A transform mapping a uint8 ``(C, H, W)`` tensor to a uint8 ``(C, size, size)``
        tensor. It draws from the global torch RNG (seed it around the call).

    Raises:
        DataError: if ``channels`` is not 1 or 3.
    """
    cfg = cfg or reference_cifar_recipe()
    if channels not in (1, 3):
        raise DataError(f"augmentation needs images with 1 or 3 channels, got {channels}")
    brightness, contrast, saturation, hue = cfg.jitter
    if channels == 1:
        saturation, hue = 0.0, 0.0
    steps: list[Callable[[torch.Tensor], torch.Tensor]] = [
        v2.RandomResizedCrop(cfg.size, scale=(cfg.scale_min, cfg.scale_max), antialias=True),
        v2.RandomHorizontalFlip(p=cfg.hflip_p),
        v2.RandomApply([v2.ColorJitter(brightness, contrast, saturation, hue)], p=cfg.jitter_p),
    ]
    if channels == 3:
        steps.append(v2.RandomGrayscale(p=cfg.grayscale_p))
    if cfg.blur_p > 0:
        blur = v2.GaussianBlur(blur_kernel_size(cfg.size), sigma=(0.1, 2.0))
        steps.append(v2.RandomApply([blur], p=cfg.blur_p))
    if cfg.solarize_p > 0:
        # 128 on the uint8 scale is the reference's PIL ImageOps.solarize threshold.
        steps.append(v2.RandomSolarize(threshold=128, p=cfg.solarize_p))
    return v2.Compose(steps)


class MultiViewTransform:
    """Apply one transform per view to the same image (lightly's MultiViewTransform).

    Args:
        transforms: one transform per view.
    """

    def __init__(self, transforms: Sequence[Callable[[torch.Tensor], torch.Tensor]]) -> None:
        if not transforms:
            raise ValueError("MultiViewTransform needs at least one transform")
        self.transforms = list(transforms)

    def __call__(self, image: torch.Tensor) -> list[torch.Tensor]:
        """Views of ``image``: uint8 ``(C, H, W)`` -> list of uint8 ``(C, size, size)``."""
        return [transform(image) for transform in self.transforms]


def multi_view_transform(cfg: AugmentConfig | None = None, channels: int = 3) -> MultiViewTransform:
    """``cfg.views`` copies of :func:`view_transform` as one :class:`MultiViewTransform`."""
    cfg = cfg or reference_cifar_recipe()
    transform = view_transform(cfg, channels)
    return MultiViewTransform([transform] * cfg.views)


def recipe_params(cfg: AugmentConfig) -> dict[str, Any]:
    """The parameters that determine the stored views (JSON-ready; seed apart)."""
    params = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_RECIPE}
    params["jitter"] = list(params["jitter"])
    return params


def draw_seed(*keys: int) -> int:
    """A 64-bit torch seed derived from integer keys, e.g. ``(seed, index)``."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0])


def image_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, C) uint8 array -> (C, H, W) uint8 tensor (a copy, so memmaps stay read-only)."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


def augment_images(images: Images, indices: range, transform: MultiViewTransform, seed: int) -> np.ndarray:
    """Draw the views of ``images[indices]``, each image under its own seed.

    Args:
        images: (N, H, W, C) uint8.
        indices: which images.
        transform: the multiview transform.
        seed: the base seed; image ``i`` is drawn under ``draw_seed(seed, i)``.

    Returns:
        (len(indices), views, C, size, size) uint8.
    """
    out = []
    with torch.random.fork_rng(devices=[]):
        for index in indices:
            torch.manual_seed(draw_seed(seed, index))
            out.append(torch.stack(transform(image_tensor(images[index]))).numpy())
    return np.stack(out)
