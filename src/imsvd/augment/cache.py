"""The view cache: ``views`` augmented views of every training image, drawn once.

Two formats, chosen by size (``augment.max_array_mb``):

- **array**: one uint8 ``.npy`` file of shape ``(N, views, C, H, W)`` that training
  memory-maps. Fastest, but every page read stays mapped, so a run's resident memory
  grows with the cache (page cache the kernel may reclaim, yet counted in RSS).
- **shards**: a litdata dataset in ``shards/``, one item per image in chunks of 4 MB (the store's ``CHUNK_BYTES``),
  streamed by litdata's loader, which maps at most 4 chunks at a time (memory flat in N). Views up to ``augment.encode_above`` pixels a side
  are stored as raw uint8 (PNG saves little on small crops and costs a decode per view);
  larger ones as lossless PNG, one per view, so a pair decodes two views, not all.

A JSON manifest sits beside either. It is written last and is the commit marker: data
without a manifest that matches it byte for byte (SHA-256 of every file) is never used.
A build holds a lock on the folder, runs in a process pool with a progress bar, and
writes under a temporary name, so a killed build never leaves a cache that verifies.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import json
import logging
import math
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from litdata.streaming.writer import BinaryWriter
from tqdm.auto import tqdm

from imsvd.augment.recipe import augment_images, multi_view_transform, recipe_params
from imsvd.config import AugmentConfig
from imsvd.data import Images
from imsvd.decoding import cpu_count, die_with_parent, frozen_heap
from imsvd.errors import DataError
from imsvd.io import atomic_path, atomic_write_text, sha256_file, sha256_stream
from imsvd.store import CHUNK_BYTES, decode_stored, forget_readers, png_bytes, reader
from imsvd.validation import staged_folder

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: the "format" field and the sharded format
ARRAY_NAME = "views.npy"
SHARDS_NAME = "shards"
MANIFEST_NAME = "manifest.json"
LOCK_NAME = ".build.lock"


@dataclass(frozen=True)
class ViewCache:
    """What :func:`build_view_cache` did.

    Attributes:
        manifest: the manifest stored beside the views.
        path: the ``.npy`` file (format "array") or the shards folder (format "shards").
        reused: True when a valid cache was found and no augmentation ran.
        reason: why the cache was (re)built, or ``"valid"``.
        seconds: build time, or checksum-verification time when reused.
    """

    manifest: dict[str, Any]
    path: Path
    reused: bool
    reason: str
    seconds: float


def cache_paths(cfg: AugmentConfig) -> tuple[Path, Path]:
    """(array file, manifest file) in ``cfg.cache_dir``."""
    folder = Path(cfg.cache_dir)
    return folder / ARRAY_NAME, folder / MANIFEST_NAME


def shards_path(cfg: AugmentConfig) -> Path:
    """The shards folder in ``cfg.cache_dir``."""
    return Path(cfg.cache_dir) / SHARDS_NAME


def cache_format(cfg: AugmentConfig, shape: tuple[int, ...]) -> str:
    """ "array" for a cache of ``shape`` up to ``cfg.max_array_mb`` MiB, else "shards"."""
    return "array" if math.prod(shape) / 2**20 <= cfg.max_array_mb else "shards"


def encodes_views(cfg: AugmentConfig) -> bool:
    """Whether shards store the views as PNG (views larger than ``cfg.encode_above``)."""
    return cfg.size > cfg.encode_above


class ShardedViews:
    """The views of a sharded cache: where they are and how to decode an item.

    Training streams them with litdata (:class:`imsvd.augment.ShardPairs`: chunks read in
    turn, shuffled within a window). :meth:`read` is random access, for checks and small
    reads: litdata maps a chunk per access and keeps only 4, so random reads over many
    chunks remap one per item. Picklable (only the folder, shape and encoding travel).

    Args:
        folder: the litdata folder the cache wrote.
        shape: (N, V, C, H, W) of the views.
        encoded: views are stored as PNG, one per view, rather than one raw array.
    """

    def __init__(self, folder: Path, shape: tuple[int, ...], encoded: bool) -> None:
        self.folder = Path(folder)
        self.shape = tuple(shape)
        self.encoded = encoded

    def __len__(self) -> int:
        return self.shape[0]

    def item_views(self, item: dict[str, Any], which: Any) -> np.ndarray:
        """Views ``which`` of one stored item: (len(which), C, H, W)."""
        if not self.encoded:
            return np.asarray(item["views"])[np.asarray(which)]
        return np.stack([decode_stored(item[f"view{v}"]).transpose(2, 0, 1) for v in which])

    def read(self, rows: np.ndarray) -> np.ndarray:
        """All views of images ``rows``: (len(rows), V, C, H, W)."""
        dataset = reader(self.folder)
        out = np.empty((len(rows), *self.shape[1:]), np.uint8)
        every = np.arange(self.shape[1])
        for row, image in enumerate(rows):
            out[row] = self.item_views(dataset[int(image)], every)
        return out


def shard_item(views: np.ndarray, encoded: bool) -> dict[str, Any]:
    """The litdata item of one image's (V, C, H, W) views."""
    if not encoded:
        return {"views": np.ascontiguousarray(views)}
    # One entry per view: litdata stores a list as JSON, and a pair decodes only its two.
    return {f"view{v}": png_bytes(view.transpose(1, 2, 0)) for v, view in enumerate(views)}


