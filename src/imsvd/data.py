"""The canonical image set every data source is turned into.

Its pixels are one (N, H, W, C) uint8 array: a NumPy array when the data fits in memory,
or a :class:`LazyImages` (the image store read row by row, :class:`imsvd.store.StoredImages`)
when it does not. Code that reads pixels indexes them in batches (``images[a:b]``,
``images[index]``) and takes subsets with :func:`take`, so it works on both.
"""

from __future__ import annotations

import abc
import functools
import hashlib
import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from imsvd.errors import DataError

TRAIN = "train"
TEST = "test"
UNLABELLED = -1


def pixel_sha256(image: np.ndarray) -> str:
    """Hex SHA-256 of an image's shape and uint8 pixels.

    Args:
        image: (H, W, C) uint8.
    """
    digest = hashlib.sha256(str(image.shape).encode())
    digest.update(np.ascontiguousarray(image).data)  # the buffer itself: tobytes() would copy it
    return digest.hexdigest()


#: Bytes :func:`pixel_mean` sums at a time in uint32: ``255 * 2**24 < 2**32``, so no block's sum
#: can overflow, whatever the image's size.
MEAN_BLOCK = 1 << 24


def pixel_mean(image: np.ndarray) -> float:
    """Mean pixel value of a uint8 image: exactly ``image.mean(dtype=np.float64)``, in a sixth
    of the time (validation takes it of every file it streams).

    The sum is exact: each block of :data:`MEAN_BLOCK` bytes in uint32 (NumPy widens uint8 to
    uint32 three times as fast as to uint64: 44 against 132 us for 288x288 RGB), the blocks in
    Python ints. So is NumPy's float64 sum of fewer than 2**45 bytes (every partial sum is an
    integer below 2**53); both are divided by the same count, correctly rounded."""
    if not image.size:
        return float("nan")
    flat = image.reshape(-1)
    total = sum(
        int(flat[start : start + MEAN_BLOCK].sum(dtype=np.uint32))
        for start in range(0, flat.size, MEAN_BLOCK)
    )
    return total / image.size


