"""Data sources: each one read into the canonical :class:`imsvd.data.ImageData`.

Three sources (``data.source``):

* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, values
  0..16), scaled to uint8 by ``round(v * 255 / 16)`` and split train/test with a seeded,
  stratified split. Ids are ``digits/<index in the bundled set>``.
* ``fashion_mnist``: the four standard IDX files (gzipped or not) with the official
  train/test split. Ids are ``fashion_mnist/<split>/<index>``.
* ``image_folder``: ``train/<class>/*`` and ``test/<class>/*`` image files (a ``train/``
  without class sub-folders is unlabelled). Ids are paths relative to ``data.path``.

Image folder decisions (the canonical form has one size and one channel count):

* Modes are converted to ``L`` (1 channel) or ``RGB`` (3 channels): ``1``/``L``/``LA``
  become ``L``; ``P``/``PA``/``RGBA``/``CMYK``/``YCbCr``/... become ``RGB`` (alpha is
  dropped, palettes expanded); 16-bit ``I;16*`` and ``I`` (taken as 16-bit, values
  outside 0..65535 refused) become ``L`` by ``value >> 8``; ``F`` is refused.
* A folder mixing 1- and 3-channel images after conversion is refused (the minority
  files are named): silently promoting grayscale to RGB would hide a mixed data set.
* Every image is resized with Pillow (Lanczos, aspect ratio not kept) to the most common
  ``(height, width)`` of the folder (ties: the smallest). :class:`OriginalImage` keeps
  each file's size and mode so validation checks the originals' bounds.
* Each image's digest and mean (the manifest's ``sha256`` and ``mean_intensity``) are of
  the image as decoded and converted, at its own size: what the image store keeps. They
  do not depend on the common size, so validating does not resize a file it streams into
  the store, and a file's record stays valid when the folder's common size changes.
"""

from __future__ import annotations

import functools
import gzip
import logging
import os
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image
from sklearn.model_selection import train_test_split

from imsvd import decoding
from imsvd.config import DataConfig
from imsvd.data import TEST, TRAIN, UNLABELLED, ImageData, LazyImages, pixel_mean, pixel_sha256, take
from imsvd.errors import DataError

logger = logging.getLogger(__name__)

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FASHION_MNIST_FILES = {
    TRAIN: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    TEST: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049
# Refuses an IDX header that declares an absurd payload before any allocation.
IDX_MAX_BYTES = 1 << 31
# Unreadable files named in one error message before "... and N more".
MAX_NAMED_FILES = 5

_TO_L = {"1", "L", "LA", "La"}
_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


@dataclass(frozen=True, slots=True)  # one per image: slots keep each to 64 bytes, not ~200
class OriginalImage:
    """What one source image looked like before conversion to the canonical form.

    Attributes:
        height: original height in pixels.
        width: original width in pixels.
        mode: Pillow mode of the file (``"L"``, ``"RGBA"``, ``"I;16"`` ...).
        sha256: :func:`imsvd.data.pixel_sha256` of the decoded, converted image at its own
            size; ``""`` when not decoded yet (the manifest then takes the digest of the
            image as held: a canonical source's row, or the store's record).
        mean: its mean pixel value (``nan`` when not decoded yet).
    """

    height: int
    width: int
    mode: str
    sha256: str = ""
    mean: float = float("nan")


@dataclass(frozen=True, eq=False)
class Originals:
    """Every image's :class:`OriginalImage`, as columns: indexing gives one, :meth:`take` a
    subset.

    Columns, not an object a file: as objects they took 118 bytes a file (with their
    integers) and outlived everything else made while the headers were read, keeping the
    memory around them held. After listing 20,000 files, ``tracemalloc`` found 550 bytes a
    file still held with the objects and a second array of paths, 261 without either.

    Attributes:
        heights, widths: (N,) int64.
        modes: (N,) str, Pillow's mode of each file.
        digests: (N,) str, :func:`imsvd.data.pixel_sha256` of each image at its own size,
            ``""`` where not decoded yet.
        means: (N,) float64, each image's mean (``nan`` where not decoded yet).
    """

    heights: np.ndarray
    widths: np.ndarray
    modes: np.ndarray
    digests: np.ndarray
    means: np.ndarray

    @classmethod
    def of(cls, items: Iterable[OriginalImage]) -> Originals:
        """The columns of ``items``."""
        items = list(items)
        return cls(
            np.asarray([o.height for o in items], dtype=np.int64),
            np.asarray([o.width for o in items], dtype=np.int64),
            np.asarray([o.mode for o in items], dtype=str),
            np.asarray([o.sha256 for o in items], dtype=str),
            np.asarray([o.mean for o in items], dtype=np.float64),
        )

    def __len__(self) -> int:
        return len(self.heights)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Originals):
            return NotImplemented
        return all(
            np.array_equal(a, b, equal_nan=a.dtype.kind == "f")
            for a, b in (
                (self.heights, other.heights),
                (self.widths, other.widths),
                (self.modes, other.modes),
                (self.digests, other.digests),
                (self.means, other.means),
            )
        )

    __hash__ = None  # type: ignore[assignment]  # mutable arrays: not hashable

    def __getitem__(self, row: int) -> OriginalImage:
        return OriginalImage(
            int(self.heights[row]),
            int(self.widths[row]),
            str(self.modes[row]),
            str(self.digests[row]),
            float(self.means[row]),
        )

    def __iter__(self) -> Iterator[OriginalImage]:
        return (self[row] for row in range(len(self)))

    def take(self, index: np.ndarray) -> Originals:
        """The rows ``index`` (positions or a boolean mask), in that order."""
        return Originals(
            self.heights[index], self.widths[index], self.modes[index], self.digests[index], self.means[index]
        )

    @property
    def decoded(self) -> bool:
        """Whether every image was decoded, with its digest and mean (and there are images)."""
        return bool(len(self)) and bool((self.digests != "").all())


