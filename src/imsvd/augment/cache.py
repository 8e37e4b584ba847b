"""The view cache: ``views`` augmented views of every training image, drawn once.

Stored as one uint8 ``.npy`` file of shape ``(N, views, C, H, W)`` that training
memory-maps, with a JSON manifest beside it. The manifest is written last and is the
commit marker: an array without a manifest that matches it byte for byte (SHA-256) is
never used. A build holds a lock on the folder, runs in a process pool with a progress
bar, and writes under a temporary name, so a killed build never leaves a cache that
verifies.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from tqdm.auto import tqdm

from imsvd.augment.recipe import augment_images, multi_view_transform, recipe_params
from imsvd.config import AugmentConfig
from imsvd.data import Images
from imsvd.decoding import cpu_count, die_with_parent
from imsvd.errors import DataError
from imsvd.io import atomic_path, atomic_write_text, sha256_file, sha256_stream

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
ARRAY_NAME = "views.npy"
MANIFEST_NAME = "manifest.json"
LOCK_NAME = ".build.lock"


@dataclass(frozen=True)
class ViewCache:
    """What :func:`build_view_cache` did.

    Attributes:
        manifest: the manifest stored beside the array.
        array_path: the ``.npy`` file, shape ``manifest["shape"]``.
        reused: True when a valid cache was found and no augmentation ran.
        reason: why the cache was (re)built, or ``"valid"``.
        seconds: build time, or checksum-verification time when reused.
    """

    manifest: dict[str, Any]
    array_path: Path
    reused: bool
    reason: str
    seconds: float


def cache_paths(cfg: AugmentConfig) -> tuple[Path, Path]:
    """(array file, manifest file) in ``cfg.cache_dir``."""
    folder = Path(cfg.cache_dir)
    return folder / ARRAY_NAME, folder / MANIFEST_NAME


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


def _inspect(cfg: AugmentConfig, fingerprint: str, mapped: bool) -> tuple[dict[str, Any] | None, str, Any]:
    """(manifest, "valid", memmap or None) for a usable cache, else (None, why not, None).

    The checksum is taken and the memmap made from one open file, so the bytes mapped
    are the bytes verified even if a concurrent build renames a new array into place.
    """
    array_path, manifest_path = cache_paths(cfg)
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
    try:
        handle = open(array_path, "rb")  # noqa: SIM115 - kept open for the memmap below
    except OSError as exc:
        return None, f"array file {array_path} cannot be opened: {exc}", None
    with handle:
        try:
            shape, dtype, offset = _read_npy_header(handle)
        except (OSError, ValueError) as exc:
            return None, f"unreadable array header in {array_path}: {exc}", None
        if list(shape) != manifest.get("shape") or dtype != np.uint8:
            return None, f"array is {dtype} {list(shape)}, manifest says uint8 {manifest.get('shape')}", None
        if len(shape) != 5 or shape[1] != cfg.views or shape[3:] != (cfg.size, cfg.size):
            return None, f"array shape {list(shape)} does not fit views={cfg.views}, size={cfg.size}", None
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


def open_view_cache(cfg: AugmentConfig, fingerprint: str) -> np.ndarray | None:
    """The verified view cache as a read-only memmap, or None (reason logged).

    Args:
        cfg: the recipe and seed the views must have been drawn with.
        fingerprint: ``ImageData.fingerprint`` of the validated data.

    Returns:
        (N, views, C, size, size) uint8 memmap, or None when missing or not matching.
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


def _init_worker(images: Images, cfg: AugmentConfig, out_path: str) -> None:
    die_with_parent()
    torch.set_num_threads(1)
    _WORKER["images"] = images
    _WORKER["transform"] = multi_view_transform(cfg, images.shape[-1])
    _WORKER["seed"] = cfg.seed
    _WORKER["out"] = np.lib.format.open_memmap(out_path, mode="r+")


def _run_chunk(bounds: tuple[int, int]) -> int:
    start, stop = bounds
    out = _WORKER["out"]
    out[start:stop] = augment_images(
        _WORKER["images"], range(start, stop), _WORKER["transform"], _WORKER["seed"]
    )
    out.flush()
    return stop - start


def _chunks(n: int, workers: int) -> list[tuple[int, int]]:
    """About eight chunks per worker (load balance, progress), at most 256 images each."""
    step = max(1, min(256, math.ceil(n / (workers * 8))))
    return [(start, min(n, start + step)) for start in range(0, n, step)]


def _progress(total: int, enabled: bool) -> tqdm:
    # Off a TTY (logs, CI) a line every 10 s instead of a redrawn bar.
    interval = 0.5 if sys.stderr.isatty() else 10.0
    return tqdm(total=total, desc="view cache", unit="img", disable=not enabled, mininterval=interval)


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
    # fork shares the images with the workers without pickling them.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    with (
        context.Pool(workers, _init_worker, (images, cfg, str(out_path))) as pool,
        _progress(len(images), progress) as bar,
    ):
        for done in pool.imap_unordered(_run_chunk, chunks):
            bar.update(done)


def build_view_cache(
    images: Images, fingerprint: str, cfg: AugmentConfig, progress: bool = True
) -> ViewCache:
    """Build the view cache of ``images``, or reuse a valid one.

    Reused when fingerprint, recipe and seed match the manifest and the array's shape
    and SHA-256 agree with it; otherwise rebuilt (the reason is logged). The array is
    written under a temporary name, renamed when complete, and the manifest is written
    last, so a killed build never leaves a cache that verifies.

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
            logger.info("view cache reused: %s (verified in %.2f s)", array_path, seconds)
            return ViewCache(manifest, array_path, True, "valid", seconds)
        if manifest is not None:
            reason = f"cache has {manifest['shape'][0]} images, data has {len(images)}"
        logger.info("building view cache in %s: %s", array_path.parent, reason)
        _remove_leftovers(array_path.parent)
        start = time.perf_counter()
        n, height, width, channels = images.shape
        shape = (n, cfg.views, channels, cfg.size, cfg.size)
        workers = max(1, min(available_workers(cfg), n))
        with atomic_path(array_path) as tmp:
            np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape).flush()
            _fill(tmp, images, cfg, workers, progress)
            checksum = sha256_file(tmp)
            # The old manifest must not outlive the array it describes.
            manifest_path.unlink(missing_ok=True)
        manifest = {
            "format_version": FORMAT_VERSION,
            "fingerprint": fingerprint,
            "params": recipe_params(cfg),
            "seed": cfg.seed,
            "shape": list(shape),
            "dtype": "uint8",
            "layout": "N,V,C,H,W",
            "array_file": ARRAY_NAME,
            "sha256": checksum,
            "input_shape": [n, height, width, channels],
            "torch": torch.__version__,
            "torchvision": _torchvision_version(),
        }
        atomic_write_text(manifest_path, json.dumps(manifest, indent=2) + "\n")
        seconds = time.perf_counter() - start
        logger.info(
            "view cache built: %s views of %s in %.1f s with %d worker(s), %.1f MB",
            n * cfg.views,
            shape[2:],
            seconds,
            workers,
            array_path.stat().st_size / 1e6,
        )
        return ViewCache(manifest, array_path, False, reason, seconds)


def _torchvision_version() -> str:
    import torchvision

    return torchvision.__version__
