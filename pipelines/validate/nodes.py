"""Nodes of the `validate` pipeline: read the configured source, validate it, accept it.

Two nodes so that a failed validation still persists its report (node 1's output)
while the validated images and manifest (node 2's outputs) keep their previous version.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from imsvd.config import DataConfig, ValidateConfig, parse
from imsvd.data import ImageData
from imsvd.decoding import cpu_count
from imsvd.errors import ValidationFailed
from imsvd.sources import PendingImages, load_source
from imsvd.store import StoredImages, discard_stream, publish_stream, stream_into_store, write_image_store
from imsvd.validation import check_images


def load_and_check(
    data_params: dict[str, Any], validate_params: dict[str, Any]
) -> tuple[ImageData, pd.DataFrame, dict[str, Any]]:
    """Read the images of ``data.source`` and run the validation suite on their manifest.

    Args:
        data_params: the ``data`` parameters (parsed into :class:`DataConfig`).
        validate_params: the ``validate`` parameters (parsed into :class:`ValidateConfig`).

    Returns:
        The candidate images, their manifest, and the validation report (JSON-able).

    Raises:
        ConfigError: on a bad parameter.
        DataError: when the source cannot be read.
    """
    data_config = parse(DataConfig, data_params, "data")
    validate_config = parse(ValidateConfig, validate_params, "validate")
    source = load_source(data_config)
    data, originals = source.data, source.originals
    del source  # so the pending images are freed once data is the store's
    if isinstance(data.images, PendingImages):  # larger than data.max_in_memory_mb: into the store as read
        data = stream_into_store(data, Path(data_config.store_dir), data_config.workers or cpu_count())
    manifest, report = check_images(data, originals, validate_config)
    report["source"] = data_config.source
    report["holdout"] = data_config.holdout  # "validation": the test split is a slice of training
    report["streamed"] = isinstance(data.images, StoredImages)
    return data, manifest, report


def accept_validated(
    candidate_images: ImageData,
    candidate_manifest: pd.DataFrame,
    validation_report: dict[str, Any],
    data_params: dict[str, Any],
) -> tuple[ImageData, pd.DataFrame, dict[str, Any]]:
    """Pass the candidates on when the report says the validation succeeded, and write
    them to the image store (:mod:`imsvd.store`).

    The store replaces the previous one only once it is complete, and only for accepted
    images, so a failed validation leaves every earlier output in place.

    Args:
        candidate_images: images from :func:`load_and_check`.
        candidate_manifest: their manifest.
        validation_report: the report of :func:`load_and_check`.
        data_params: the ``data`` parameters (the source folder and ``data.store_dir``).

    Returns:
        The validated images, their manifest with the ``shard`` of each image, and the
        store's index.

    Raises:
        ValidationFailed: naming each failed expectation, when the report failed.
        DataError: naming the file, when an image file cannot be read again for the store.
    """
    if not validation_report.get("success"):
        discard_stream(candidate_images)
        raise ValidationFailed(validation_report.get("message") or "image validation failed")
    config = parse(DataConfig, data_params, "data")
    if isinstance(candidate_images.images, StoredImages):  # streamed: its staged store goes in place
        accepted, index = publish_stream(candidate_images, Path(config.store_dir))
    else:
        folder = Path(str(config.path)) if config.source == "image_folder" else None
        accepted, index = (
            candidate_images,
            write_image_store(candidate_images, Path(config.store_dir), folder),
        )
    manifest = candidate_manifest.assign(shard=index.pop("shards"))
    return accepted, manifest, index