@dataclass(frozen=True)
class SourceImages:
    """A source read into canonical form, with each image's original description.

    Attributes:
        data: the canonical image set.
        originals: each image's :class:`OriginalImage`, in ``data`` order.
    """

    data: ImageData
    originals: Originals


def load_source(config: DataConfig) -> SourceImages:
    """Read the source that ``config.source`` names.

    Args:
        config: the parsed ``data.*`` parameters.

    Returns:
        The canonical images and their originals.

    Raises:
        DataError: when the files cannot be read or are structurally wrong (the message
            names the file or folder).
    """
    if config.source == "digits":  # the array sources are read whole: they are small
        source = SourceImages(data := load_digits(config.test_size, config.seed), canonical_originals(data))
    elif config.source == "fashion_mnist":
        data = load_fashion_mnist(Path(str(config.path)))
        source = SourceImages(data, canonical_originals(data))
    else:
        source = load_image_folder(
            Path(str(config.path)), config.max_image_pixels, config.workers, config.max_in_memory_mb
        )
    source = subsample(source, config.max_train, config.max_test, config.seed)
    if config.holdout == "validation":
        source = validation_holdout(source, config.validation_size, config.seed)
    return source


def validation_holdout(source: SourceImages, share: float, seed: int) -> SourceImages:
    """The training split alone, cut into training and a held-out validation part that
    takes the ``test`` split's place: for choosing settings without looking at the test
    images (they are dropped). The cut is seeded and stratified by label where it can be.

    Raises:
        DataError: when too few training images remain for a validation part.
    """
    data = source.data
    index = np.flatnonzero(data.splits == TRAIN)
    count = int(round(share * len(index)))
    if count < 1 or count >= len(index):
        raise DataError(
            f"data.validation_size={share} leaves no validation or no training images of {len(index)}"
        )
    labels = data.labels[index]
    classes = np.unique(labels)
    usable = len(classes) > 1 and count >= len(classes) and len(index) - count >= len(classes)
    _, held = train_test_split(index, test_size=count, random_state=seed, stratify=labels if usable else None)
    splits = np.full(len(index), TRAIN, dtype=object)
    splits[np.isin(index, held)] = TEST
    subset = ImageData(
        take(data.images, index), labels, splits.astype(str), data.ids[index], data.class_names
    )
    logger.info(
        "data.holdout=validation: %d training images, %d held out in place of the test split",
        len(index) - count,
        count,
    )
    return SourceImages(subset, source.originals.take(index))


