"""Nodes of the `augment` pipeline: thin wrappers over :mod:`imsvd.augment`."""

from __future__ import annotations

from typing import Any

import numpy as np

from imsvd import augment
from imsvd.config import AugmentConfig, parse
from imsvd.data import TRAIN, ImageData
from imsvd.errors import DataError


def _check_images(validated_images: Any) -> ImageData:
    """Refuse anything but a canonical ImageData with at least two training images."""
    if not isinstance(validated_images, ImageData):
        raise DataError(
            f"validated_images must be an imsvd.data.ImageData (data/03_primary/images.npz), "
            f"got {type(validated_images).__name__}"
        )
    images = validated_images.images
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DataError(
            f"validated_images.images must be (N, H, W, C) uint8 with C 1 or 3, "
            f"got {images.dtype} {images.shape}"
        )
    n_train = int(np.sum(validated_images.splits == TRAIN))
    if n_train < 2:
        raise DataError(f"validated_images has {n_train} training image(s); the view cache needs at least 2")
    return validated_images


def build_view_cache(validated_images: ImageData, augment_params: dict[str, Any]) -> dict[str, Any]:
    """Build (or reuse) the multiview cache of the training images.

    Args:
        validated_images: the validated data; its training split is augmented.
        augment_params: the ``augment`` parameter section (see ``parameters_augment.yml``).

    Returns:
        The cache manifest (fingerprint, recipe, seed, shape, dtype, sha256, version).

    Raises:
        ConfigError: on a bad ``augment.*`` parameter.
        DataError: if ``validated_images`` is not a proper ImageData.
    """
    cfg = parse(AugmentConfig, augment_params, "augment")
    data = _check_images(validated_images)
    train = data.split(TRAIN)
    return augment.build_view_cache(train.images, data.fingerprint, cfg).manifest
