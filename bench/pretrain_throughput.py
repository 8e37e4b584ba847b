"""Pretraining throughput (images per second) of the product's own training loop.

Runs :func:`imsvd.training.pretrain` (the Lightning module the pipeline uses) on pairs
of views from (a) the view cache and (b) on-the-fly torchvision augmentation with
DataLoader workers, side by side in one run, and prints images/s for each and the
ratio. On a GPU it uses bf16-mixed precision (the pipeline's ``precision: auto``).

The images are seeded random uint8 pictures: throughput does not depend on content,
and the script needs no data set on the machine it runs on.

    python bench/pretrain_throughput.py                       # CPU, the CPU defaults
    python bench/pretrain_throughput.py --width 1 --size 32 --channels 3 --batch 512 \
        --images 20000 --workers 8                           # a CIFAR-sized GPU run
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from imsvd.augment import CachedPairDataset, OnTheFlyPairDataset, build_view_cache  # noqa: E402
from imsvd.config import AugmentConfig, PretrainConfig  # noqa: E402
from imsvd.preprocess import channel_stats  # noqa: E402
from imsvd.training import RunIdentity, pretrain, resolve_precision  # noqa: E402


def run(dataset, source: str, images: np.ndarray, cfg: PretrainConfig) -> dict[str, float]:
    mean, std = channel_stats(images)
    start = time.perf_counter()
    result = pretrain(
        dataset, source, images.shape[-1], mean, std, cfg, RunIdentity.of(cfg, AugmentConfig(), source)
    )
    seconds = time.perf_counter() - start
    history = result.history
    steady = history.iloc[min(5, len(history) // 4) :]  # skip warm-up steps
    return {
        "median_images_per_second": float(steady["images_per_second"].median()),
        "wall_seconds": seconds,
        "steps": len(history),
        "final_loss": float(history["total"].iloc[-1]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--views", type=int, default=8)
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--backbone", default="resnet18_cifar")
    parser.add_argument("--projector", default="1024-1024-1024")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="DataLoader workers on the fly"
    )
    parser.add_argument("--cache-workers", type=int, default=0, help="DataLoader workers reading the cache")
    parser.add_argument("--skip-on-the-fly", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(args.images, args.size, args.size, args.channels), dtype=np.uint8)
    work = Path(tempfile.mkdtemp(prefix="imsvd-throughput-"))
    aug = AugmentConfig(
        views=args.views, size=args.size, cache_dir=str(work / "cache"), workers=os.cpu_count()
    )
    start = time.perf_counter()
    build_view_cache(images, "bench", aug, progress=False)
    build_seconds = time.perf_counter() - start
    views = np.load(work / "cache" / "views.npy", mmap_mode="r")

    base = dict(
        backbone=args.backbone,
        width=args.width,
        projector=args.projector,
        epochs=args.epochs,
        batch_size=args.batch,
        resume=False,
        warmup_epochs=0.0,
    )
    cached_cfg = PretrainConfig(**base, checkpoint_dir=str(work / "ck-cache"), num_workers=args.cache_workers)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU x{os.cpu_count()}"
    print(f"device: {name}; torch {torch.__version__}; precision {resolve_precision(cached_cfg)}")
    print(
        f"model: {args.backbone} width {args.width}, projector {args.projector}, batch {args.batch}, "
        f"{args.images} images {args.channels}x{args.size}x{args.size}, {args.epochs} epochs"
    )
    print(f"view cache build: {build_seconds:.1f} s for {args.images} x {args.views} views")
    rows = {
        f"cache ({args.cache_workers} workers)": run(
            CachedPairDataset(views, seed=0), "cache", images, cached_cfg
        )
    }
    if not args.skip_on_the_fly:
        fly_cfg = PretrainConfig(**base, checkpoint_dir=str(work / "ck-fly"), num_workers=args.workers)
        rows[f"on-the-fly ({args.workers} workers)"] = run(
            OnTheFlyPairDataset(images, aug, seed=0), "on-the-fly", images, fly_cfg
        )
    print(f"{'views from':<28}{'images/s':>12}{'wall s':>10}{'steps':>8}{'final loss':>12}")
    for label, row in rows.items():
        print(
            f"{label:<28}{row['median_images_per_second']:>12,.0f}{row['wall_seconds']:>10.1f}"
            f"{row['steps']:>8}{row['final_loss']:>12.4f}"
        )
    if len(rows) == 2:
        a, b = (r["median_images_per_second"] for r in rows.values())
        print(f"cache / on-the-fly: {a / b:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