def subsample(source: SourceImages, max_train: int | None, max_test: int | None, seed: int) -> SourceImages:
    """At most ``max_train`` / ``max_test`` images per split, drawn seeded and stratified
    by label (scikit-learn's ``train_test_split``), order kept; ``None`` keeps all."""
    keep = np.ones(len(source.data.images), dtype=bool)
    for split, limit in ((TRAIN, max_train), (TEST, max_test)):
        index = np.flatnonzero(source.data.splits == split)
        if limit is None or limit >= len(index):
            continue
        labels = source.data.labels[index]
        stratify = labels if len(np.unique(labels)) > 1 and limit >= len(np.unique(labels)) else None
        chosen, _ = train_test_split(index, train_size=limit, random_state=seed, stratify=stratify)
        keep[np.setdiff1d(index, chosen)] = False
    if keep.all():
        return source
    data = source.data
    subset = ImageData(
        take(data.images, keep), data.labels[keep], data.splits[keep], data.ids[keep], data.class_names
    )
    return SourceImages(subset, source.originals.take(keep))


def canonical_originals(data: ImageData) -> Originals:
    """Originals of a source that is already canonical (every image as stored).

    Args:
        data: images of shape (N, H, W, C) with C in {1, 3}.
    """
    count, height, width, channels = data.images.shape
    return Originals(
        np.full(count, height, dtype=np.int64),
        np.full(count, width, dtype=np.int64),
        np.full(count, "L" if channels == 1 else "RGB"),
        np.full(count, ""),
        np.full(count, np.nan),
    )


# --- digits -------------------------------------------------------------------------


def scale_digits(values: np.ndarray) -> np.ndarray:
    """Scale digits pixel values 0..16 to uint8 0..255 (``round(v * 255 / 16)``).

    Args:
        values: float array of values in [0, 16].

    Returns:
        uint8 array of the same shape.
    """
    return np.clip(np.rint(np.asarray(values, dtype=np.float64) * 255.0 / 16.0), 0, 255).astype(np.uint8)


def load_digits(test_size: float, seed: int) -> ImageData:
    """scikit-learn's bundled 8x8 digits as (1797, 8, 8, 1) uint8, split train/test.

    Args:
        test_size: share of each class put in the test split, in (0, 1).
        seed: seed of the stratified split (same seed, same split).

    Returns:
        All 1,797 images in their bundled order, ids ``digits/<index>``.
    """
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = scale_digits(bunch.images)[..., np.newaxis]
    labels = np.asarray(bunch.target, dtype=np.int64)
    index = np.arange(len(labels))
    _, test_index = train_test_split(index, test_size=test_size, random_state=seed, stratify=labels)
    splits = np.full(len(labels), TRAIN, dtype=object)
    splits[test_index] = TEST
    return ImageData(
        images=images,
        labels=labels,
        splits=splits.astype(str),
        ids=np.asarray([f"digits/{i}" for i in index]),
        class_names=tuple(str(name) for name in bunch.target_names),
    )


# --- Fashion-MNIST (IDX) ----------------------------------------------------------


