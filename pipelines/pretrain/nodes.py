"""Pretraining node: typed parameters in, trained encoder and its history out."""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd
from matplotlib.figure import Figure
from torch.utils.data import Dataset

from imsvd.augment import Pair, StoreImages, StorePairs, pair_dataset
from imsvd.augment.device import DeviceViews
from imsvd.checkpoints import encoder_payload
from imsvd.config import AugmentConfig, PretrainConfig, parse
from imsvd.data import TRAIN, ImageData, is_labelled
from imsvd.plots import loss_curve_figure
from imsvd.preprocess import channel_stats
from imsvd.store import split_directory
from imsvd.tracking import lightning_logger
from imsvd.training import MonitorData, RunIdentity, crops_on_device, pretrain
from imsvd.validation import require_validated

log = logging.getLogger(__name__)


def pretrain_encoder(
    validated_images: ImageData,
    validation_report: dict[str, Any],
    view_cache_manifest: dict[str, Any] | None,
    image_store: dict[str, Any] | None,
    pretrain_params: dict[str, Any],
    augment_params: dict[str, Any],
) -> tuple[dict[str, Any], pd.DataFrame, Figure]:
    """Train the encoder with ``pretrain.method`` on pairs of augmented training views.

    With ``pretrain.stream_store`` the views are cropped on the fly from the image store's
    images at their own size, in the DataLoader workers or on the device
    (``pretrain.crop_on``). Otherwise they come from the augment pipeline's cache when
    it exists and its checksum, parameters and data fingerprint match
    (``view_cache_manifest`` is ``None`` when the augment pipeline has not run), else from
    on-the-fly augmentation of the validated arrays.

    Returns:
        The encoder (plain tensors and metadata), the per-step history and the loss-curve figure.
    """
    cfg = parse(PretrainConfig, pretrain_params, "pretrain")
    augment = parse(AugmentConfig, augment_params, "augment")
    data = require_validated(validated_images, validation_report, "pretrain")
    train_split = data.split(TRAIN)
    train = train_split.images
    fingerprint = data.fingerprint
    use_cache = cfg.use_cache and view_cache_manifest is not None
    dataset: Dataset[Pair] | StoreImages
    device_views = None
    if cfg.stream_store:
        directory = split_directory(image_store, TRAIN, fingerprint)
        if crops_on_device(cfg):
            dataset, source = StoreImages(directory, cfg.seed), "image store, views drawn on the device"
            device_views = DeviceViews(augment, train.shape[-1])
        else:
            dataset, source = StorePairs(directory, augment, train.shape[-1], cfg.seed), "image store"
    else:
        dataset, source = pair_dataset(train, fingerprint, augment, use_cache=use_cache, seed=cfg.seed)
    mean, std = channel_stats(train)
    identity = RunIdentity.of(cfg, augment, fingerprint)
    labelled = is_labelled(train_split.labels)
    if not labelled:
        log.info("online kNN monitor off: the training images are not all labelled")
    monitor = MonitorData(train, train_split.labels, augment.size) if labelled else None
    result = pretrain(
        dataset,
        source,
        train.shape[-1],
        mean,
        std,
        cfg,
        identity,
        logger=lightning_logger(),
        monitor_data=monitor,
        device_views=device_views,
    )
    if result.resumed_from_epoch is not None:
        log.info("resumed from epoch %d", result.resumed_from_epoch)
    payload = encoder_payload(
        result.module.encoder,
        cfg,
        in_channels=train.shape[-1],
        mean=mean,
        std=std,
        image_size=augment.size,
        extra={
            "identity": identity.as_dict(),
            "data_fingerprint": fingerprint,
            "view_source": source,
            "train_seconds": result.seconds,
        },
    )
    return payload, result.history, loss_curve_figure(result.history)