def _read_npy_header(handle: BinaryIO) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) of the ``.npy`` file open in ``handle``."""
    version = np.lib.format.read_magic(handle)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
    if fortran:
        raise ValueError("array is stored in Fortran order")
    return tuple(shape), dtype, handle.tell()


Views = np.ndarray | ShardedViews


def _inspect(cfg: AugmentConfig, fingerprint: str, mapped: bool) -> tuple[dict[str, Any] | None, str, Any]:
    """(manifest, "valid", views or None) for a usable cache, else (None, why not, None).

    ``views`` (when ``mapped``) is the array's memmap or the :class:`ShardedViews`.
    """
    _, manifest_path = cache_paths(cfg)
    if not manifest_path.is_file():
        return None, f"no manifest at {manifest_path}", None
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        return None, f"unreadable manifest {manifest_path}: {exc}", None
    if not isinstance(manifest, dict):
        return None, f"manifest {manifest_path} is not a JSON object", None
    expected = {
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "params": recipe_params(cfg),
        "seed": cfg.seed,
        "dtype": "uint8",
    }
    for key, value in expected.items():
        if manifest.get(key) != value:
            return None, f"{key} changed: cache has {manifest.get(key)!r}, wanted {value!r}", None
    shape = manifest.get("shape")
    if not (isinstance(shape, list) and len(shape) == 5 and all(isinstance(d, int) and d > 0 for d in shape)):
        return None, f"manifest {manifest_path} has no valid shape: {shape!r}", None
    if shape[1] != cfg.views or shape[3:] != [cfg.size, cfg.size]:
        return None, f"cache shape {shape} does not fit views={cfg.views}, size={cfg.size}", None
    wanted = cache_format(cfg, tuple(shape))
    if manifest.get("format") != wanted:
        why = f"augment.max_array_mb={cfg.max_array_mb} wants {wanted} for {math.prod(shape) / 2**20:.0f} MiB"
        return None, f"format changed: cache is {manifest.get('format')!r}, {why}", None
    if wanted == "array":
        return _inspect_array(cfg, manifest, mapped)
    return _inspect_shards(cfg, manifest, mapped)


def _inspect_array(
    cfg: AugmentConfig, manifest: dict[str, Any], mapped: bool
) -> tuple[dict[str, Any] | None, str, Any]:
    """:func:`_inspect` of an array cache.

    The checksum is taken and the memmap made from one open file, so the bytes mapped
    are the bytes verified even if a concurrent build renames a new array into place.
    """
    array_path, _ = cache_paths(cfg)
    try:
        handle = open(array_path, "rb")  # noqa: SIM115 - kept open for the memmap below
    except OSError as exc:
        return None, f"array file {array_path} cannot be opened: {exc}", None
    with handle:
        try:
            shape, dtype, offset = _read_npy_header(handle)
        except (OSError, ValueError) as exc:
            return None, f"unreadable array header in {array_path}: {exc}", None
        if list(shape) != manifest["shape"] or dtype != np.uint8:
            return None, f"array is {dtype} {list(shape)}, manifest says uint8 {manifest['shape']}", None
        size = os.fstat(handle.fileno()).st_size
        if size != offset + math.prod(shape):
            return None, f"array file has {size} bytes, expected {offset + math.prod(shape)}", None
        start = time.perf_counter()
        checksum = sha256_stream(handle)
        seconds = time.perf_counter() - start
        logger.info("view cache checksum of %.1f MB read in %.2f s", size / 1e6, seconds)
        if checksum != manifest.get("sha256"):
            return None, f"checksum of {array_path} does not match its manifest", None
        views = np.memmap(handle, dtype=np.uint8, mode="r", offset=offset, shape=shape) if mapped else None
    return manifest, "valid", views


def _inspect_shards(
    cfg: AugmentConfig, manifest: dict[str, Any], mapped: bool
) -> tuple[dict[str, Any] | None, str, Any]:
    """:func:`_inspect` of a sharded cache: every file's SHA-256, then the item count.

    Unlike the array's, the files verified are opened again by path when read: a build
    that replaces the folder while a run trains from it (the build lock keeps builds, not
    readers, apart) can hand that run chunks of the new cache, or a missing file. Kedro
    runs the augment stage before pretrain, so only two concurrent runs can do that.
    """
    folder = shards_path(cfg)
    if manifest.get("encoded") != encodes_views(cfg):
        return None, f"encoding changed: augment.encode_above={cfg.encode_above} at size {cfg.size}", None
    files = manifest.get("files")
    if not isinstance(files, dict) or "index.json" not in files:
        return None, "manifest lists no shard files", None
    start = time.perf_counter()
    total = 0
    index_bytes = b""
    for name, digest in files.items():
        path = folder / name
        try:
            with open(path, "rb") as handle:
                if name == "index.json":  # parsed below from the very bytes verified here
                    index_bytes = handle.read()
                    checksum = hashlib.sha256(index_bytes).hexdigest()
                else:
                    checksum = sha256_stream(handle)
                total += os.fstat(handle.fileno()).st_size
        except OSError as exc:
            return None, f"shard file {path} cannot be read: {exc}", None
        if checksum != digest:
            return None, f"checksum of {path} does not match its manifest", None
    logger.info("view cache checksums of %.1f MB read in %.2f s", total / 1e6, time.perf_counter() - start)
    index = json.loads(index_bytes)
    items = sum(int(chunk["chunk_size"]) for chunk in index["chunks"])
    if items != manifest["shape"][0]:
        return None, f"{folder} holds {items} images, manifest says {manifest['shape'][0]}", None
    views = ShardedViews(folder, tuple(manifest["shape"]), manifest["encoded"]) if mapped else None
    return manifest, "valid", views


def check_view_cache(cfg: AugmentConfig, fingerprint: str) -> tuple[dict[str, Any] | None, str]:
    """Check the cache in ``cfg.cache_dir`` against the data and the recipe.

    Cheap checks first (manifest, parameters, header, size), the SHA-256 of the array
    file last: a valid cache costs one sequential read of the array.

    Args:
        cfg: the recipe and seed the views must have been drawn with.
        fingerprint: ``ImageData.fingerprint`` of the validated data.

    Returns:
        (manifest, "valid") when usable, else (None, why not).
    """
    manifest, reason, _ = _inspect(cfg, fingerprint, mapped=False)
    return manifest, reason


def open_view_cache(cfg: AugmentConfig, fingerprint: str) -> Views | None:
    """The verified view cache, or None (reason logged).

    Args:
        cfg: the recipe and seed the views must have been drawn with.
        fingerprint: ``ImageData.fingerprint`` of the validated data.

    Returns:
        (N, views, C, size, size) uint8: a read-only memmap (format "array") or a
        :class:`ShardedViews` (format "shards"); None when missing or not matching.
    """
    _, reason, views = _inspect(cfg, fingerprint, mapped=True)
    if views is None:
        logger.warning("view cache not used: %s", reason)
    return views


def available_workers(cfg: AugmentConfig) -> int:
    """``cfg.workers``, or the cores this process may run on."""
    return cfg.workers if cfg.workers is not None else cpu_count()


@contextlib.contextmanager
def _build_lock(folder: Path) -> Iterator[None]:
    """Exclusive lock on the cache folder; the kernel drops it if the process dies."""
    with open(folder / LOCK_NAME, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another build of the view cache in %s", folder)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_leftovers(folder: Path) -> None:
    """Delete temporary arrays of killed builds (safe: we hold the build lock)."""
    for leftover in folder.glob(f".{ARRAY_NAME}.*.tmp"):
        logger.info("removing %s, left by an interrupted build", leftover)
        leftover.unlink(missing_ok=True)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Tiny images run fastest single-threaded (intra-op threads only add overhead)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# Per-process state of the pool workers, set once by _init_worker.
_WORKER: dict[str, Any] = {}


def _init_worker(images: Images, cfg: AugmentConfig, out_path: str | None) -> None:
    die_with_parent()
    torch.set_num_threads(1)
    _WORKER["images"] = images
    _WORKER["transform"] = multi_view_transform(cfg, images.shape[-1])
    _WORKER["seed"] = cfg.seed
    _WORKER["encoded"] = encodes_views(cfg)
    if out_path is not None:
        _WORKER["out"] = np.lib.format.open_memmap(out_path, mode="r+")


def _run_chunk(bounds: tuple[int, int]) -> int:
    start, stop = bounds
    out = _WORKER["out"]
    out[start:stop] = augment_images(
        _WORKER["images"], range(start, stop), _WORKER["transform"], _WORKER["seed"]
    )
    out.flush()
    return stop - start


def _shard_chunk(bounds: tuple[int, int]) -> list[dict[str, Any]]:
    start, stop = bounds
    views = augment_images(_WORKER["images"], range(start, stop), _WORKER["transform"], _WORKER["seed"])
    return [shard_item(item, _WORKER["encoded"]) for item in views]


def _chunks(n: int, workers: int) -> list[tuple[int, int]]:
    """About eight chunks per worker (load balance, progress), at most 256 images each."""
    step = max(1, min(256, math.ceil(n / (workers * 8))))
    return [(start, min(n, start + step)) for start in range(0, n, step)]


def _progress(total: int, enabled: bool) -> tqdm:
    # Off a TTY (logs, CI) a line every 10 s instead of a redrawn bar.
    interval = 0.5 if sys.stderr.isatty() else 10.0
    return tqdm(total=total, desc="view cache", unit="img", disable=not enabled, mininterval=interval)


@contextlib.contextmanager
def _pool(images: Images, cfg: AugmentConfig, workers: int, out_path: Path | None) -> Iterator[Any]:
    # fork shares the images with the workers without pickling them (gc kept off them: frozen_heap).
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    args = (images, cfg, None if out_path is None else str(out_path))
    with frozen_heap(), context.Pool(workers, _init_worker, args) as pool:
        yield pool


def _fill(out_path: Path, images: Images, cfg: AugmentConfig, workers: int, progress: bool) -> None:
    """Write the views of all ``images`` into the ``.npy`` file at ``out_path``."""
    chunks = _chunks(len(images), workers)
    if workers == 1:
        out = np.lib.format.open_memmap(out_path, mode="r+")
        transform = multi_view_transform(cfg, images.shape[-1])
        with _one_thread(), _progress(len(images), progress) as bar:
            for start, stop in chunks:
                out[start:stop] = augment_images(images, range(start, stop), transform, cfg.seed)
                bar.update(stop - start)
        out.flush()
        return
    with _pool(images, cfg, workers, out_path) as pool, _progress(len(images), progress) as bar:
        for done in pool.imap_unordered(_run_chunk, chunks):
            bar.update(done)


def _shard_items(images: Images, cfg: AugmentConfig, workers: int) -> Iterator[list[dict[str, Any]]]:
    """The shard items of ``images`` in order, a chunk at a time.

    At most two chunks per worker are in flight, so memory stays bounded however far
    the workers could run ahead of the writer.
    """
    chunks = _chunks(len(images), workers)
    if workers == 1:
        transform = multi_view_transform(cfg, images.shape[-1])
        encoded = encodes_views(cfg)
        with _one_thread():
            for start, stop in chunks:
                views = augment_images(images, range(start, stop), transform, cfg.seed)
                yield [shard_item(item, encoded) for item in views]
        return
    with _pool(images, cfg, workers, None) as pool:
        pending: collections.deque[Any] = collections.deque()
        for bounds in chunks:
            pending.append(pool.apply_async(_shard_chunk, (bounds,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _write_shards(
    folder: Path, images: Images, cfg: AugmentConfig, workers: int, progress: bool
) -> dict[str, str]:
    """Write the views of all ``images`` as a litdata dataset in ``folder``; return each file's SHA-256."""
    writer = BinaryWriter(str(folder), chunk_bytes=CHUNK_BYTES)
    count = 0
    with _progress(len(images), progress) as bar:
        for items in _shard_items(images, cfg, workers):
            for item in items:
                writer[count] = item
                count += 1
            bar.update(len(items))
    writer.done()
    writer.merge()
    return {path.name: sha256_file(path) for path in sorted(folder.iterdir()) if path.is_file()}


