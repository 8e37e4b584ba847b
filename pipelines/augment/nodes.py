"""Nodes of the `augment` pipeline: thin wrappers over :mod:`imsvd.augment`."""

from __future__ import annotations

from typing import Any

from imsvd import augment
from imsvd.config import AugmentConfig, parse
from imsvd.data import TRAIN, ImageData
from imsvd.validation import require_validated


def build_view_cache(
    validated_images: ImageData, validation_report: dict[str, Any], augment_params: dict[str, Any]
) -> dict[str, Any]:
    """Build (or reuse) the multiview cache of the training images.

    Args:
        validated_images: the validated data; its training split is augmented.
        validation_report: the report of the validation that accepted it.
        augment_params: the ``augment`` parameter section (see ``parameters_augment.yml``).

    Returns:
        The cache manifest (fingerprint, recipe, seed, shape, dtype, sha256, version).

    Raises:
        ConfigError: on a bad ``augment.*`` parameter.
        DataError: if ``validated_images`` is not data the last validation accepted.
    """
    cfg = parse(AugmentConfig, augment_params, "augment")
    data = require_validated(validated_images, validation_report, "augment")
    train = data.split(TRAIN)
    return augment.build_view_cache(train.images, data.fingerprint, cfg).manifest
