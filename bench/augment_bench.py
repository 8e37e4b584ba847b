"""Views per second delivered to the training loop: view cache vs on-the-fly augmentation.

No model: each DataLoader (batch 256, shuffled) is iterated and every batch consumed
(summed, single-threaded), so the figure is the ceiling the input pipeline puts on
training. One warm-up epoch, then ``--epochs`` timed epochs; DataLoader workers persist. Also prints the one-off
build time, the checksum-verification time of a rerun, and the cache size per 1,000 images.

Usage::

    .venv/bin/python bench/augment_bench.py [--epochs 3] [--fashion-limit 10000]

Datasets: the embedded digits at size 16 and 32, and Fashion-MNIST when
``/usr/share/datasets/fashion-mnist`` holds its IDX files (a subset).
"""

from __future__ import annotations

import argparse
import gzip
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, Dataset

from imsvd.augment import (
    CachedPairDataset,
    OnTheFlyPairDataset,
    build_view_cache,
    open_view_cache,
)
from imsvd.augment.cache import available_workers, disk_bytes
from imsvd.config import AugmentConfig

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
BATCH = 256


def digits_images() -> np.ndarray:
    """The 1,797 embedded digits, (N, 8, 8, 1) uint8."""
    return (load_digits().images * (255 / 16)).round().astype(np.uint8)[..., None]


def fashion_images(limit: int) -> np.ndarray | None:
    """The first ``limit`` Fashion-MNIST training images, (N, 28, 28, 1) uint8, or None."""
    for name in ("train-images-idx3-ubyte.gz", "train-images-idx3-ubyte"):
        path = FASHION_DIR / name
        if path.is_file():
            opener = gzip.open if path.suffix == ".gz" else open
            with opener(path, "rb") as handle:
                raw = handle.read()
            n, rows, cols = (int.from_bytes(raw[i : i + 4], "big") for i in (4, 8, 12))
            images = np.frombuffer(raw, np.uint8, offset=16).reshape(n, rows, cols, 1)
            return np.ascontiguousarray(images[:limit])
    return None


def views_per_second(dataset: Dataset, num_workers: int, epochs: int, seed: int) -> float:
    """Views (two per item) per second over ``epochs`` epochs after one warm-up epoch."""
    loader = DataLoader(
        dataset,
        batch_size=BATCH,
        shuffle=True,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )
    views = 0
    start = 0.0
    for epoch in range(epochs + 1):
        if epoch == 1:
            start = time.perf_counter()
        dataset.set_epoch(epoch)  # type: ignore[attr-defined]
        for first, second in loader:
            consumed = int(first.sum()) + int(second.sum())  # touch every byte
            assert consumed >= 0
            if epoch > 0:
                views += len(first) + len(second)
    return views / (time.perf_counter() - start)


def bench(
    name: str, images: np.ndarray, size: int, epochs: int, cores: int, folder: Path
) -> dict[str, float]:
    """Build the cache of ``images`` and time both input pipelines."""
    cfg = AugmentConfig(size=size, workers=cores, cache_dir=str(folder / f"{name}-{size}"))
    built = build_view_cache(images, name, cfg, progress=False)
    rerun = build_view_cache(images, name, cfg, progress=False)
    assert rerun.reused
    views = open_view_cache(cfg, name)
    assert views is not None
    cached = views_per_second(CachedPairDataset(views, seed=0), 0, epochs, seed=0)
    cached_workers = views_per_second(CachedPairDataset(views, seed=0), cores, epochs, seed=0)
    on_the_fly = views_per_second(OnTheFlyPairDataset(images, cfg, seed=0), cores, epochs, seed=0)
    size_bytes = disk_bytes(built.path)
    row = {
        "images": len(images),
        "build_s": built.seconds,
        "verify_s": rerun.seconds,
        "mb_per_1000": size_bytes / len(images) * 1000 / 1e6,
        "cache": cached,
        "cache_workers": cached_workers,
        "on_the_fly": on_the_fly,
        "ratio": max(cached, cached_workers) / on_the_fly,
    }
    print(
        f"{name:<14}{size:>5}{len(images):>8}{built.seconds:>10.1f}{rerun.seconds:>10.3f}"
        f"{row['mb_per_1000']:>10.2f}{cached:>12,.0f}{cached_workers:>14,.0f}{on_the_fly:>12,.0f}"
        f"{row['ratio']:>8.1f}x",
        flush=True,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs after one warm-up")
    parser.add_argument("--fashion-limit", type=int, default=10_000, help="Fashion-MNIST subset size")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    # The loop only sums batches: intra-op threads would only add wake-up latency (tens of
    # ms per call on a busy 2-core machine), which a GPU training loop does not pay.
    torch.set_num_threads(1)
    cores = available_workers(AugmentConfig())
    print(
        f"cores={cores} torch={torch.__version__} batch={BATCH} views/image=8 "
        f"on-the-fly DataLoader num_workers={cores}; cache with num_workers=0 and ={cores}"
    )
    print(
        f"{'dataset':<14}{'size':>5}{'images':>8}{'build_s':>10}{'verify_s':>10}{'MB/1k img':>10}"
        f"{'cache v/s':>12}{'cache+wk v/s':>14}{'on-fly v/s':>12}{'ratio':>9}"
    )
    runs: list[tuple[str, np.ndarray, int]] = [
        ("digits", digits_images(), 16),
        ("digits", digits_images(), 32),
    ]
    fashion = fashion_images(args.fashion_limit)
    if fashion is None:
        print(f"(Fashion-MNIST skipped: no IDX files in {FASHION_DIR})")
    else:
        runs.append(("fashion-mnist", fashion, 32))
    with tempfile.TemporaryDirectory(prefix="augment-bench-") as tmp:
        rows = [bench(name, images, size, args.epochs, cores, Path(tmp)) for name, images, size in runs]
    worst = min(row["ratio"] for row in rows)
    print(
        f"slowest cache / on-the-fly ratio: {worst:.1f}x ({'meets' if worst >= 10 else 'MISSES'} the 10x goal)"
    )
    print(f"load average during the run: {os.getloadavg()}")


if __name__ == "__main__":
    main()