class LazyImages(abc.ABC):
    """An (N, H, W, C) uint8 image array whose rows are read only when indexed.

    Indexing with an int, a slice, an index array or a boolean mask returns NumPy arrays,
    as an ndarray would; :meth:`take` gives a subset without reading anything. Turning the
    whole of it into one array (``np.asarray``) is refused: that is what it exists to avoid.
    """

    dtype = np.dtype(np.uint8)
    ndim = 4

    @property
    @abc.abstractmethod
    def shape(self) -> tuple[int, int, int, int]:
        """(N, H, W, C): every row is read at this height, width and channel count."""

    @abc.abstractmethod
    def read(self, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (int positions) as a (len(rows), H, W, C) uint8 array."""

    @abc.abstractmethod
    def take(self, index: Any) -> LazyImages:
        """The subset ``index`` (positions or boolean mask), nothing read."""

    @abc.abstractmethod
    def row_digests(self) -> list[str]:
        """:func:`pixel_sha256` of every row, in order, known without reading the pixels."""

    @abc.abstractmethod
    def row_means(self) -> np.ndarray:
        """Mean pixel value of every row, in order, known without reading the pixels."""

    @abc.abstractmethod
    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays that :meth:`ImageData.from_arrays` turns back into this (keys
        ``store_*``; no pixels)."""

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def __len__(self) -> int:
        return self.shape[0]

    def positions(self, index: Any) -> np.ndarray:
        """Row positions selected by ``index`` (a slice, an index array or a boolean mask)."""
        return np.arange(len(self))[index]

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            return self.read(np.asarray([self.positions(key)]))[0]
        return self.read(np.atleast_1d(self.positions(key)))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        raise DataError(
            f"{type(self).__name__} of {self.shape} is read in batches (images[a:b]): "
            "it is not turned into one in-memory array"
        )


#: Pixels as every stage takes them: in memory, or read from the store in batches.
Images = np.ndarray | LazyImages


def take(images: Images, index: Any) -> Images:
    """``images[index]`` for an array; the lazy subset for :class:`LazyImages`."""
    return images.take(index) if isinstance(images, LazyImages) else images[index]


def row_digests(images: Images) -> list[str]:
    """:func:`pixel_sha256` of every image (from the store's record when lazy)."""
    if isinstance(images, LazyImages):
        return images.row_digests()
    return [pixel_sha256(image) for image in images]


def hash_lines(digest: Any, values: Iterable[Any], rows: int = 8192) -> None:
    """``digest.update("\\n".join(map(str, values)).encode())`` without the joined copy:
    ``rows`` values at a time (200,000 digests joined whole are 13 MB of text, and the
    list of strings behind them twice that). Bytes
    (ASCII digests kept as ``S64``) count as their text."""
    it = iter(values)
    first = True
    while chunk := list(itertools.islice(it, rows)):
        text = "\n".join(v.decode("ascii") if isinstance(v, bytes) else str(v) for v in chunk)
        digest.update((text if first else "\n" + text).encode())
        first = False


def is_labelled(labels: np.ndarray) -> bool:
    """True when a split has images and every one of them has a label."""
    return bool(len(labels)) and bool((labels != UNLABELLED).all())


@dataclass(frozen=True)
class ImageData:
    """A labelled (or unlabelled) image set in one canonical form.

    Attributes:
        images: (N, H, W, C) uint8 array, all images of one size (in memory, or
            :class:`LazyImages`).
        labels: (N,) int64; ``UNLABELLED`` (-1) where unknown.
        splits: (N,) str array of ``"train"`` / ``"test"``.
        ids: (N,) str array, a stable id per image (file path relative to the data
            folder, or ``<source>/<split>/<index>``).
        class_names: names of the label indices, in index order.
    """

    images: Images
    labels: np.ndarray
    splits: np.ndarray
    ids: np.ndarray
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        n = len(self.images)
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise DataError(
                f"images must be a (N, H, W, C) uint8 array, got {self.images.dtype} {self.images.shape}"
            )
        for name in ("labels", "splits", "ids"):
            if len(getattr(self, name)) != n:
                raise DataError(f"{name} has {len(getattr(self, name))} entries for {n} images")

    def split(self, name: str) -> ImageData:
        """The subset of one split (``"train"`` or ``"test"``)."""
        mask = self.splits == name
        return ImageData(
            take(self.images, mask), self.labels[mask], self.splits[mask], self.ids[mask], self.class_names
        )

    @functools.cached_property
    def fingerprint(self) -> str:
        """SHA-256 over the shape, each image's :func:`pixel_sha256`, labels, splits and
        ids: changes whenever the data does, and is the same whether the pixels are in
        memory or in the image store (whose record holds each image's digest).

        Computed once per object (hashing every pixel costs a second per 100 MB); the
        arrays are never modified in place (nodes do not mutate their inputs), so the
        cached value stays the data's.
        """
        digest = hashlib.sha256()
        digest.update(str(tuple(self.images.shape)).encode())
        hash_lines(digest, row_digests(self.images))
        digest.update(np.asarray(self.labels, dtype=np.int64).tobytes())
        hash_lines(digest, self.splits)
        hash_lines(digest, self.ids)
        return digest.hexdigest()

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays for ``np.savez`` (no pickled objects); lazy images are saved as
        where they are read from, not as pixels."""
        pixels = self.images.to_arrays() if isinstance(self.images, LazyImages) else {"images": self.images}
        return {
            **pixels,
            # asarray, not astype: no copy of what already has the type (the ids: 19 MB at 200,000).
            "labels": np.asarray(self.labels, dtype=np.int64),
            "splits": np.asarray(self.splits, dtype=str),
            "ids": np.asarray(self.ids, dtype=str),
            "class_names": np.asarray(self.class_names, dtype=str),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> ImageData:
        """Inverse of :meth:`to_arrays`."""
        pixels = {"store_directory"} if "images" not in arrays and "store_directory" in arrays else {"images"}
        missing = ({"labels", "splits", "ids", "class_names"} | pixels) - set(arrays)
        if missing:
            raise DataError(f"image arrays lack {sorted(missing)}")
        images: np.ndarray | LazyImages
        if "store_directory" in pixels:
            from imsvd.store import StoredImages  # the store reads ImageData: imported when used

            images = StoredImages.from_arrays(arrays)
        else:
            images = np.asarray(arrays["images"])
        return cls(
            images=images,
            labels=np.asarray(arrays["labels"], dtype=np.int64),
            splits=np.asarray(arrays["splits"]).astype(str),
            ids=np.asarray(arrays["ids"]).astype(str),
            class_names=tuple(str(c) for c in np.asarray(arrays["class_names"]).tolist()),
        )
