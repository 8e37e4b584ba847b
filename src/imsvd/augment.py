"""Multiview augmentation: the per-view recipe, the view cache and the pair datasets.

The recipe is the reference CIFAR one of IMSVD / VICReg / Barlow Twins (RandomResizedCrop,
horizontal flip, colour jitter, random grayscale), with Gaussian blur and solarization of
the reference ImageNet recipe as options. Everything is torchvision ``transforms.v2`` on
uint8 ``(C, H, W)`` tensors.

The view cache draws ``views`` augmented views of every training image once and stores
them as one uint8 ``.npy`` file of shape ``(N, views, C, H, W)`` that training memory-maps,
with a JSON manifest beside it. The manifest is written last and is the commit marker: an
array without a manifest that matches it byte for byte (SHA-256) is never used.

Randomness: torchvision's v2 transforms draw from the global torch RNG, so every image is
drawn under ``torch.manual_seed(f(seed, index))`` inside a forked RNG state; the bytes do
not depend on how many processes build the cache, and the caller's RNG is left alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info
from torchvision.transforms import v2
from tqdm.auto import tqdm

from imsvd.config import AugmentConfig
from imsvd.errors import DataError
from imsvd.io import atomic_path, atomic_write_text, sha256_file

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
ARRAY_NAME = "views.npy"
MANIFEST_NAME = "manifest.json"
LOCK_NAME = ".build.lock"
# Fields of AugmentConfig that do not change the stored bytes.
_NOT_RECIPE = ("seed", "workers", "cache_dir")

Pair = tuple[torch.Tensor, torch.Tensor]


# --------------------------------------------------------------------------- recipe


def blur_kernel_size(size: int) -> int:
    """Odd Gaussian-blur kernel of about 10% of the image side (23 px at 224), at least 3."""
    return max(3, int(0.1 * size) // 2 * 2 + 1)


def view_transform(cfg: AugmentConfig | None = None, channels: int = 3) -> v2.Compose:
    """The transform that draws one augmented view (reference CIFAR recipe by default).

    Args:
        cfg: the recipe; ``AugmentConfig()`` (the paper's values) when omitted.
        channels: channels of the input images, 1 or 3. With one channel the colour
            jitter keeps only brightness and contrast and random grayscale is dropped.

    Returns:
        A transform mapping a uint8 ``(C, H, W)`` tensor to a uint8 ``(C, size, size)``
        tensor. It draws from the global torch RNG (seed it around the call).

    Raises:
        DataError: if ``channels`` is not 1 or 3.
    """
    cfg = cfg or AugmentConfig()
    if channels not in (1, 3):
        raise DataError(f"augmentation needs images with 1 or 3 channels, got {channels}")
    brightness, contrast, saturation, hue = cfg.jitter
    if channels == 1:
        saturation, hue = 0.0, 0.0
    steps: list[Callable[[torch.Tensor], torch.Tensor]] = [
        v2.RandomResizedCrop(cfg.size, scale=(cfg.scale_min, cfg.scale_max), antialias=True),
        v2.RandomHorizontalFlip(p=cfg.hflip_p),
        v2.RandomApply([v2.ColorJitter(brightness, contrast, saturation, hue)], p=cfg.jitter_p),
    ]
    if channels == 3:
        steps.append(v2.RandomGrayscale(p=cfg.grayscale_p))
    if cfg.blur_p > 0:
        blur = v2.GaussianBlur(blur_kernel_size(cfg.size), sigma=(0.1, 2.0))
        steps.append(v2.RandomApply([blur], p=cfg.blur_p))
    if cfg.solarize_p > 0:
        # 128 on the uint8 scale is the reference's PIL ImageOps.solarize threshold.
        steps.append(v2.RandomSolarize(threshold=128, p=cfg.solarize_p))
    return v2.Compose(steps)


class MultiViewTransform:
    """Apply one transform per view to the same image (lightly's MultiViewTransform).

    Args:
        transforms: one transform per view.
    """

    def __init__(self, transforms: Sequence[Callable[[torch.Tensor], torch.Tensor]]) -> None:
        if not transforms:
            raise ValueError("MultiViewTransform needs at least one transform")
        self.transforms = list(transforms)

    def __call__(self, image: torch.Tensor) -> list[torch.Tensor]:
        """Views of ``image``: uint8 ``(C, H, W)`` -> list of uint8 ``(C, size, size)``."""
        return [transform(image) for transform in self.transforms]


def multi_view_transform(cfg: AugmentConfig | None = None, channels: int = 3) -> MultiViewTransform:
    """``cfg.views`` copies of :func:`view_transform` as one :class:`MultiViewTransform`."""
    cfg = cfg or AugmentConfig()
    transform = view_transform(cfg, channels)
    return MultiViewTransform([transform] * cfg.views)


def recipe_params(cfg: AugmentConfig) -> dict[str, Any]:
    """The parameters that determine the stored views (JSON-ready; seed apart)."""
    params = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_RECIPE}
    params["jitter"] = list(params["jitter"])
    return params


def draw_seed(*keys: int) -> int:
    """A 64-bit torch seed derived from integer keys, e.g. ``(seed, index)``."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0])


def _image_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, C) uint8 array -> (C, H, W) uint8 tensor (a copy, so memmaps stay read-only)."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


def augment_images(
    images: np.ndarray, indices: range, transform: MultiViewTransform, seed: int
) -> np.ndarray:
    """Draw the views of ``images[indices]``, each image under its own seed.

    Args:
        images: (N, H, W, C) uint8.
        indices: which images.
        transform: the multiview transform.
        seed: the base seed; image ``i`` is drawn under ``draw_seed(seed, i)``.

    Returns:
        (len(indices), views, C, size, size) uint8.
    """
    out = []
    with torch.random.fork_rng(devices=[]):
        for index in indices:
            torch.manual_seed(draw_seed(seed, index))
            out.append(torch.stack(transform(_image_tensor(images[index]))).numpy())
    return np.stack(out)


# --------------------------------------------------------------------------- the cache


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


def _sha256(handle: BinaryIO, chunk: int = 1 << 20) -> str:
    handle.seek(0)
    digest = hashlib.sha256()
    while block := handle.read(chunk):
        digest.update(block)
    return digest.hexdigest()


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
        checksum = _sha256(handle)
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
    if cfg.workers is not None:
        return cfg.workers
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


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


def _die_with_parent() -> None:
    """Linux: ask the kernel to kill this worker when the building process dies."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError):  # pragma: no cover - best effort
        pass


def _init_worker(images: np.ndarray, cfg: AugmentConfig, out_path: str) -> None:
    _die_with_parent()
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


def _fill(out_path: Path, images: np.ndarray, cfg: AugmentConfig, workers: int, progress: bool) -> None:
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
    images: np.ndarray, fingerprint: str, cfg: AugmentConfig, progress: bool = True
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


# --------------------------------------------------------------------------- datasets


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


class CachedPairDataset(Dataset[Pair]):
    """Pairs of two different cached views of the same image, a fresh pair each epoch.

    Args:
        views: (N, V, C, H, W) uint8 array (usually the memmap of :func:`open_view_cache`).
        seed: seeds the choice of views together with the epoch and the index.
    """

    def __init__(self, views: np.ndarray, seed: int) -> None:
        if views.ndim != 5 or views.dtype != np.uint8 or views.shape[1] < 2:
            raise DataError(f"views must be (N, V>=2, C, H, W) uint8, got {views.dtype} {views.shape}")
        self.views = views
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw the pairs of ``epoch`` (call before creating the epoch's iterator)."""
        self.epoch = epoch

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


class OnTheFlyPairDataset(Dataset[Pair]):
    """Pairs of views drawn on the fly (the reference's way): the transform applied twice.

    Args:
        images: (N, H, W, C) uint8 training images, C in {1, 3}.
        cfg: the recipe (``views``, ``workers`` and ``cache_dir`` are ignored).
        seed: seeds each pair together with the epoch and the index.
    """

    def __init__(self, images: np.ndarray, cfg: AugmentConfig, seed: int) -> None:
        if images.ndim != 4 or images.dtype != np.uint8 or images.shape[-1] not in (1, 3):
            raise DataError(
                f"images must be (N, H, W, C) uint8, C in (1, 3), got {images.dtype} {images.shape}"
            )
        self.images = images
        self.transform = view_transform(cfg, images.shape[-1])
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw the pairs of ``epoch`` (call before creating the epoch's iterator)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Pair:
        image = _image_tensor(self.images[index])
        # A DataLoader worker owns its global RNG; in the main process restore the caller's.
        scope = contextlib.nullcontext() if get_worker_info() else torch.random.fork_rng(devices=[])
        with scope:
            torch.manual_seed(draw_seed(self.seed, self.epoch, index))
            return self.transform(image), self.transform(image)


def pair_dataset(
    train_images: np.ndarray, fingerprint: str, cfg: AugmentConfig, use_cache: bool, seed: int
) -> tuple[Dataset[Pair], str]:
    """The pair dataset pretraining reads: the view cache when valid, else on the fly.

    Args:
        train_images: (N, H, W, C) uint8 training images.
        fingerprint: ``ImageData.fingerprint`` of the validated data.
        cfg: the recipe the cache must have been built with.
        use_cache: False forces on-the-fly augmentation.
        seed: seeds the pairs (with the epoch and the index).

    Returns:
        (dataset, "cache") or (dataset, "on-the-fly").
    """
    if use_cache:
        views = open_view_cache(cfg, fingerprint)
        if views is not None and len(views) == len(train_images) and views.shape[2] == train_images.shape[-1]:
            return CachedPairDataset(views, seed), "cache"
        if views is not None:
            logger.warning(
                "view cache not used: it holds %s, training images are %s", views.shape, train_images.shape
            )
        logger.warning("augmenting on the fly (slower): run the augment pipeline to build the cache")
    return OnTheFlyPairDataset(train_images, cfg, seed), "on-the-fly"


# --------------------------------------------------------------------------- device side


def channel_stats(train_images: np.ndarray, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation in [0, 1] units.

    Args:
        train_images: (N, H, W, C) uint8.
        chunk: images summed at a time (bounds memory).

    Returns:
        (mean, std), each a tuple of C floats.
    """
    channels = train_images.shape[-1]
    total = np.zeros(channels)
    squares = np.zeros(channels)
    for start in range(0, len(train_images), chunk):
        block = train_images[start : start + chunk].reshape(-1, channels).astype(np.float64) / 255.0
        total += block.sum(axis=0)
        squares += (block**2).sum(axis=0)
    count = train_images.size // channels
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    return tuple(mean.tolist()), tuple(std.tolist())


def normalize(batch: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 ``(B, C, H, W)`` -> float32 ``(B, C, H, W)``, ``(x / 255 - mean) / std``."""
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=batch.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=batch.device).view(1, -1, 1, 1)
    return (batch.float() / 255.0 - mean_t) / std_t


def random_hflip(batch: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Flip each image of ``batch`` (B, C, H, W) left-right with probability ``p``.

    Args:
        batch: (B, C, H, W), any dtype, on any device.
        generator: draws the flips; lives on the CPU or on ``batch``'s device.
        p: flip probability.

    Returns:
        (B, C, H, W), same dtype and device.
    """
    flip = torch.rand(len(batch), generator=generator, device=generator.device) < p
    flip = flip.to(batch.device).view(-1, 1, 1, 1)
    return torch.where(flip, batch.flip(-1), batch)