def parse_idx(raw: bytes, expected_magic: int, name: str) -> np.ndarray:
    """Parse an IDX payload of unsigned bytes.

    The header is a big-endian int32 magic (two zero bytes, a dtype byte 0x08 for
    unsigned bytes, a dimension count) and one big-endian uint32 per dimension.

    Args:
        raw: the whole (decompressed) file.
        expected_magic: 2051 for images (3 dims), 2049 for labels (1 dim).
        name: the file, named in errors.

    Returns:
        uint8 array of the declared shape.

    Raises:
        DataError: on a wrong magic number, a truncated header or payload, or
            trailing bytes.
    """
    if len(raw) < 4:
        raise DataError(f"{name}: truncated IDX file ({len(raw)} bytes, no header)")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise DataError(f"{name}: wrong IDX magic number {magic}, expected {expected_magic}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{name}: truncated IDX header")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    size = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != size:
        kind = "truncated" if len(raw) - header < size else "oversized"
        raise DataError(
            f"{name}: {kind} IDX file: header declares {dims} = {size} bytes, found {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def read_idx_file(path: Path, expected_magic: int) -> np.ndarray:
    """Read a (possibly gzipped) IDX file of unsigned bytes.

    Reads at most the header's declared size plus one byte, so a gzip bomb or a
    wildly wrong header is refused without decompressing everything.

    Args:
        path: the ``.gz`` or uncompressed file.
        expected_magic: 2051 for images, 2049 for labels.

    Raises:
        DataError: naming the file when it is unreadable, truncated or malformed.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            head = handle.read(4)
            if len(head) == 4 and int.from_bytes(head, "big") == expected_magic:
                dims = handle.read(4 * head[3])
                declared = int(
                    np.prod([int.from_bytes(dims[i : i + 4], "big") for i in range(0, len(dims), 4)])
                )
                if declared > IDX_MAX_BYTES:
                    raise DataError(
                        f"{path}: IDX header declares {declared} bytes, more than {IDX_MAX_BYTES}"
                    )
                raw = head + dims + handle.read(declared + 1)
            else:
                raw = head
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: cannot read IDX file ({exc})") from exc
    return parse_idx(raw, expected_magic, str(path))


def _idx_path(folder: Path, stem: str) -> Path:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    raise DataError(f"{folder}: missing {stem}.gz (or {stem}) for data.source=fashion_mnist")


def load_fashion_mnist(folder: Path) -> ImageData:
    """The Fashion-MNIST IDX files of ``folder`` with the official train/test split.

    Args:
        folder: holds ``train-images-idx3-ubyte(.gz)``, ``train-labels-idx1-ubyte(.gz)``,
            ``t10k-images-idx3-ubyte(.gz)`` and ``t10k-labels-idx1-ubyte(.gz)``.

    Returns:
        Images (N, H, W, 1) uint8, train first, ids ``fashion_mnist/<split>/<index>``.

    Raises:
        DataError: naming ``data.path`` or the file at fault.
    """
    if not folder.is_dir():
        raise DataError(f"data.path {folder} is not a folder (data.source=fashion_mnist)")
    parts = []
    for split, (image_stem, label_stem) in FASHION_MNIST_FILES.items():
        image_path, label_path = _idx_path(folder, image_stem), _idx_path(folder, label_stem)
        images = read_idx_file(image_path, IDX_IMAGES_MAGIC)
        labels = read_idx_file(label_path, IDX_LABELS_MAGIC).astype(np.int64)
        if len(images) != len(labels):
            raise DataError(f"{label_path}: {len(labels)} labels for {len(images)} images in {image_path}")
        if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
            raise DataError(f"{label_path}: label {labels.max()} outside 0..{len(FASHION_MNIST_CLASSES) - 1}")
        ids = np.asarray([f"fashion_mnist/{split}/{i}" for i in range(len(labels))])
        parts.append((images, labels, np.full(len(labels), split), ids, image_path))
    (train_images, *_, train_path), (test_images, *_, test_path) = parts
    if train_images.shape[1:] != test_images.shape[1:]:
        raise DataError(
            f"{test_path}: image size {test_images.shape[1:]} differs from {train_path}'s {train_images.shape[1:]}"
        )
    return ImageData(
        images=np.concatenate([p[0] for p in parts])[..., np.newaxis],
        labels=np.concatenate([p[1] for p in parts]),
        splits=np.concatenate([p[2] for p in parts]).astype(str),
        ids=np.concatenate([p[3] for p in parts]).astype(str),
        class_names=FASHION_MNIST_CLASSES,
    )


# --- image folders ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)  # one per file: no instance dict, no Path object
class ImageFile:
    """One image file found in an image folder.

    Attributes:
        path: the file as listed (maybe a symlink), as a string: a ``Path`` object costs
            several hundred bytes, which a folder of a million files pays a million times.
        image_id: path relative to the data folder (``train/cat/001.png``).
        split: ``"train"`` or ``"test"``.
        class_name: its class folder, or ``None`` when unlabelled.
    """

    path: str
    image_id: str
    split: str
    class_name: str | None


def image_extensions() -> frozenset[str]:
    """File extensions Pillow can open (lower case, with the dot)."""
    Image.init()
    return frozenset(ext.lower() for ext in Image.registered_extensions())


def _is_inside(path: Path, root: Path) -> bool:
    resolved = Path(os.path.realpath(path))
    return resolved == root or root in resolved.parents


PathOrEntry = TypeVar("PathOrEntry", Path, "os.DirEntry[str]")


def _visible(entries: Iterable[PathOrEntry]) -> list[PathOrEntry]:
    """The entries that are not hidden, by name (``Path`` objects or ``os.DirEntry``)."""
    return sorted((p for p in entries if not p.name.startswith(".")), key=lambda p: p.name)


def _name_files(paths: Sequence[str], limit: int = MAX_NAMED_FILES) -> str:
    shown = ", ".join(paths[:limit])
    return shown + (f" ... and {len(paths) - limit} more" if len(paths) > limit else "")


def list_image_files(root: Path) -> list[ImageFile]:
    """List the image files of ``root/train`` and ``root/test`` with their classes.

    Files directly inside ``<split>/<class>/`` are images of that class; a ``train/``
    with no sub-folder is unlabelled. Hidden entries are skipped; files with an
    extension Pillow does not know are skipped with a warning.

    Args:
        root: the image folder (``data.path``).

    Raises:
        DataError: for a missing folder, a missing split, a test/ without class
            folders, an empty class folder, no images at all, nested folders, test
            classes unknown to train, or symlinks resolving outside ``root``.
    """
    if not root.is_dir():
        raise DataError(f"data.path {root} is not a folder (data.source=image_folder)")
    real_root = Path(os.path.realpath(root))
    extensions = image_extensions()
    found: list[ImageFile] = []
    outside: list[str] = []
    skipped: list[str] = []
    classes: dict[str, list[str]] = {}
    for split in (TRAIN, TEST):
        split_dir = root / split
        if not split_dir.is_dir():
            raise DataError(f"missing split folder {split_dir}: data.path must hold train/ and test/")
        if not _is_inside(split_dir, real_root):
            raise DataError(f"symlinks resolving outside data.path {root} refused: {split_dir}")
        entries = _visible(list(split_dir.iterdir()))
        class_dirs = [p for p in entries if p.is_dir()]
        loose = [p for p in entries if not p.is_dir()]
        if class_dirs and loose:
            raise DataError(
                f"{split_dir} mixes class folders and loose files ({_name_files([str(p) for p in loose])})"
            )
        if not class_dirs and split == TEST:
            raise DataError(f"{split_dir} has no class folders: evaluation needs a labelled test/<class>/")
        groups = [(d, d.name) for d in class_dirs] if class_dirs else [(split_dir, None)]
        classes[split] = [d.name for d in class_dirs]
        for folder, class_name in groups:
            if folder.is_symlink() and not _is_inside(folder, real_root):
                outside.append(str(folder))
                continue
            count = 0
            # os.scandir: names and types without a Path object or a stat per file; only
            # a symlink needs resolving to know it stays inside data.path.
            with os.scandir(folder) as listing:
                listed = _visible(listing)
            prefix = f"{split}/{class_name}/" if class_name is not None else f"{split}/"
            for entry in listed:
                if entry.is_dir():
                    raise DataError(f"{entry.path}: nested folders are not supported inside {folder}")
                if os.path.splitext(entry.name)[1].lower() not in extensions:
                    skipped.append(entry.path)
                    continue
                if entry.is_symlink() and not _is_inside(Path(entry.path), real_root):
                    outside.append(entry.path)
                    continue
                found.append(ImageFile(entry.path, prefix + entry.name, split, class_name))
                count += 1
            if count == 0:
                raise DataError(f"{folder} holds no image files")
    if outside:
        raise DataError(f"symlinks resolving outside data.path {root} refused: {_name_files(outside)}")
    if skipped:
        logger.warning(
            "skipped %d file(s) without an image extension: %s", len(skipped), _name_files(skipped)
        )
    unknown = sorted(set(classes[TEST]) - set(classes[TRAIN])) if classes[TRAIN] else []
    if unknown:
        raise DataError(
            f"test classes unknown to train: {_name_files([str(root / TEST / c) for c in unknown])} "
            f"(train classes: {', '.join(classes[TRAIN])})"
        )
    return found


@contextmanager
def bomb_limit(max_image_pixels: int) -> Iterator[None]:
    """Set Pillow's decompression-bomb limit and make its warning an error, then restore.

    Args:
        max_image_pixels: the largest accepted ``width * height`` (``data.max_image_pixels``).
    """
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_image_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def to_canonical_array(img: Image.Image) -> np.ndarray:
    """Convert a decoded Pillow image to an (H, W, 1) or (H, W, 3) uint8 array.

    ``1``/``L``/``LA`` become one channel; 16-bit ``I;16*`` and ``I`` (values must lie
    in 0..65535) become one channel by ``value >> 8``; ``P``, ``RGBA`` and every other
    colour mode become RGB (alpha dropped, palette expanded).

    Args:
        img: a loaded image.

    Raises:
        DataError: for mode ``F`` or an ``I`` image with values outside 0..65535.
    """
    mode = img.mode
    if mode in _SIXTEEN_BIT:
        values = np.asarray(img).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 0xFFFF):
            raise DataError(f"mode {mode} values outside 0..65535 cannot be read as 16-bit")
        return (values >> 8).astype(np.uint8)[..., np.newaxis]
    if mode == "F":
        raise DataError("floating-point mode F is not supported")
    # convert() to the mode an image already has copies it: the array is a copy anyway.
    if mode in _TO_L:
        return np.asarray(img if mode == "L" else img.convert("L"), dtype=np.uint8)[..., np.newaxis]
    return np.asarray(img if mode == "RGB" else img.convert("RGB"), dtype=np.uint8)


def decode_image(path: Path) -> tuple[np.ndarray, OriginalImage]:
    """Open and fully decode one file into a canonical array.

    Call inside :func:`bomb_limit` so oversized images are refused.

    Args:
        path: an image file.

    Returns:
        The (H, W, C) uint8 array at the original size, and the original description.

    Raises:
        DataError: with the reason, when the file cannot be fully decoded.
    """
    with decoding.pillow_errors(), Image.open(path) as img:
        img.load()
        original = OriginalImage(img.height, img.width, img.mode)
        return to_canonical_array(img), original


def check_channels(array: np.ndarray, channels: int) -> np.ndarray:
    """``array`` when it has the ``channels`` its file's header promised.

    Raises:
        DataError: when it has not.
    """
    if array.shape[2] != channels:  # pragma: no cover - the header's mode fixes the channels
        raise DataError(f"decoded to {array.shape[2]} channels, its header said {channels}")
    return array


def _decode_checked(path: Path, channels: int) -> np.ndarray:
    """One file decoded, checked against its header's channels."""
    return check_channels(decode_image(path)[0], channels)


def _decode_resized(path: Path, size: tuple[int, int], channels: int) -> np.ndarray:
    """One file decoded, checked against its header's channels, resized to ``size``."""
    return resize_array(_decode_checked(path, channels), size)


def _decode_described(
    path: Path, size: tuple[int, int], channels: int
) -> tuple[np.ndarray, tuple[str, float]]:
    """One file resized to ``size``, with the digest and mean of the image at its own size."""
    array = _decode_checked(path, channels)
    return resize_array(array, size), (pixel_sha256(array), pixel_mean(array))


def most_common_size(sizes: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The most frequent ``(height, width)``; ties go to the smallest size.

    Args:
        sizes: one ``(height, width)`` per image (non-empty).
    """
    counts = Counter(sizes)
    return min(counts, key=lambda size: (-counts[size], size))


def resize_array(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an (H, W, C) uint8 array to ``size = (height, width)`` with Lanczos.

    Args:
        array: (H, W, 1) or (H, W, 3) uint8.
        size: target ``(height, width)``.
    """
    if array.shape[:2] == size:
        return array
    img = Image.fromarray(array[..., 0] if array.shape[2] == 1 else array)
    resized = np.asarray(img.resize((size[1], size[0]), Image.Resampling.LANCZOS), dtype=np.uint8)
    return resized.reshape(size[0], size[1], array.shape[2])


def canonical_channels(mode: str) -> int:
    """Channels of the canonical array of a Pillow ``mode`` (see :func:`to_canonical_array`).

    Raises:
        DataError: for mode ``F``.
    """
    if mode == "F":
        raise DataError("floating-point mode F is not supported")
    return 1 if mode in _SIXTEEN_BIT or mode in _TO_L else 3


class PendingImages(LazyImages):
    """A folder's image files, checked by their headers but not decoded yet: what
    :func:`load_image_folder` gives when the decoded images would not fit in memory.

    ``validate`` streams them into the image store (:func:`imsvd.store.stream_into_store`),
    decoding each file once, after the subsets (``data.max_train``, ``data.holdout``) have
    been drawn, so dropped files are never decoded. Reading rows decodes the files.

    The files are named by the folder and their ids (paths relative to it), the array the
    image set holds anyway: a second array of whole paths cost 212 bytes a file in the scale
    bench's folders (NumPy's fixed-width strings, each as wide as the longest path).

    Args:
        root: the folder (``data.path``), as listed.
        ids: each file's path relative to ``root``.
    """

    def __init__(
        self, root: Path, ids: np.ndarray, shape: tuple[int, int, int, int], max_image_pixels: int
    ) -> None:
        self.root = Path(root)
        self.ids = np.asarray(ids, dtype=str)
        self._shape = (len(self.ids), *shape[1:])
        self.max_image_pixels = max_image_pixels

    def path(self, row: int) -> Path:
        """The file of ``row``, as :func:`list_image_files` listed it."""
        return self.root / self.ids[row]

    def paths(self, start: int, stop: int) -> np.ndarray:
        """The files of rows ``start:stop``, as strings."""
        return np.asarray([str(self.root / i) for i in self.ids[start:stop]], dtype=str)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return self._shape  # type: ignore[return-value]

    def read(self, rows: np.ndarray) -> np.ndarray:
        _, height, width, channels = self.shape
        with bomb_limit(self.max_image_pixels):
            decoded = [_decode_resized(self.path(i), (height, width), channels) for i in rows]
        return np.stack(decoded) if decoded else np.zeros((0, height, width, channels), np.uint8)

    def take(self, index: Any) -> PendingImages:
        return PendingImages(self.root, self.ids[self.positions(index)], self.shape, self.max_image_pixels)

    def _unwritten(self) -> DataError:
        return DataError("the images are not in the image store yet (imsvd.store.stream_into_store)")

    def row_digests(self) -> list[str]:
        raise self._unwritten()

    def row_means(self) -> np.ndarray:
        raise self._unwritten()

    def to_arrays(self) -> dict[str, np.ndarray]:
        raise self._unwritten()


def load_image_folder(
    root: Path, max_image_pixels: int, workers: int | None = None, max_in_memory_mb: float | None = None
) -> SourceImages:
    """Read ``root/train`` and ``root/test`` into one canonical image set.

    Every file is decoded once, in ``workers`` processes (``None``: one per core), straight
    into its row of one array (:mod:`imsvd.decoding`); the headers, read first, fix the
    common size and the channels. All failures are collected and reported together.

    Args:
        root: the image folder (``data.path``).
        max_image_pixels: Pillow's decompression-bomb limit (``data.max_image_pixels``).
        workers: decoding processes (``data.workers``).
        max_in_memory_mb: above this decoded size (at the common size) nothing is decoded
            here: the images are :class:`PendingImages`, for validation to stream into the
            image store (``data.max_in_memory_mb``; ``None``: no limit).

    Returns:
        Images resized to the most common size, train first; ids are paths relative to
        ``root``; the originals keep each file's own size and mode, and (when decoded
        here) the digest and mean of the image at that size.

    Raises:
        DataError: for structural problems (see :func:`list_image_files`), unreadable
            files (listed by path with the reason), or mixed channel counts.
    """
    files = list_image_files(root)
    workers = workers or decoding.cpu_count()
    failures: list[str] = []
    readable: list[tuple[ImageFile, OriginalImage, int]] = []
    with bomb_limit(max_image_pixels):
        headers = decoding.read_headers([f.path for f in files], max_image_pixels, workers)
        for file, header in zip(files, headers, strict=True):
            try:
                if isinstance(header, str):
                    raise DataError(header)
                channels = canonical_channels(header.mode)
            except DataError as exc:
                failures.append(f"{file.path}: {exc}")
                continue
            readable.append((file, OriginalImage(header.height, header.width, header.mode), channels))
        channel_counts = Counter(c for _, _, c in readable)
        if len(channel_counts) > 1:  # decoding could not give one array: stop here
            minority = min(channel_counts, key=lambda c: (channel_counts[c], c))
            odd = [f.image_id for f, _, c in readable if c == minority]
            mixed = (
                f"{root}: images mix 1 and 3 channels after conversion; {len(odd)} file(s) have {minority}: "
                f"{_name_files(odd)}"
            )
            if failures:
                mixed = f"{len(failures)} unreadable image file(s) in {root}: {_name_files(failures)}; and {mixed}"
            raise DataError(mixed)
        size = most_common_size([(o.height, o.width) for _, o, _ in readable]) if readable else (1, 1)
        channels = next(iter(channel_counts), 1)
        decoded_mb = len(readable) * size[0] * size[1] * channels / 2**20
        if max_in_memory_mb is not None and decoded_mb > max_in_memory_mb:
            if failures:  # what the headers refused; the files are decoded only once, in the store's writing
                raise DataError(
                    f"{len(failures)} unreadable image file(s) in {root}: {_name_files(failures)}"
                )
            logger.info(
                "%d images of %dx%dx%d would take %.0f MiB decoded, more than data.max_in_memory_mb=%g: "
                "they are streamed into the image store and read from there",
                len(readable),
                size[0],
                size[1],
                channels,
                decoded_mb,
                max_in_memory_mb,
            )
            # Every file is readable here (failures raised above): the ids are the files'.
            ids = _ids(files)
            pending = PendingImages(root, ids, (len(readable), size[0], size[1], channels), max_image_pixels)
            return SourceImages(_folder_data(files, pending, ids), Originals.of(o for _, o, _ in readable))
        images, reasons, described = decoding.decode_into(
            [f.path for f, _, _ in readable],
            (size[0], size[1], channels),
            functools.partial(_decode_described, size=size, channels=channels),
            max_image_pixels,
            workers,
        )
    failures += [f"{f.path}: {reason}" for (f, _, _), reason in zip(readable, reasons, strict=True) if reason]
    if failures:
        raise DataError(f"{len(failures)} unreadable image file(s) in {root}: {_name_files(failures)}")
    originals = [
        OriginalImage(o.height, o.width, o.mode, digest, mean)
        for (_, o, _), (digest, mean) in zip(readable, described, strict=True)
    ]
    return SourceImages(_folder_data(files, images), Originals.of(originals))


def _ids(files: Sequence[ImageFile]) -> np.ndarray:
    return np.asarray([f.image_id for f in files])


def _folder_data(
    files: Sequence[ImageFile], images: np.ndarray | LazyImages, ids: np.ndarray | None = None
) -> ImageData:
    """The image set of a folder's ``files`` (all readable, in order) with these pixels
    (and these ``ids``, when already made: :func:`_ids`)."""
    class_names = sorted({f.class_name for f in files if f.class_name is not None and f.split == TRAIN})
    if not class_names:
        class_names = sorted({f.class_name for f in files if f.class_name is not None})
    index = {name: i for i, name in enumerate(class_names)}
    labels = [index[f.class_name] if f.class_name is not None else UNLABELLED for f in files]
    return ImageData(
        images=images,
        labels=np.asarray(labels, dtype=np.int64),
        splits=np.asarray([f.split for f in files]),
        ids=_ids(files) if ids is None else ids,
        class_names=tuple(class_names),
    )
