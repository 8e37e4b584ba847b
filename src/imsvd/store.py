"""The image store: every validated image as encoded bytes at its own size, in litdata shards.

Why litdata (Lightning's streaming engine) rather than a format of our own, webdataset or
mosaicml-streaming: it is the engine of this stack's trainer, its ``StreamingDataset``
splits the shards over DDP ranks and DataLoader workers by itself, and its
``StreamingDataLoader`` has a ``state_dict`` that Lightning saves in its checkpoints, so a
resumed run continues from where the loader stopped. webdataset has no resumable state
and mosaicml-streaming brings its own launcher conventions.

Layout (``data/03_primary/image_store`` by default)::

    image_store/
      store.json  the version and the fingerprint of the data it holds
      train/   index.json, chunk-0-0.bin, chunk-0-1.bin ...   (one litdata dataset)
      test/    index.json, chunk-0-0.bin ...

Each item is ``{"id": str, "label": int, "image": bytes}``. The bytes are the file's own
when it is a JPEG or PNG that needs no conversion (mode L or RGB); anything else (other
formats, palette, alpha, 16-bit) is converted to the canonical 1- or 3-channel image and
stored as lossless PNG at its own size. Array sources (the digits, Fashion-MNIST) are
stored as PNG too. :func:`write_image_store` returns the store's index (counts, bytes,
chunks and the chunk of every image), which ``validate`` saves beside the manifest.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from litdata import StreamingDataset
from litdata.streaming.writer import BinaryWriter
from PIL import Image

from imsvd.data import TEST, TRAIN, ImageData
from imsvd.decoding import pillow_errors
from imsvd.errors import DataError
from imsvd.sources import decode_image, to_canonical_array
from imsvd.validation import staged_folder

logger = logging.getLogger(__name__)

STORE_VERSION = 1
# litdata's chunk size: large enough that a chunk is one sequential read, small enough
# that a worker's few prefetched chunks stay well below a GiB.
CHUNK_BYTES = "64MB"
# Files whose bytes go into the store unchanged (Pillow format names).
KEPT_FORMATS = ("JPEG", "PNG")
KEPT_MODES = ("L", "RGB")
# The store folder's own record of its version and data.
STAMP = "store.json"


def png_bytes(image: np.ndarray) -> bytes:
    """Lossless PNG of an (H, W, C) uint8 image, C in {1, 3}."""
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
    return buffer.getvalue()


def file_bytes(path: Path) -> tuple[bytes, str]:
    """The bytes to store for an image file, and ``"kept"`` or ``"png"`` for how they came.

    Raises:
        DataError: naming the file when it cannot be read or decoded.
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot be read for the image store: {exc}") from None
    try:
        with pillow_errors(), Image.open(io.BytesIO(raw)) as img:
            kept = img.format in KEPT_FORMATS and img.mode in KEPT_MODES
        if kept:
            return raw, "kept"
        array, _ = decode_image(path)
    except DataError as exc:  # validated, then changed before the store was written
        raise DataError(f"{path}: {exc} (it changed after it was validated?)") from None
    return png_bytes(array), "png"


def decode_stored(raw: bytes) -> np.ndarray:
    """A stored image back to its (H, W, C) uint8 array."""
    with Image.open(io.BytesIO(raw)) as img:
        img.load()
        return np.array(to_canonical_array(img))  # a writable copy: torch.from_numpy takes it as is


def _write_split(
    directory: Path, items: Iterator[dict[str, Any]], chunk_bytes: str
) -> tuple[list[str], dict[str, Any]]:
    """Write one split as a litdata dataset; return each item's chunk and the split's summary."""
    writer = BinaryWriter(str(directory), chunk_bytes=chunk_bytes)
    count = 0
    for count, item in enumerate(items, start=1):
        writer[count - 1] = item
    writer.done()
    writer.merge()
    index = json.loads((directory / "index.json").read_text())
    shards: list[str] = []
    for chunk in index["chunks"]:
        shards += [f"{directory.name}/{chunk['filename']}"] * int(chunk["chunk_size"])
    if len(shards) != count:  # the writer keeps the order it was given; anything else is a bug
        raise DataError(f"{directory}: litdata wrote {len(shards)} items of {count}")
    summary = {
        "images": count,
        "chunks": len(index["chunks"]),
        "bytes": sum(int(c["chunk_bytes"]) for c in index["chunks"]),
    }
    return shards, summary


