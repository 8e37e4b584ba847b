"""Evaluation beyond memory: the full-batch linear probe against the mini-batch one, and
in-memory kNN against kNN over memory-mapped features read in chunks, side by side, with
each mode's peak resident memory measured in its own subprocess.

    python bench/evaluate_streaming.py --encoder data/06_models/encoder.pt   # Fashion-MNIST
    python bench/evaluate_streaming.py --synthetic 400000                    # a large memmap

Fashion-MNIST rows (60,000 train / 10,000 test): raw pixels (784-d) and, with
``--encoder``, the trained encoder's backbone features. The synthetic row: N x 512 float32
features in a memory map (clustered, 10 classes), larger than the budget, so only the
streaming path runs; its peak memory against the features' size is the figure.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

DATA = Path("/usr/share/datasets/fashion-mnist")


def _features(kind: str, encoder: Path | None, scratch: Path) -> tuple[np.ndarray, ...]:
    from imsvd.data import TEST, TRAIN
    from imsvd.sources import load_fashion_mnist

    data = load_fashion_mnist(DATA)
    train, test = data.split(TRAIN), data.split(TEST)
    if kind == "pixels":
        flat = [s.images.reshape(len(s.labels), -1).astype(np.float32) / 255.0 for s in (train, test)]
        return flat[0], train.labels, flat[1], test.labels
    from imsvd.checkpoints import load_encoder, load_weights
    from imsvd.inference import extract_features

    loaded = load_encoder(load_weights(encoder))
    out = []
    for split in (train, test):
        feats = extract_features(loaded.encoder, split.images, loaded.image_size, loaded.mean, loaded.std)
        out += [feats.backbone, split.labels]
    return tuple(out)


def _read_synthetic(folder: Path) -> tuple[np.ndarray, ...]:
    return tuple(
        np.load(folder / f"{name}.npy", mmap_mode="r") for name in ("train", "labels", "test", "test_labels")
    )


def _write_synthetic(n: int, scratch: Path) -> None:
    """Written by the parent, so the child's memory holds none of it."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(10, 512)).astype(np.float32)
    path = scratch / "train.npy"
    train = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, 512))
    labels = rng.integers(0, 10, n)
    for i in range(0, n, 50_000):  # written in chunks: this process never holds it either
        rows = slice(i, min(n, i + 50_000))
        train[rows] = centres[labels[rows]] + 4.0 * rng.normal(size=(rows.stop - i, 512)).astype(np.float32)
    train.flush()
    del train
    test_labels = rng.integers(0, 10, 10_000)
    np.save(scratch / "labels.npy", labels)
    np.save(
        scratch / "test.npy", centres[test_labels] + 4.0 * rng.normal(size=(10_000, 512)).astype(np.float32)
    )
    np.save(scratch / "test_labels.npy", test_labels)


class AnonymousPeak:
    """Peak anonymous resident memory (``RssAnon``), sampled every 20 ms: the memory a
    process cannot give back. Pages of a memory-mapped file count in RSS while they are
    cached, but the kernel can drop them, so ``ru_maxrss`` overstates what a map costs."""

    def __init__(self) -> None:
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def now() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(0.02)

    def __enter__(self) -> AnonymousPeak:
        self.peak = self.now()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def child(args: argparse.Namespace) -> None:
    """One mode, in its own process, so its peak memory is its own."""
    from imsvd.metrics import knn_scores, linear_probe, topk_accuracy

    with tempfile.TemporaryDirectory() as scratch:
        if args.kind == "synthetic":
            x, y, xt, yt = _read_synthetic(Path(args.folder))
        else:
            x, y, xt, yt = _features(args.kind, args.encoder, Path(scratch))
            if args.mode == "streaming":  # the features as evaluate stores them beyond its budget
                path = Path(scratch) / "train.npy"
                mapped = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=x.shape)
                mapped[:] = x
                mapped.flush()
                del x, mapped
                x = np.load(path, mmap_mode="r")
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        anonymous = AnonymousPeak().__enter__()
        base_anon = anonymous.peak
        start = time.perf_counter()
        budget = None if args.mode == "full" else args.budget_mb
        linear = linear_probe(x, y, xt, yt, memory_budget_mb=budget)[1]
        linear_s = time.perf_counter() - start
        start = time.perf_counter()
        # In memory: the training set as one block; streaming: 16,384 rows at a time.
        chunk = int(x.shape[0]) if args.mode == "full" else 16_384
        scores = knn_scores(x, y, xt, k=20, temperature=0.07, chunk_size=1024, train_chunk_size=chunk)
        knn = topk_accuracy(scores, yt, (1,))[1]
        knn_s = time.perf_counter() - start
        anonymous.__exit__()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(
            json.dumps(
                {
                    "features": args.kind,
                    "mode": args.mode,
                    "train_rows": int(x.shape[0]),
                    "width": int(x.shape[1]),
                    "train_features_mib": x.shape[0] * x.shape[1] * 4 / 2**20,
                    "linear_top1": 100 * linear,
                    "linear_s": linear_s,
                    "knn_top1": 100 * knn,
                    "knn_s": knn_s,
                    "peak_rss_mib_before": base,
                    "peak_rss_mib": peak,
                    "anon_rss_mib_before": base_anon,
                    "peak_anon_rss_mib": anonymous.peak,
                }
            )
        )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--encoder", type=Path)
    parser.add_argument("--synthetic", type=int, default=0, help="rows of the synthetic memory-mapped set")
    parser.add_argument("--budget-mb", type=float, default=64.0, help="the streaming mode's memory budget")
    parser.add_argument("--kind", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.kind:
        child(args)
        return 0
    runs = []
    if args.synthetic:
        runs.append(("synthetic", "streaming"))
    else:
        kinds = ["pixels"] + (["encoder"] if args.encoder else [])
        runs += [(kind, mode) for kind in kinds for mode in ("full", "streaming")]
    rows = []
    synthetic = tempfile.TemporaryDirectory()
    if args.synthetic:
        _write_synthetic(args.synthetic, Path(synthetic.name))
    for kind, mode in runs:
        cmd = [sys.executable, __file__, "--kind", kind, "--mode", mode, "--budget-mb", str(args.budget_mb)]
        cmd += ["--folder", synthetic.name]
        cmd += ["--synthetic", str(args.synthetic)] + (
            ["--encoder", str(args.encoder)] if args.encoder else []
        )
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    synthetic.cleanup()
    print()
    print(
        "| features | mode | train rows x width | train features MiB | linear top-1 | kNN top-1 | linear s | kNN s "
        "| peak RSS MiB | anonymous RSS MiB: before, peak |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['features']} | {r['mode']} | {r['train_rows']:,} x {r['width']} | {r['train_features_mib']:.0f} | "
            f"{r['linear_top1']:.2f} | {r['knn_top1']:.2f} | {r['linear_s']:.1f} | {r['knn_s']:.1f} | {r['peak_rss_mib']:.0f} "
            f"| {r['anon_rss_mib_before']:.0f}, {r['peak_anon_rss_mib']:.0f} |"
        )
    by = {(r["features"], r["mode"]): r for r in rows}
    for kind in ("pixels", "encoder"):
        if (kind, "full") in by and (kind, "streaming") in by:
            full, stream = by[kind, "full"], by[kind, "streaming"]
            print(
                f"{kind}: linear streaming - full = {stream['linear_top1'] - full['linear_top1']:+.2f} points, "
                f"kNN {stream['knn_top1'] - full['knn_top1']:+.2f}; peak memory {stream['peak_rss_mib']:.0f} "
                f"against {full['peak_rss_mib']:.0f} MiB"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
