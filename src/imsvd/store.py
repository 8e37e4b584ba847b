"""The image store: every validated image as encoded bytes at its own size, in litdata shards.

Why litdata (Lightning's streaming engine) rather than a format of our own, webdataset or
mosaicml-streaming: it is the engine of this stack's trainer, its ``StreamingDataset``
splits the shards over DDP ranks and DataLoader workers by itself, and its
``StreamingDataLoader`` has a ``state_dict`` that Lightning saves in its checkpoints, so a
resumed run continues from where the loader stopped. webdataset has no resumable state
and mosaicml-streaming brings its own launcher conventions.

Layout (``data/03_primary/image_store`` by default)::

    image_store/
      store.json  the version, the fingerprint of the data it holds, and its rows' digest
      files.csv   (streamed stores) each file's path, hash, digest, mean and place: what a
                  rerun on a grown folder reuses instead of decoding
      train/   index.json, chunk-0-0.bin, chunk-0-1.bin ...   (one litdata dataset)
      test/    index.json, chunk-0-0.bin ...
      (streamed: chunk-<segment>-<n>.bin, each segment of the folder's files written by
      the worker that decoded it)

Each item is ``{"id": bytes, "label": int, "image": bytes}`` (the id's UTF-8, the image
written as a litdata ``File``: see :func:`store_item`). The image bytes are the file's own
when it is a JPEG or PNG that needs no conversion (mode L or RGB); anything else (other
formats, palette, alpha, 16-bit) is converted to the canonical 1- or 3-channel image and
stored as lossless PNG at its own size. Array sources (the digits, Fashion-MNIST) are
stored as PNG too. :func:`write_image_store` returns the store's index (counts, bytes,
chunks and the chunk of every image), which ``validate`` saves beside the manifest.

Two ways in. Data that fits in memory (``data.max_in_memory_mb``) is validated as one
array and written by :func:`write_image_store` once accepted. A folder larger than that is
streamed (:func:`stream_into_store`): worker processes decode each file once and write
its bytes into a staging store themselves, a segment of consecutive files each, sending
back the digest and mean of the image at its own size (nothing is resized: the digest is
of what the store keeps); ``validate`` publishes the staging store once the suite passed.
Every later stage then reads it as :class:`StoredImages`, row by row.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import logging
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from litdata import StreamingDataset
from litdata.streaming.writer import BinaryWriter
from litdata.types import File
from PIL import Image

from imsvd import decoding
from imsvd.data import TEST, TRAIN, ImageData, LazyImages, hash_lines, pixel_mean, pixel_sha256, row_digests
from imsvd.decoding import pillow_errors
from imsvd.errors import DataError
from imsvd.sources import (
    PendingImages,
    _name_files,
    bomb_limit,
    check_channels,
    decode_image,
    resize_array,
    to_canonical_array,
)
from imsvd.validation import new_staging, publish, staged_folder

logger = logging.getLogger(__name__)

# 2: the digests and means in files.csv are of each image at its own size (1: resized to
# the common size), so a record of version 1 is not reused; items hold the id as bytes and
# the image as a litdata File.
STORE_VERSION = 2
# litdata's chunk size. Its writer (0.2.76) held five to six times a chunk while it built
# one of Arrow rows (the items, then the rows copied three times; since store version 2 the
# items are Files, laid out without Arrow): writing 3,000 items of 80 kB peaked at +334 MiB
# with 64 MB chunks, +105 with 16 MB, +66 with 8 MB and +47 with 4 MB, and validation
# writes two splits. 4 MB still reads each chunk in one sequential
# read, keeps a loader's few prefetched chunks small, and gives a streamed shuffle more,
# smaller windows; 200,000 photos make about 4,000 chunk files.
CHUNK_BYTES = "4MB"
#: A SHA-256 in hex, kept as ASCII bytes.
DIGEST_DTYPE = "S64"
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


def store_item(image_id: Any, label: Any, image: bytes) -> dict[str, Any]:
    """One item of the store.

    The id goes in as its UTF-8 bytes: litdata (0.2.76) takes a string that names an
    existing file for that file and stores its bytes, and a folder's ids are paths relative
    to the folder, which exist relative to the working directory whenever ``data.path`` is
    ``.`` (tested). The image goes in as litdata's ``File``: plain bytes would make the item
    a row of Arrow, which its writer builds by copying every chunk three more times (46 %
    of the writing process's time while validation streamed 20,000 photos); as a file the
    chunk is the items' bytes one after the other, written in 0.16 ms an item instead of
    0.26, and read back as the same bytes.
    """
    return {"id": str(image_id).encode(), "label": int(label), "image": File(bytes=image)}


def decode_stored(raw: bytes) -> np.ndarray:
    """A stored image back to its (H, W, C) uint8 array."""
    with Image.open(io.BytesIO(raw)) as img:
        img.load()
        return np.array(to_canonical_array(img))  # a writable copy: torch.from_numpy takes it as is


def _split_summary(directory: Path, count: int) -> tuple[list[str], dict[str, Any]]:
    """Each item's chunk and the split's summary, from the index litdata wrote."""
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


@contextlib.contextmanager
def quiet_chunk_estimates() -> Iterator[None]:
    """Silence litdata's (0.2.76) warning that a chunk came out more than 10 % above
    ``chunk_bytes``. After the first chunk its writer counts every item at the mean size of
    the items of the chunk it wrote last, so with files of many sizes (JPEGs of a few kB
    next to PNGs of 700 kB) chunks overshoot: at 20,000 photos it warned 31 times, each a
    log record of eight lines, about chunks of 4.5 to 16 MB, which are harmless. Other
    warnings still show."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="An item was larger than the target chunk size")
        yield


def _write_split(
    directory: Path, items: Iterator[dict[str, Any]], chunk_bytes: str
) -> tuple[list[str], dict[str, Any]]:
    """Write one split as a litdata dataset; return each item's chunk and the split's summary."""
    writer = BinaryWriter(str(directory), chunk_bytes=chunk_bytes)
    count = 0
    with quiet_chunk_estimates():
        for count, item in enumerate(items, start=1):
            writer[count - 1] = item
        writer.done()
    writer.merge()
    return _split_summary(directory, count)


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
            yield store_item(data.ids[i], data.labels[i], raw)

    with staged_folder(target) as staging:
        for split in (TRAIN, TEST):
            positions = np.flatnonzero(data.splits == split)
            if not len(positions):
                continue
            shards, splits[split] = _write_split(staging / split, items(positions), chunk_bytes)
            shard_of[positions] = shards
        # The folder names its own data: a run killed after the folder was replaced but
        # before image_store.json was saved leaves an index that no longer matches it.
        _write_stamp(staging, data)
    logger.info(
        "image store %s: %s images (%d files kept as they were, %d stored as PNG)",
        target,
        " + ".join(f"{s['images']:,} {name}" for name, s in splits.items()),
        converted["kept"],
        converted["png"],
    )
    return _store_index(target, data.fingerprint, splits, converted["kept"], converted["png"], shard_of)


def _store_index(
    target: Path,
    fingerprint: str,
    splits: dict[str, Any],
    kept: int,
    png: int,
    shard_of: np.ndarray,
    **extra: Any,
) -> dict[str, Any]:
    """``image_store.json``: what the store holds, and the chunk of every image."""
    return {
        "version": STORE_VERSION,
        "directory": str(target),
        "fingerprint": fingerprint,
        "splits": splits,
        "kept_files": int(kept),
        "png_files": int(png),
        **extra,
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
    """Every item of a split in stored order (for tests and small checks), ids as text."""
    dataset = StreamingDataset(str(directory), shuffle=False)
    return [{**(item := dataset[i]), "id": bytes(item["id"]).decode()} for i in range(len(dataset))]


def _rows_digest(digests: Any) -> str:
    digest = hashlib.sha256()
    hash_lines(digest, digests)
    return digest.hexdigest()


def _write_stamp(folder: Path, data: ImageData, shape: tuple[int, ...] | None = None) -> None:
    stamp = {
        "version": STORE_VERSION,
        "fingerprint": data.fingerprint,
        "rows_digest": _rows_digest(row_digests(data.images)),
        "shape": list(shape[1:]) if shape else None,  # the common size the digests were taken at
    }
    (folder / STAMP).write_text(json.dumps(stamp))


#: litdata readers of store splits and sharded view caches, per process, folder and version of its index:
#: DataLoader workers, DDP ranks and validation's decoding workers each open their own (a
#: fork's copies are ignored), and a store replaced at the same path is opened afresh.
_READERS: dict[tuple[int, str, int, int], StreamingDataset] = {}


def reader(folder: Path) -> StreamingDataset:
    """This process's random-access litdata reader of the dataset in ``folder``."""
    name = str(folder)
    index = os.stat(os.path.join(name, "index.json"))
    key = (os.getpid(), name, index.st_ino, index.st_mtime_ns)
    if key not in _READERS:
        _READERS[key] = StreamingDataset(name, shuffle=False)
    return _READERS[key]


def stored_item(directory: Path, split: str, position: int) -> bytes:
    """The stored bytes of item ``position`` of ``directory``'s ``split`` folder."""
    return bytes(reader(Path(directory) / split)[position]["image"])


def forget_readers(directory: Path) -> None:
    """Drop this process's readers of ``directory`` (moved, replaced or removed)."""
    prefix = str(Path(directory)) + os.sep
    for key in [k for k in _READERS if k[1].startswith(prefix)]:
        del _READERS[key]


class StoredImages(LazyImages):
    """Validated images read from the image store, one row at a time, at one common size.

    Row ``i`` is item ``position[i]`` of the store's ``split[i]`` folder, decoded and resized
    (Lanczos) to the validation's common size exactly as an in-memory folder is, so the
    pixels are the same either way. Each row's digest and mean come from validation's
    record, and are of the image at its own size, as the manifest's. Each process opens its
    own litdata datasets (DataLoader workers, DDP ranks).

    Args:
        directory: the store (``data.store_dir``, or the staging folder while validating).
        split: the store folder of each row (``"train"`` / ``"test"``).
        position: each row's index in that folder.
        shape: (N, H, W, C), the common size.
        digests: each row's :func:`imsvd.data.pixel_sha256`, of the image at its own size.
        means: each row's mean pixel value, at its own size.
        index: the store's summary (counts, bytes, chunks, each row's chunk), set by
            :func:`stream_into_store`; empty when loaded back.
    """

    def __init__(
        self,
        directory: Path,
        split: np.ndarray,
        position: np.ndarray,
        shape: tuple[int, int, int, int],
        digests: np.ndarray,
        means: np.ndarray,
        index: dict[str, Any] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.split = np.asarray(split, dtype=str)
        self.position = np.asarray(position, dtype=np.int64)
        self._shape = (len(self.split), *(int(v) for v in shape[1:]))
        # ASCII hex as bytes: a quarter of numpy's 4-byte characters (48 MB at 200,000 rows).
        self.digests = np.asarray(digests, dtype=DIGEST_DTYPE)
        self.means = np.asarray(means, dtype=np.float64)
        self.index = index or {}

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return self._shape  # type: ignore[return-value]

    def read(self, rows: np.ndarray) -> np.ndarray:
        _, height, width, channels = self.shape
        out = np.empty((len(rows), height, width, channels), dtype=np.uint8)
        for k, i in enumerate(rows):
            raw = stored_item(self.directory, str(self.split[i]), int(self.position[i]))
            out[k] = resize_array(decode_stored(raw), (height, width))
        return out

    def take(self, index: Any) -> StoredImages:
        rows = self.positions(index)
        return StoredImages(
            self.directory,
            self.split[rows],
            self.position[rows],
            self.shape,
            self.digests[rows],
            self.means[rows],
        )

    def row_digests(self) -> list[str]:
        return [d.decode("ascii") for d in self.digests]

    def row_means(self) -> np.ndarray:
        return self.means

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "store_directory": np.asarray(str(self.directory)),
            "store_split": self.split,
            "store_position": self.position,
            "store_shape": np.asarray(self.shape, dtype=np.int64),
            "store_digests": self.digests,
            "store_means": self.means,
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> StoredImages:
        """Back from :meth:`to_arrays`, checked against the store folder's stamp.

        Raises:
            DataError: when the store is missing or holds other images.
        """
        try:
            directory = Path(str(arrays["store_directory"]))
            images = cls(
                directory,
                arrays["store_split"],
                arrays["store_position"],
                tuple(int(v) for v in arrays["store_shape"]),  # type: ignore[arg-type]
                arrays["store_digests"],
                arrays["store_means"],
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise DataError(f"the image store's record is incomplete ({exc})") from None
        try:
            stamp = json.loads((directory / STAMP).read_text())
        except (OSError, ValueError):
            stamp = {}
        if stamp.get("rows_digest") != _rows_digest(images.digests):
            raise DataError(
                f"the image store {directory} is missing or holds other images than the record says: "
                "run `kedro run --pipeline=validate` again"
            )
        return images

    def moved_to(self, directory: Path) -> StoredImages:
        """The same rows, read from ``directory`` (where the staging folder was published)."""
        moved = StoredImages(
            directory, self.split, self.position, self.shape, self.digests, self.means, self.index
        )
        moved.index = {**self.index, "directory": str(directory)}
        return moved


@dataclass(frozen=True)
class EncodedFile:
    """What a worker sends back for one file: the bytes to store, the digest and mean of the
    decoded image at its own size, the file's own hash, and whether the last store's record
    was reused."""

    payload: bytes
    kept: bool
    digest: str
    mean: float
    file_sha256: str = ""
    reused: bool = False


#: The streamed store's record of each file (``files.csv`` in the store folder): what a
#: rerun needs to skip the files that did not change.
FILES = "files.csv"
FILE_COLUMNS = ("path", "file_sha256", "sha256", "mean_intensity", "kept", "split", "position")


def path_key(path: str) -> int:
    """A 64-bit key of a file's path (BLAKE2b), by which :class:`Unchanged` finds its record."""
    return int.from_bytes(hashlib.blake2b(path.encode(), digest_size=8).digest(), "little")


@dataclass(frozen=True, eq=False)
class Unchanged:
    """The last streamed store's record of the files, for :func:`encode_file` to reuse.

    Held as columns sorted by each path's :func:`path_key`, with no object a file: a dict
    of each path's tuple held about 700 bytes a file, and the forked workers, looking the
    files up, wrote to those objects' counts and so copied their pages (a rerun of 200,000
    unchanged files peaked at 1.46 GiB with it, 1.28 without). Two paths may share a key (one
    pair in 2**64): :meth:`reuse` tries each record with the key and takes one only when its
    file has the same SHA-256, which describes these bytes whatever path recorded it.

    Attributes:
        directory: that store.
        keys: :func:`path_key` of each recorded path, sorted.
        file_sha256, digests: the file's SHA-256 and the image's digest (``S64``).
        means, kept, splits, positions: the image's mean, whether the file's bytes were
            stored as they were, and where it is in that store.
    """

    directory: Path
    keys: np.ndarray
    file_sha256: np.ndarray
    digests: np.ndarray
    means: np.ndarray
    kept: np.ndarray
    splits: np.ndarray
    positions: np.ndarray

    def reuse(self, path: Path, raw: bytes, file_sha256: str) -> EncodedFile | None:
        """The last store's record of ``path`` when the file is unchanged (same SHA-256):
        its bytes (the file's own, or the last store's PNG), digest and mean."""
        key = path_key(str(path))
        sha = file_sha256.encode("ascii")
        at = int(np.searchsorted(self.keys, key))
        while at < len(self.keys) and int(self.keys[at]) == key:
            if self.file_sha256[at] == sha:
                kept = bool(self.kept[at])
                payload = (
                    raw
                    if kept
                    else stored_item(self.directory, str(self.splits[at]), int(self.positions[at]))
                )
                digest = self.digests[at].decode("ascii")
                return EncodedFile(payload, kept, digest, float(self.means[at]), file_sha256, reused=True)
            at += 1
        return None


def last_record(target: Path, rows: int = 20_000) -> Unchanged | None:
    """The record of the streamed store at ``target``, else ``None``. A file's record does
    not depend on the rest of the folder (its digest is of the file's own pixels), so it
    stays valid when the common size changes. Read ``rows`` rows at a time."""
    columns: dict[str, list[np.ndarray]] = {name: [] for name in FILE_COLUMNS}
    try:
        stamp = json.loads((target / STAMP).read_text())
        if stamp.get("version") != STORE_VERSION:
            return None
        dtypes = {"path": str, "file_sha256": str, "sha256": str, "split": str}
        with pd.read_csv(target / FILES, dtype=dtypes, chunksize=rows) as table:
            for part in table:
                if list(part.columns) != list(FILE_COLUMNS):
                    return None
                columns["path"].append(np.fromiter(map(path_key, part["path"]), np.uint64, len(part)))
                for name in ("file_sha256", "sha256"):
                    columns[name].append(np.asarray(part[name].str.encode("ascii"), dtype=DIGEST_DTYPE))
                columns["mean_intensity"].append(part["mean_intensity"].to_numpy(np.float64))
                columns["kept"].append(part["kept"].to_numpy(bool))
                columns["split"].append(np.asarray(part["split"], dtype=str))
                columns["position"].append(part["position"].to_numpy(np.int64))
    except (OSError, ValueError, pd.errors.ParserError):
        return None
    if not columns["path"]:
        return None
    whole = {name: np.concatenate(parts) for name, parts in columns.items()}
    order = np.argsort(whole["path"], kind="stable")
    return Unchanged(target, *(whole[name][order] for name in FILE_COLUMNS))


def encode_file(path: Path, channels: int, unchanged: Unchanged | None = None) -> EncodedFile:
    """Read and decode one file once: the bytes to store (its own, or lossless PNG of the
    canonical image at its own size) and the digest and mean of that image, as the
    in-memory path computes them. Nothing is resized: the decoding is the work.

    When the last streamed store holds this path with the same content (SHA-256 of the
    file's bytes), nothing is decoded: its digest and mean are the record's, and its bytes
    the file's own or, when they were converted, the last store's PNG.

    Raises:
        DataError: with the reason, when the file cannot be read or decoded.
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot be read ({exc})") from None
    file_sha = hashlib.sha256(raw).hexdigest()
    reused = unchanged.reuse(path, raw, file_sha) if unchanged is not None else None
    if reused is not None:
        return reused
    with pillow_errors(), Image.open(io.BytesIO(raw)) as img:
        kept = img.format in KEPT_FORMATS and img.mode in KEPT_MODES
        img.load()
        array = check_channels(to_canonical_array(img), channels)
    payload = raw if kept else png_bytes(array)
    return EncodedFile(payload, kept, pixel_sha256(array), pixel_mean(array), file_sha)


def _write_table(
    path: Path,
    columns: dict[str, np.ndarray | Callable[[int, int], np.ndarray]],
    count: int,
    rows: int = 20_000,
) -> None:
    """``columns`` (``count`` rows) as a CSV, ``rows`` rows at a time: a DataFrame of every
    row turns each string of each column into a Python object at once (about 40 MB at
    200,000 files). A column is an array, or a function of ``(start, stop)`` that makes those
    rows. Byte strings (the digests) are written as their ASCII text."""

    def part_of(values: np.ndarray | Callable[[int, int], np.ndarray], start: int) -> np.ndarray:
        values = values(start, start + rows) if callable(values) else values[start : start + rows]
        return np.char.decode(values, "ascii") if values.dtype.kind == "S" else values

    for start in range(0, max(count, 1), rows):
        part = {name: part_of(values, start) for name, values in columns.items()}
        pd.DataFrame(part, columns=list(columns)).to_csv(
            path, mode="a" if start else "w", header=not start, index=False
        )


_RANK_VARIABLE = "DATA_OPTIMIZER_GLOBAL_RANK"


@contextlib.contextmanager
def _writer_rank(rank: int) -> Iterator[None]:
    """Give the litdata writers made inside ``rank``: litdata names a writer's chunks and its
    index after its rank (``chunk-<rank>-<n>.bin``, ``<rank>.index.json``), which it reads
    from ``DATA_OPTIMIZER_GLOBAL_RANK``, the variable its own ``optimize()`` sets in each
    of its workers; ``merge`` then joins the indexes in rank order."""
    before = os.environ.get(_RANK_VARIABLE)
    os.environ[_RANK_VARIABLE] = str(rank)
    try:
        yield
    finally:
        if before is None:
            del os.environ[_RANK_VARIABLE]
        else:
            os.environ[_RANK_VARIABLE] = before


def _segment_writer(directory: Path, segment: int, chunk_bytes: str) -> BinaryWriter:
    """A litdata writer of ``segment``'s items in one split's folder."""
    with _writer_rank(segment):
        writer = BinaryWriter(str(directory), chunk_bytes=chunk_bytes)
        rank = writer.rank  # litdata reads the variable once, here, and keeps the rank
    if rank != segment:  # pragma: no cover - a litdata that names its chunks another way
        raise RuntimeError(f"litdata's writer took rank {rank} for segment {segment}")
    return writer


def _merge_segments(directory: Path, segments: int, chunk_bytes: str) -> None:
    """Join the indexes the segments' writers left in ``directory`` into litdata's one
    ``index.json``, in segment order (litdata's own merge, as after its ``optimize()``)."""
    written = len(list(directory.glob("*.index.json")))
    if written != segments:  # litdata's merge would wait for the missing ones for ever
        raise DataError(f"{directory}: {written} segment indexes written, {segments} expected")
    BinaryWriter(str(directory), chunk_bytes=chunk_bytes).merge(num_workers=segments)


def stream_into_store(
    data: ImageData, target: Path, workers: int, chunk_bytes: str = CHUNK_BYTES
) -> ImageData:
    """Decode the files of ``data`` (:class:`PendingImages`) once each, in ``workers``
    processes, and write them as an image store in a staging folder beside ``target``.

    The files are cut into consecutive segments (:func:`decoding.map_segments`); the worker
    that takes a segment decodes its files and writes them into each split's folder as a
    litdata writer of its own, whose rank is the segment's number, and sends back only each
    file's digest, mean and hash. litdata's merge then joins the segments' indexes in rank
    order, so every split holds its images in file order whichever worker wrote what, and
    the same folder gives the same store. Memory stays flat: a worker holds one chunk a
    split.

    Nothing replaces ``target`` here; :func:`publish_stream` does, once validation passed.

    Returns:
        The same images as :class:`StoredImages` read from the staging folder, with the
        store's index (``images.index``).

    Raises:
        DataError: naming every file that could not be decoded (the staging folder is removed).
    """
    pending = data.images
    if not isinstance(pending, PendingImages):
        raise DataError(f"stream_into_store needs PendingImages, got {type(pending).__name__}")
    channels = pending.shape[3]
    n = len(pending)
    unchanged = last_record(target)
    encode = functools.partial(encode_file, channels=channels, unchanged=unchanged)
    splits_of, ids, labels = data.splits, data.ids, data.labels
    staging = new_staging(target)

    def write_segment(segment: int, start: int, stop: int) -> list[tuple[EncodedFile | None, str | None]]:
        # Runs in a worker (forked: it sees this frame's tables without their being sent).
        writers: dict[str, BinaryWriter] = {}
        items: dict[str, int] = {}  # each writer's items so far
        results: list[tuple[EncodedFile | None, str | None]] = []
        with quiet_chunk_estimates():
            for i in range(start, stop):
                try:
                    encoded = encode(pending.path(i))
                except DataError as exc:
                    results.append((None, str(exc)))
                    continue
                split = str(splits_of[i])
                if split not in writers:
                    writers[split] = _segment_writer(staging / split, segment, chunk_bytes)
                    items[split] = 0
                writers[split][items[split]] = store_item(ids[i], labels[i], encoded.payload)
                items[split] += 1
                results.append((dataclasses.replace(encoded, payload=b""), None))
            for writer in writers.values():
                writer.done()
        return results

    try:
        counts = {TRAIN: 0, TEST: 0}
        written: dict[str, set[int]] = {TRAIN: set(), TEST: set()}
        position = np.zeros(n, dtype=np.int64)
        # Fixed-width bytes, not str objects: 64 bytes a row instead of about 120.
        digests = np.zeros(n, dtype=DIGEST_DTYPE)
        means = np.zeros(n, dtype=np.float64)
        reused = 0
        kept = np.zeros(n, dtype=bool)
        file_sha = np.zeros(n, dtype=DIGEST_DTYPE)
        failures: list[str] = []
        bounds = decoding.segments(n)
        segment_of = np.repeat(np.arange(len(bounds)), [stop - start for start, stop in bounds])
        with bomb_limit(pending.max_image_pixels):
            results = decoding.map_segments(
                write_segment, bounds, pending.max_image_pixels, workers, "decoding into the store"
            )
            for i, (encoded, reason) in enumerate(results):
                if reason is not None:
                    failures.append(f"{pending.path(i)}: {reason}")
                if encoded is None or failures:  # after a failure: only naming every bad file
                    continue
                split = str(splits_of[i])
                position[i] = counts[split]  # merged in segment order, each segment in file order
                counts[split] += 1
                written[split].add(int(segment_of[i]))
                digests[i], means[i], file_sha[i] = encoded.digest, encoded.mean, encoded.file_sha256
                kept[i] = encoded.kept
                reused += encoded.reused
        if failures:
            raise DataError(f"{len(failures)} unreadable image file(s): {_name_files(failures)}")
        shard_of = np.empty(n, dtype=object)
        splits: dict[str, Any] = {}
        for split in (TRAIN, TEST):
            if not counts[split]:
                continue
            _merge_segments(staging / split, len(written[split]), chunk_bytes)
            shards, splits[split] = _split_summary(staging / split, counts[split])
            rows = np.flatnonzero(data.splits == split)
            shard_of[rows] = np.asarray(shards, dtype=object)[position[rows]]
        stored = StoredImages(staging, data.splits, position, pending.shape, digests, means)
        result = ImageData(stored, data.labels, data.splits, data.ids, data.class_names)
        record: dict[str, np.ndarray | Callable[[int, int], np.ndarray]] = {
            "path": pending.paths,  # made 20,000 rows at a time by _write_table
            "file_sha256": file_sha,
            "sha256": digests,
            "mean_intensity": means,
            "kept": kept,
            "split": data.splits,
            "position": position,
        }
        _write_table(staging / FILES, {name: record[name] for name in FILE_COLUMNS}, n)
        _write_stamp(staging, result, pending.shape)
        stored.index = _store_index(
            target,
            result.fingerprint,
            splits,
            kept.sum(),
            n - kept.sum(),
            shard_of,
            streamed=True,
            reused_files=reused,
        )
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        forget_readers(target)  # the last store is replaced once this one is published
    logger.info(
        "image store %s (staged): %s images streamed (%d files kept as they were, %d stored as PNG)",
        target,
        " + ".join(f"{s['images']:,} {name}" for name, s in splits.items()),
        kept.sum(),
        n - kept.sum(),
    )
    if unchanged is not None:
        logger.info(
            "%d of %d files unchanged since the last validation (same path, same SHA-256): reused, "
            "not decoded; %d decoded",
            reused,
            n,
            n - reused,
        )
    return result


def publish_stream(data: ImageData, target: Path) -> tuple[ImageData, dict[str, Any]]:
    """Put the staged store of :func:`stream_into_store` in ``target``'s place.

    Returns:
        The images read from ``target`` and the store's index.
    """
    stored = data.images
    if not isinstance(stored, StoredImages):
        raise DataError(f"publish_stream needs StoredImages, got {type(stored).__name__}")
    forget_readers(stored.directory)
    forget_readers(target)
    publish(stored.directory, target)
    moved = stored.moved_to(target)
    logger.info("image store %s: published", target)
    return ImageData(moved, data.labels, data.splits, data.ids, data.class_names), dict(moved.index)


def discard_stream(data: ImageData) -> None:
    """Remove the staging folder of a streamed store that validation refused."""
    if isinstance(data.images, StoredImages) and data.images.directory.name.endswith(".tmp"):
        forget_readers(data.images.directory)
        shutil.rmtree(data.images.directory, ignore_errors=True)
