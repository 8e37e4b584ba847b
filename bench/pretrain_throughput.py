"""Pretraining throughput (pairs of views per second): the bare step against the product's
loop, for each precision and memory layout, side by side in one run.

For every variant (float32 as before, channels_last, bf16 autocast, both, and with
``--compile`` the compiled encoder) it measures:

- **bare step**: the network alone on one fixed batch already on the device (both views
  forward, the loss, backward, the optimiser step), median of ``--repeats`` steps after
  ``--warmup`` steps: the most the loop can reach;
- **product loop**: :func:`imsvd.training.pretrain`, the Lightning loop the pipeline runs,
  on pairs from the view cache; the median of its per-step rate after the first epoch, the
  share of each step spent before it began (``data_wait_share``: loading and moving the
  batch, Lightning's work between steps), and the whole wall time.

It prints both rates, the loop's share of the bare step, and each variant against float32.
The images are seeded random uint8 pictures: speed does not depend on content, so the
script needs no data set (it needs only torch, torchvision and lightning).

    python bench/pretrain_throughput.py                        # the CPU default run's shape
    python bench/pretrain_throughput.py --size 32              # 32x32 views
    python bench/pretrain_throughput.py --width 1 --size 32 --channels 3 --batch 512 \\
        --images 20000                                         # a CIFAR-sized GPU run
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from imsvd.augment import CachedPairDataset, OnTheFlyPairDataset, build_view_cache  # noqa: E402
from imsvd.config import AugmentConfig, PretrainConfig  # noqa: E402
from imsvd.optim import build_optimizer  # noqa: E402
from imsvd.preprocess import channel_stats, normalize  # noqa: E402
from imsvd.training import PretrainModule, RunIdentity, pretrain  # noqa: E402
from imsvd.training.loop import cpu_has_native_bf16  # noqa: E402

# (label, precision, channels_last); the first row is the loop as it was before.
VARIANTS = [
    ("float32 (before)", "32-true", False),
    ("channels_last", "32-true", True),
    ("bf16 autocast", "bf16-mixed", False),
    ("bf16 + channels_last", "bf16-mixed", True),
]


def bare_step_rate(
    cfg: PretrainConfig, views: np.ndarray, images: np.ndarray, args: argparse.Namespace
) -> float:
    """Pairs per second of the step alone: one batch on the device, no loader, no Lightning."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mean, std = channel_stats(images)
    module = PretrainModule(cfg, images.shape[-1], mean, std, 1, RunIdentity("bench", "bench")).to(device)
    module.train()
    optimizer = build_optimizer(module.encoder, cfg.optimizer, cfg.lr, cfg.weight_decay)
    batch = torch.from_numpy(np.ascontiguousarray(views[: cfg.batch_size, :2])).to(device)
    layout = torch.channels_last if cfg.channels_last else torch.contiguous_format
    x1 = normalize(batch[:, 0], mean, std).contiguous(memory_format=layout)
    x2 = normalize(batch[:, 1], mean, std).contiguous(memory_format=layout)
    dtype = torch.bfloat16 if cfg.precision.startswith("bf16") else torch.float16
    mixed = cfg.precision.endswith("-mixed")

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=mixed):
            _, z1 = module.encoder(x1)
            _, z2 = module.encoder(x2)
        module.loss_fn(z1.float(), z2.float()).total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = []
    for i in range(args.warmup + args.repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    return cfg.batch_size / statistics.median(times)


def loop_rate(dataset, images: np.ndarray, cfg: PretrainConfig) -> dict[str, float]:
    """The product's loop: pretrain() as the pipeline calls it (no MLflow logger)."""
    mean, std = channel_stats(images)
    start = time.perf_counter()
    result = pretrain(
        dataset, "cache", images.shape[-1], mean, std, cfg, RunIdentity.of(cfg, AugmentConfig(), "b")
    )
    seconds = time.perf_counter() - start
    history = result.history
    steady = history[history["epoch"] >= 1] if history["epoch"].max() >= 1 else history
    return {
        "pairs_per_second": float(steady["images_per_second"].median()),
        "data_wait_share": float(steady["data_wait_share"].median()),
        "wall_seconds": seconds,
        "steps": len(history),
        "pairs_per_wall_second": len(history) * cfg.batch_size / seconds,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--backbone", default="resnet18_cifar")
    parser.add_argument("--projector", default="1024-1024-1024")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument(
        "--epochs", type=int, default=3, help="epochs of the product loop (the first is warm-up)"
    )
    parser.add_argument("--warmup", type=int, default=2, help="bare steps before timing")
    parser.add_argument("--repeats", type=int, default=6, help="timed bare steps")
    parser.add_argument("--compile", action="store_true", help="also time bf16 + channels_last compiled")
    parser.add_argument("--only", nargs="*", help="labels of the variants to run (default: all)")
    parser.add_argument(
        "--on-the-fly-workers", type=int, default=0, help="also time on-the-fly views with N workers"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    on_gpu = torch.cuda.is_available()
    variants = list(VARIANTS)
    if args.compile:
        variants.append(("bf16 + channels_last + compile", "bf16-mixed", True))
    if args.only:
        variants = [v for v in variants if v[0] in args.only]

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(args.images, args.size, args.size, args.channels), dtype=np.uint8)
    work = Path(tempfile.mkdtemp(prefix="imsvd-throughput-"))
    aug = AugmentConfig(
        views=args.views, size=args.size, cache_dir=str(work / "cache"), workers=os.cpu_count()
    )
    build_view_cache(images, "bench", aug, progress=False)
    views = np.load(work / "cache" / "views.npy", mmap_mode="r")

    device = torch.cuda.get_device_name() if on_gpu else f"{platform.processor() or 'CPU'} x{os.cpu_count()}"
    print(
        f"date: {datetime.date.today()}; device: {device}; torch {torch.__version__}; threads {torch.get_num_threads()}"
    )
    print(f"CPU native bf16 (avx512_bf16 / amx_bf16): {cpu_has_native_bf16()}")
    print(
        f"model: {args.backbone} width {args.width}, projector {args.projector}, batch {args.batch}, "
        f"{args.images} images {args.channels}x{args.size}x{args.size}, {args.epochs} epochs per loop run"
    )
    base = PretrainConfig(
        backbone=args.backbone,
        width=args.width,
        projector=args.projector,
        epochs=args.epochs,
        batch_size=args.batch,
        resume=False,
        warmup_epochs=0.0,
        checkpoint_dir=str(work / "checkpoints"),
    )
    rows = []
    for label, precision, channels_last in variants:
        cfg = dataclasses.replace(
            base, precision=precision, channels_last=channels_last, compile=label.endswith("compile")
        )
        bare = bare_step_rate(cfg, views, images, args)
        loop = loop_rate(CachedPairDataset(views, seed=0), images, cfg)
        rows.append((label, bare, loop))
        print(f"  done: {label}", flush=True)
    if args.on_the_fly_workers:
        cfg = dataclasses.replace(base, num_workers=args.on_the_fly_workers)  # precision auto
        fly = loop_rate(OnTheFlyPairDataset(images, aug, seed=0), images, cfg)
        print(f"on-the-fly views, {args.on_the_fly_workers} workers: {fly['pairs_per_second']:,.0f} pairs/s")

    first_bare, first_loop = rows[0][1], rows[0][2]["pairs_per_second"]
    header = (
        f"{'variant':<32}{'bare pairs/s':>13}{'loop pairs/s':>13}{'loop/bare':>10}"
        f"{'data wait':>10}{'wall s':>8}{'bare vs fp32':>13}{'loop vs fp32':>13}"
    )
    print(header)
    for label, bare, loop in rows:
        print(
            f"{label:<32}{bare:>13,.0f}{loop['pairs_per_second']:>13,.0f}"
            f"{loop['pairs_per_second'] / bare:>10.2f}{loop['data_wait_share']:>10.1%}{loop['wall_seconds']:>8.1f}"
            f"{bare / first_bare:>12.2f}x{loop['pairs_per_second'] / first_loop:>12.2f}x"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
