"""Does pretraining leak memory? Resident set size at the end of every epoch.

Pretrains on the embedded digits through the library's :func:`imsvd.training.pretrain`
(the code the ``pretrain`` node runs, views from a freshly built view cache) and samples
the process's current RSS (psutil) and peak RSS (``getrusage``) whenever Lightning logs
the epoch-level loss, i.e. once per epoch end. Epoch 1 pays the one-off costs (imports,
allocator pools, the cache pages it maps), so growth is measured from epoch 1's end to
the last epoch's end; it should be flat.

Usage::

    .venv/bin/python bench/memory_bench.py [--epochs 20] [--tolerance 5]

Exits 1 when the growth after epoch 1 exceeds ``--tolerance`` percent.
"""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import tempfile
from pathlib import Path
from typing import Any

import psutil
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

from imsvd.augment import build_view_cache, pair_dataset
from imsvd.config import AugmentConfig, IMSVDConfig, PretrainConfig
from imsvd.data import TRAIN
from imsvd.preprocess import channel_stats
from imsvd.sources import load_digits
from imsvd.training import RunIdentity, pretrain

MIB = 1024 * 1024


class EpochEndMemory(Logger):
    """A Lightning logger that records RSS when the epoch-level metrics arrive."""

    def __init__(self) -> None:
        super().__init__()
        self.process = psutil.Process()
        self.rows: list[tuple[int, float, float]] = []  # (epoch, current MiB, peak MiB)

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if not any(key.endswith("_epoch") for key in metrics):
            return
        current = self.process.memory_info().rss / MIB
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        self.rows.append((len(self.rows) + 1, current, peak))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--width", type=float, default=0.125)
    parser.add_argument("--projector", default="128-128")
    parser.add_argument("--bin-size", type=int, default=16)
    parser.add_argument("--size", type=int, default=8, help="view side in pixels (augment.size)")
    parser.add_argument("--views", type=int, default=2, help="views per image in the cache (augment.views)")
    parser.add_argument(
        "--tolerance", type=float, default=5.0, help="allowed growth after epoch 1, in percent"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    data = load_digits(test_size=0.25, seed=0)
    train = data.split(TRAIN).images
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        augment = AugmentConfig(size=args.size, views=args.views, cache_dir=str(root / "views"), workers=1)
        build_view_cache(train, data.fingerprint, augment, progress=False)
        dataset, source = pair_dataset(train, data.fingerprint, augment, use_cache=True, seed=0)
        cfg = PretrainConfig(
            width=args.width,
            projector=args.projector,
            imsvd=IMSVDConfig(bin_size=args.bin_size),
            epochs=args.epochs,
            batch_size=args.batch_size,
            checkpoint_dir=str(root / "checkpoints"),
            accelerator="cpu",
            devices="1",
            resume=False,
        )
        mean, std = channel_stats(train)
        memory = EpochEndMemory()
        identity = RunIdentity.of(cfg, augment, data.fingerprint)
        result = pretrain(dataset, source, train.shape[-1], mean, std, cfg, identity, logger=memory)

    steps = len(result.history)
    print(
        f"pretrained {cfg.method} ({cfg.backbone}, width {cfg.width}, projector {cfg.projector}) on "
        f"{len(train)} digits, views from the {source}: {args.epochs} epochs, {steps} steps, "
        f"{result.seconds:.1f} s"
    )
    print(f"{'epoch':>5}  {'rss MiB':>9}  {'peak MiB':>9}")
    for epoch, current, peak in memory.rows:
        print(f"{epoch:>5}  {current:>9.1f}  {peak:>9.1f}")
    if len(memory.rows) < 2:
        print(f"only {len(memory.rows)} epoch-end sample(s): nothing to compare")
        return 1
    first, last = memory.rows[0][1], memory.rows[-1][1]
    growth = last - first
    percent = 100.0 * growth / first
    peak_growth = memory.rows[-1][2] - memory.rows[0][2]
    print(
        f"growth after epoch 1: {growth:+.1f} MiB ({percent:+.2f} %) current RSS, "
        f"{peak_growth:+.1f} MiB peak RSS; tolerance {args.tolerance:g} %"
    )
    if percent > args.tolerance:
        print(f"FAIL: RSS grew {percent:.2f} % > {args.tolerance:g} % after epoch 1")
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
