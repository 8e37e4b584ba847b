"""Pair datasets: two views of the same image per sample, a fresh pair each epoch.

:class:`CachedPairDataset` picks two different stored views from the view cache's array,
:class:`ShardPairs` from its shards;
:class:`OnTheFlyPairDataset` draws both with the recipe (the reference's way);
:class:`StorePairs` draws both from the image store's images at their own size. All draw
from ``(seed, epoch, index)`` only, so any DataLoader worker yields the same pairs.
:class:`StoreImages` yields the store's images alone, for views drawn on the device.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from litdata import StreamingDataset
from torch.utils.data import Dataset, get_worker_info

from imsvd.augment.cache import ShardedViews, open_view_cache
from imsvd.augment.device import ragged_collate
from imsvd.augment.recipe import draw_seed, image_tensor, view_transform
from imsvd.config import AugmentConfig
from imsvd.data import Images
from imsvd.errors import DataError
from imsvd.store import decode_stored

logger = logging.getLogger(__name__)

Pair = tuple[torch.Tensor, torch.Tensor]


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: a bijective, well-mixed hash of uint64 values."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def pair_indices(seed: int, epoch: int, indices: np.ndarray, views: int) -> tuple[np.ndarray, np.ndarray]:
    """Two different view indices per image, a pure function of (seed, epoch, index).

    A counter-based generator (SplitMix64 over the keys), so a batch is drawn in a few
    vectorised operations and any worker draws the same pairs.

    Args:
        seed: the dataset seed.
        epoch: the epoch.
        indices: (B,) image indices.
        views: views stored per image (at least 2).

    Returns:
        (first, second): two (B,) int64 arrays with ``first != second``.
    """
    with np.errstate(over="ignore"):
        key = _mix64(np.asarray(seed & 0xFFFFFFFFFFFFFFFF, np.uint64) + np.uint64(0x9E3779B97F4A7C15))
        key = _mix64(key ^ np.uint64(epoch & 0xFFFFFFFFFFFFFFFF))
        draw = _mix64(key ^ np.asarray(indices, dtype=np.uint64))
    first = (draw % np.uint64(views)).astype(np.int64)
    offset = ((draw >> np.uint64(32)) % np.uint64(views - 1)).astype(np.int64)
    return first, (first + 1 + offset) % views


class _EpochPairs(Dataset[Pair]):
    """A pair dataset whose pairs are a pure function of (seed, epoch, index)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw the pairs of ``epoch`` (call before creating the epoch's iterator)."""
        self.epoch = epoch


class CachedPairDataset(_EpochPairs):
    """Pairs of two different cached views of the same image, a fresh pair each epoch.

    Args:
        views: (N, V, C, H, W) uint8 array (usually the memmap of :func:`open_view_cache`).
        seed: seeds the choice of views together with the epoch and the index.
    """

    def __init__(self, views: np.ndarray, seed: int) -> None:
        if views.ndim != 5 or views.dtype != np.uint8 or views.shape[1] < 2:
            raise DataError(f"views must be (N, V>=2, C, H, W) uint8, got {views.dtype} {views.shape}")
        super().__init__(seed)
        self.views = views

    def __len__(self) -> int:
        return len(self.views)

    def __getitems__(self, indices: Sequence[int]) -> list[Pair]:
        """A batch in one read of the memmap (DataLoader uses this when present)."""
        index = np.asarray(indices, dtype=np.int64)
        first, second = pair_indices(self.seed, self.epoch, index, self.views.shape[1])
        a = torch.from_numpy(np.ascontiguousarray(self.views[index, first]))
        b = torch.from_numpy(np.ascontiguousarray(self.views[index, second]))
        return list(zip(a.unbind(0), b.unbind(0), strict=True))

    def __getitem__(self, index: int) -> Pair:
        return self.__getitems__([index])[0]


class OnTheFlyPairDataset(_EpochPairs):
    """Pairs of views drawn on the fly (the reference's way): the transform applied twice.

    Args:
        images: (N, H, W, C) uint8 training images, C in {1, 3}.
        cfg: the recipe (``views``, ``workers`` and ``cache_dir`` are ignored).
        seed: seeds each pair together with the epoch and the index.
    """

    def __init__(self, images: Images, cfg: AugmentConfig, seed: int) -> None:
        if images.ndim != 4 or images.dtype != np.uint8 or images.shape[-1] not in (1, 3):
            raise DataError(
                f"images must be (N, H, W, C) uint8, C in (1, 3), got {images.dtype} {images.shape}"
            )
        super().__init__(seed)
        self.images = images
        self.transform = view_transform(cfg, images.shape[-1])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Pair:
        image = image_tensor(self.images[index])
        # A DataLoader worker owns its global RNG; in the main process restore the caller's.
        scope = contextlib.nullcontext() if get_worker_info() else torch.random.fork_rng(devices=[])
        with scope:
            torch.manual_seed(draw_seed(self.seed, self.epoch, index))
            return self.transform(image), self.transform(image)


class StreamedPairs(StreamingDataset):
    """Pairs streamed by litdata from a folder of shards: the store's images or the cache's views.

    litdata reads the chunks in turn, shuffles them and the items within a window, and
    spreads them over DDP ranks and DataLoader workers; the loader's position is part of its
    state (see :class:`imsvd.training.loop.StoreLoader`), so a run killed mid-epoch resumes
    where it stopped. Memory and reads stay sequential whatever the folder's size. A
    subclass turns one stored item into a pair, drawn from ``(seed, epoch, item)`` only.

    Args:
        folder: the litdata folder.
        seed: seeds the shuffle and the pairs.
        args: the subclass's constructor arguments, for :meth:`fresh`.
    """

    def __init__(self, folder: Path, seed: int, args: tuple[Any, ...]) -> None:
        super().__init__(str(folder), shuffle=True, drop_last=True, seed=seed)
        self.args = args
        self.pair_seed = seed

    def fresh(self) -> StreamedPairs:
        """The same dataset, built anew. litdata reads the DDP ranks when a dataset is built,
        so each rank builds its own once its process group exists."""
        return type(self)(*self.args)

    def __getitem__(self, index: Any) -> Pair:
        return self.pair(super().__getitem__(index), int(getattr(index, "index", index)))

    def pair(self, item: dict[str, Any], position: int) -> Pair:
        """The pair of the stored ``item`` at ``position`` in the folder."""
        raise NotImplementedError


class StorePairs(StreamedPairs):
    """Pairs of views drawn on the fly from the store's images at their own size.

    Each view is the recipe's RandomResizedCrop of the whole stored image, so crops sample
    the original resolution (the reference's ImageNet way).

    Args:
        directory: a split's litdata folder (:func:`imsvd.store.split_directory`).
        cfg: the augmentation recipe (``views``, ``workers`` and ``cache_dir`` are ignored).
        channels: channels of the stored images (1 or 3).
        seed: seeds the shuffle and the views.
    """

    def __init__(self, directory: Path, cfg: AugmentConfig, channels: int, seed: int) -> None:
        super().__init__(directory, seed, (directory, cfg, channels, seed))
        self.draw_view = view_transform(cfg, channels)

    def pair(self, item: dict[str, Any], position: int) -> Pair:
        image = image_tensor(decode_stored(item["image"]))
        # A DataLoader worker owns its global RNG; in the main process restore the caller's.
        scope = contextlib.nullcontext() if get_worker_info() else torch.random.fork_rng(devices=[])
        with scope:
            torch.manual_seed(draw_seed(self.pair_seed, self.current_epoch, position))
            return self.draw_view(image), self.draw_view(image)


class StoreImages(StreamedPairs):
    """The store's images decoded at their own size, for views drawn on the device.

    The workers decode; :class:`imsvd.augment.device.DeviceViews` crops and colours both
    views of a whole batch on the training device (``pretrain.crop_on: device``). Items
    are single uint8 ``(C, H, W)`` tensors of different sizes, batched by
    :func:`imsvd.augment.device.ragged_collate`.

    Args:
        directory: a split's litdata folder (:func:`imsvd.store.split_directory`).
        seed: seeds the shuffle.
    """

    collate = staticmethod(ragged_collate)

    def __init__(self, directory: Path, seed: int) -> None:
        super().__init__(directory, seed, (directory, seed))

    def pair(self, item: dict[str, Any], position: int) -> torch.Tensor:  # type: ignore[override]
        return image_tensor(decode_stored(item["image"]))


class ShardPairs(StreamedPairs):
    """Pairs of two different cached views of the same image, streamed from a sharded cache.

    Streamed, not read by index: random access would remap a chunk for almost every
    item (534 views/s in ``bench/view_cache_formats.py``). The two views of an item are
    drawn with :func:`pair_indices`, as from the array.

    Args:
        views: the sharded cache (:func:`open_view_cache`).
        seed: seeds the shuffle and the choice of views.
    """

    def __init__(self, views: ShardedViews, seed: int) -> None:
        super().__init__(views.folder, seed, (views, seed))
        self.views = views

    def pair(self, item: dict[str, Any], position: int) -> Pair:
        first, second = pair_indices(
            self.pair_seed, self.current_epoch, np.array([position]), self.views.shape[1]
        )
        a, b = self.views.item_views(item, [int(first[0]), int(second[0])])
        return torch.from_numpy(a), torch.from_numpy(b)


def pair_dataset(
    train_images: Images, fingerprint: str, cfg: AugmentConfig, use_cache: bool, seed: int
) -> tuple[Dataset[Pair], str]:
    """The pair dataset pretraining reads: the view cache when valid, else on the fly.

    Args:
        train_images: (N, H, W, C) uint8 training images.
        fingerprint: ``ImageData.fingerprint`` of the validated data.
        cfg: the recipe the cache must have been built with.
        use_cache: False forces on-the-fly augmentation.
        seed: seeds the pairs (with the epoch and the index).

    Returns:
        (dataset, "cache") or (dataset, "on-the-fly"). The dataset of a sharded cache is a
        :class:`ShardPairs`, which the training loop streams with litdata's loader.
    """
    if use_cache:
        views = open_view_cache(cfg, fingerprint)
        if views is not None and len(views) == len(train_images) and views.shape[2] == train_images.shape[-1]:
            if isinstance(views, ShardedViews):
                return ShardPairs(views, seed), "cache"
            return CachedPairDataset(views, seed), "cache"
        if views is not None:
            logger.warning(
                "view cache not used: it holds %s, training images are %s", views.shape, train_images.shape
            )
        logger.warning("augmenting on the fly (slower): run the augment pipeline to build the cache")
    return OnTheFlyPairDataset(train_images, cfg, seed), "on-the-fly"
