"""The canonical in-memory image set every data source is turned into."""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import numpy as np

from imsvd.errors import DataError

TRAIN = "train"
TEST = "test"
UNLABELLED = -1


def is_labelled(labels: np.ndarray) -> bool:
    """True when a split has images and every one of them has a label."""
    return bool(len(labels)) and bool((labels != UNLABELLED).all())


@dataclass(frozen=True)
class ImageData:
    """A labelled (or unlabelled) image set in one canonical form.

    Attributes:
        images: (N, H, W, C) uint8 array, all images of one size.
        labels: (N,) int64; ``UNLABELLED`` (-1) where unknown.
        splits: (N,) str array of ``"train"`` / ``"test"``.
        ids: (N,) str array, a stable id per image (file path relative to the data
            folder, or ``<source>/<split>/<index>``).
        class_names: names of the label indices, in index order.
    """

    images: np.ndarray
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
            self.images[mask], self.labels[mask], self.splits[mask], self.ids[mask], self.class_names
        )

    @functools.cached_property
    def fingerprint(self) -> str:
        """SHA-256 over pixels, labels, splits and ids: changes whenever the data does.

        Computed once per object (hashing every pixel costs a second per 100 MB); the
        arrays are never modified in place (nodes do not mutate their inputs), so the
        cached value stays the data's.
        """
        digest = hashlib.sha256()
        digest.update(str(self.images.shape).encode())
        digest.update(np.ascontiguousarray(self.images).tobytes())
        digest.update(self.labels.astype(np.int64).tobytes())
        digest.update("\n".join(map(str, self.splits)).encode())
        digest.update("\n".join(map(str, self.ids)).encode())
        return digest.hexdigest()

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays for ``np.savez`` (no pickled objects)."""
        return {
            "images": self.images,
            "labels": self.labels.astype(np.int64),
            "splits": self.splits.astype(str),
            "ids": self.ids.astype(str),
            "class_names": np.asarray(self.class_names, dtype=str),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> ImageData:
        """Inverse of :meth:`to_arrays`."""
        missing = {"images", "labels", "splits", "ids", "class_names"} - set(arrays)
        if missing:
            raise DataError(f"image arrays lack {sorted(missing)}")
        return cls(
            images=np.asarray(arrays["images"]),
            labels=np.asarray(arrays["labels"], dtype=np.int64),
            splits=np.asarray(arrays["splits"]).astype(str),
            ids=np.asarray(arrays["ids"]).astype(str),
            class_names=tuple(str(c) for c in np.asarray(arrays["class_names"]).tolist()),
        )