def write_image_store(
    data: ImageData,
    target: Path,
    folder: Path | None = None,
    chunk_bytes: str = CHUNK_BYTES,
) -> dict[str, Any]:
    """Write ``data`` as the image store at ``target`` (replacing it only once complete).

    Args:
        data: the validated images.
        target: the store's folder (``data.store_dir``).
        folder: the image folder (``data.path``) when the source is one: the files' own
            bytes are stored, at their own size. ``None`` for array sources.
        chunk_bytes: litdata's chunk size.

    Returns:
        The store's index: version, folder, data fingerprint, per split its images, chunks
        and bytes, how many files were kept as they were, and ``shards`` (the chunk of
        every image, in ``data`` order).

    Raises:
        DataError: naming the file, when a file cannot be read again.
    """
    shard_of = np.empty(len(data.ids), dtype=object)
    splits: dict[str, Any] = {}
    converted = {"kept": 0, "png": 0}

    def items(positions: np.ndarray) -> Iterator[dict[str, Any]]:
        for i in positions:
            if folder is None:
                raw, how = png_bytes(data.images[i]), "png"
            else:
                raw, how = file_bytes(folder / str(data.ids[i]))
            converted[how] += 1
            yield {"id": str(data.ids[i]), "label": int(data.labels[i]), "image": raw}

    with staged_folder(target) as staging:
        for split in (TRAIN, TEST):
            positions = np.flatnonzero(data.splits == split)
            if not len(positions):
                continue
            shards, splits[split] = _write_split(staging / split, items(positions), chunk_bytes)
            shard_of[positions] = shards
        # The folder names its own data: a run killed after the folder was replaced but
        # before image_store.json was saved leaves an index that no longer matches it.
        (staging / STAMP).write_text(json.dumps({"version": STORE_VERSION, "fingerprint": data.fingerprint}))
    logger.info(
        "image store %s: %s images (%d files kept as they were, %d stored as PNG)",
        target,
        " + ".join(f"{s['images']:,} {name}" for name, s in splits.items()),
        converted["kept"],
        converted["png"],
    )
    return {
        "version": STORE_VERSION,
        "directory": str(target),
        "fingerprint": data.fingerprint,
        "splits": splits,
        "kept_files": converted["kept"],
        "png_files": converted["png"],
        "shards": [str(s) for s in shard_of],
    }


def split_directory(index: dict[str, Any] | None, split: str, fingerprint: str) -> Path:
    """The litdata folder of ``split``, checked against the validated data.

    Raises:
        DataError: when there is no store, it is of another version or other data, or it
            lacks the split.
    """
    if not isinstance(index, dict):
        raise DataError(
            "no image store (data/03_primary/image_store.json): run `kedro run --pipeline=validate`"
        )
    if index.get("version") != STORE_VERSION or index.get("fingerprint") != fingerprint:
        raise DataError(
            f"the image store {index.get('directory')} is not the data the last validation "
            "accepted: run `kedro run --pipeline=validate` again"
        )
    root = Path(str(index["directory"]))
    try:
        stamp = json.loads((root / STAMP).read_text())
    except (OSError, ValueError):
        stamp = {}
    if stamp.get("fingerprint") != fingerprint:
        raise DataError(
            f"the image store {root} holds other data than its index says: "
            "run `kedro run --pipeline=validate` again"
        )
    directory = root / split
    if split not in index.get("splits", {}) or not (directory / "index.json").is_file():
        raise DataError(f"the image store has no {split} split at {directory}")
    return directory


def read_split(directory: Path) -> list[dict[str, Any]]:
    """Every item of a split in stored order (for tests and small checks)."""
    dataset = StreamingDataset(str(directory), shuffle=False)
    return [dataset[i] for i in range(len(dataset))]
