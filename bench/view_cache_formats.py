"""The view cache's two formats side by side: one memory-mapped array, or litdata shards
(raw uint8 views, or PNG per view).

For each view size, the same images' views are cached three ways (``augment.max_array_mb``
2048 for the array, 0 for shards; ``augment.encode_above`` above or below the size for raw
or PNG items) and each is timed as the training loop reads it (batch 256, shuffled, every
batch summed; one warm-up epoch, DataLoader workers persist), with build time, disk per
1,000 images, and the growth of the reading process's file-backed resident memory
(``RssFile``: the mapped pages an array read leaves behind). Ratios are to the array.

    .venv/bin/python bench/view_cache_formats.py [--images 10000] [--sizes 32 96] [--epochs 2]

Images: the Fashion-MNIST training images when Debian's package is installed, else the
embedded digits (repeated). Views are of the image's own pixels upscaled by the crop, so
PNG compresses them better than it would photos (see the README for photo crops).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from litdata import StreamingDataLoader

from imsvd.augment import CachedPairDataset, ShardPairs, build_view_cache, open_view_cache
from imsvd.augment.cache import available_workers, disk_bytes
from imsvd.config import AugmentConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from augment_bench import digits_images, fashion_images, views_per_second  # noqa: E402

FORMATS = {  # name: (max_array_mb, encodes)
    "array": (2048.0, False),
    "shards, raw": (0.0, False),
    "shards, PNG": (0.0, True),
}


def rss_file() -> int:
    """File-backed resident bytes of this process (Linux)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("RssFile"))
    return int(line.split()[1]) * 1024


def streamed_views_per_second(views: object, num_workers: int, epochs: int) -> float:
    """:func:`views_per_second` for a sharded cache, read as training reads it (litdata)."""
    loader = StreamingDataLoader(ShardPairs(views, seed=0), batch_size=256, num_workers=num_workers)  # type: ignore[arg-type]
    count, start = 0, 0.0
    for epoch in range(epochs + 1):
        if epoch == 1:
            start = time.perf_counter()
        for first, second in loader:
            assert int(first.sum()) + int(second.sum()) >= 0  # touch every byte
            count += (len(first) + len(second)) if epoch else 0
    return count / (time.perf_counter() - start)


def read_epoch(views: object) -> None:
    """One pass over every image, as training reads the format."""
    if isinstance(views, np.ndarray):
        dataset = CachedPairDataset(views, seed=0)
        for begin in range(0, len(dataset), 256):
            dataset.__getitems__(list(range(begin, min(len(dataset), begin + 256))))
    else:
        for _ in StreamingDataLoader(ShardPairs(views, seed=0), batch_size=256):  # type: ignore[arg-type]
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 96])
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs after one warm-up")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)  # the loop only sums batches (see augment_bench.py)
    cores = available_workers(AugmentConfig())
    images = fashion_images(args.images)
    source = "Fashion-MNIST"
    if images is None:
        digits = digits_images()
        images = np.resize(digits, (args.images, *digits.shape[1:]))
        source = "digits (repeated)"
    print(
        f"{len(images):,} {source} images, {args.views} views each; {cores} cores, torch {torch.__version__}"
    )
    print(
        "| size | format | build s | MB per 1,000 images | views/s, 0 workers | views/s, "
        f"{cores} workers | vs array | RssFile growth of a read epoch MiB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="view-cache-formats-") as tmp:
        for size in args.sizes:
            base = None
            for name, (line, encodes) in FORMATS.items():
                cfg = AugmentConfig(
                    size=size,
                    views=args.views,
                    workers=cores,
                    cache_dir=str(Path(tmp) / f"{size}-{name}"),
                    max_array_mb=line,
                    encode_above=size - 1 if encodes else size,
                )
                built = build_view_cache(images, "bench", cfg, progress=False)
                views = open_view_cache(cfg, "bench")
                assert views is not None
                before = rss_file()
                read_epoch(views)
                growth = (rss_file() - before) / 2**20
                if isinstance(views, np.ndarray):
                    serial = views_per_second(CachedPairDataset(views, seed=0), 0, args.epochs, seed=0)
                    parallel = views_per_second(CachedPairDataset(views, seed=0), cores, args.epochs, seed=0)
                else:
                    serial = streamed_views_per_second(views, 0, args.epochs)
                    parallel = streamed_views_per_second(views, cores, args.epochs)
                best = max(serial, parallel)
                base = base or best
                mb = disk_bytes(built.path) / len(images) * 1000 / 1e6
                print(
                    f"| {size} | {name} | {built.seconds:.1f} | {mb:.2f} | {serial:,.0f} | {parallel:,.0f} "
                    f"| {best / base:.2f} | {growth:.0f} |",
                    flush=True,
                )
    print(f"load average at the end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