def build_view_cache(
    images: Images, fingerprint: str, cfg: AugmentConfig, progress: bool = True
) -> ViewCache:
    """Build the view cache of ``images``, or reuse a valid one.

    Reused when fingerprint, recipe, seed and format match the manifest and the stored
    files' shape and SHA-256 agree with it; otherwise rebuilt (the reason is logged).
    The format follows the size (:func:`cache_format`). The array or the shards folder is
    written under a temporary name and renamed when complete, the other format's files
    are then removed, and the manifest is written last, so a killed build never leaves
    a cache that verifies.

    Args:
        images: (N, H, W, C) uint8 training images, C in {1, 3}.
        fingerprint: ``ImageData.fingerprint`` of the validated data they come from.
        cfg: recipe, seed, workers and cache folder.
        progress: show a tqdm progress bar.

    Returns:
        The manifest and what happened.

    Raises:
        DataError: if ``images`` is not a non-empty (N, H, W, C) uint8 array, C in {1, 3}.
    """
    if images.ndim != 4 or images.dtype != np.uint8 or images.shape[-1] not in (1, 3) or len(images) == 0:
        raise DataError(
            f"view cache needs (N, H, W, C) uint8 images with C in (1, 3), got {images.dtype} {images.shape}"
        )
    array_path, manifest_path = cache_paths(cfg)
    array_path.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(array_path.parent):
        start = time.perf_counter()
        manifest, reason = check_view_cache(cfg, fingerprint)
        if manifest is not None and manifest["shape"][0] == len(images):
            seconds = time.perf_counter() - start
            path = array_path if manifest["format"] == "array" else shards_path(cfg)
            logger.info("view cache reused: %s (verified in %.2f s)", path, seconds)
            return ViewCache(manifest, path, True, "valid", seconds)
        if manifest is not None:
            reason = f"cache has {manifest['shape'][0]} images, data has {len(images)}"
        logger.info("building view cache in %s: %s", array_path.parent, reason)
        _remove_leftovers(array_path.parent)
        start = time.perf_counter()
        n, height, width, channels = images.shape
        shape = (n, cfg.views, channels, cfg.size, cfg.size)
        workers = max(1, min(available_workers(cfg), n))
        layout = cache_format(cfg, shape)
        stored: dict[str, Any]
        if layout == "array":
            path = array_path
            with atomic_path(array_path) as tmp:
                np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape).flush()
                _fill(tmp, images, cfg, workers, progress)
                stored = {"array_file": ARRAY_NAME, "sha256": sha256_file(tmp)}
                # The old manifest must not outlive the views it describes.
                manifest_path.unlink(missing_ok=True)
            shutil.rmtree(shards_path(cfg), ignore_errors=True)
        else:
            path = shards_path(cfg)
            with staged_folder(path) as staging:
                files = _write_shards(staging, images, cfg, workers, progress)
                stored = {"shards_dir": SHARDS_NAME, "encoded": encodes_views(cfg), "files": files}
                manifest_path.unlink(missing_ok=True)
            forget_readers(path)
            array_path.unlink(missing_ok=True)
        manifest = {
            "format_version": FORMAT_VERSION,
            "format": layout,
            "fingerprint": fingerprint,
            "params": recipe_params(cfg),
            "seed": cfg.seed,
            "shape": list(shape),
            "dtype": "uint8",
            "layout": "N,V,C,H,W",
            **stored,
            "input_shape": [n, height, width, channels],
            "torch": torch.__version__,
            "torchvision": _torchvision_version(),
        }
        atomic_write_text(manifest_path, json.dumps(manifest, indent=2) + "\n")
        seconds = time.perf_counter() - start
        logger.info(
            "view cache built (%s): %s views of %s in %.1f s with %d worker(s), %.1f MB",
            layout,
            n * cfg.views,
            shape[2:],
            seconds,
            workers,
            disk_bytes(path) / 1e6,
        )
        return ViewCache(manifest, path, False, reason, seconds)


def disk_bytes(path: Path) -> int:
    """Bytes of the file ``path``, or of the files under the folder ``path``."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _torchvision_version() -> str:
    import torchvision

    return torchvision.__version__
