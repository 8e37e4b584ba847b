"""Where evaluation's memory goes, phase by phase, on synthetic features of the scale
bench's shapes: the anonymous memory each phase adds over what the features themselves take.

    python bench/evaluate_memory.py --images 20000 200000

For N images (a fifth of them test, as in ``bench/scale_bench.py``) it makes the features
``evaluate`` holds for the reference's resnet18 with the default projector: backbone
(N, 512) and projector (N, 1024) float32 for the trained and the random encoder, and the
raw-pixel table (N, 3 x 32 x 32) uint8, a split's in memory or memory-mapped in a scratch
folder by the rule of :func:`imsvd.inference.embed_split` (all of a split's features in
memory while they take at most a quarter of ``evaluate.memory_budget_mb``). Each phase of :mod:`imsvd.evaluate` then runs in this process, and its peak
``RssAnon`` (sampled every 20 ms) minus the level before it is printed: memory-mapped pages
are file pages and do not count, in-memory features were allocated before the first phase.
The labelled phases (kNN and linear probe of the trained encoder, raw pixels and the random
encoder) take minutes at 200,000 images: ``--phases`` picks.

    python bench/evaluate_memory.py --before HEAD~1 --after HEAD --images 20000 200000

measures two commits side by side (each exported with ``git archive`` and imported in a
child process) and prints the ratio after / before of every phase's added memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_methods import check_imports, export_project, import_paths  # noqa: E402
from evaluate_streaming import AnonymousPeak  # noqa: E402

PHASES = ("shape", "codes", "pictures", "labelled")


def synthetic_embeddings(n: int, scratch: Path, budget_mb: float = 1024.0) -> tuple[object, np.ndarray]:
    """Embeddings of ``n`` images (clustered features, 10 classes) and the test images."""
    from imsvd.config import PretrainConfig, parse
    from imsvd.evaluate import Embeddings
    from imsvd.inference import Features
    from imsvd.memmaps import allocate

    rng = np.random.default_rng(0)
    n_test = n // 5
    n_train = n - n_test
    labels = rng.integers(0, 10, n)
    centres = rng.normal(size=(10, 1536)).astype(np.float32)

    def where(rows: slice) -> Path | None:
        # embed_split's rule: both encoders' outputs and the pixels of a split, together.
        return scratch if (rows.stop - rows.start) * (2 * 1536 * 4 + 3072) > budget_mb / 4 * 2**20 else None

    def features(rows: slice, name: str) -> Features:
        count = rows.stop - rows.start
        backbone = allocate(count, 512, where(rows), f"{name}_backbone")
        projector = allocate(count, 1024, where(rows), f"{name}_projector")
        for i in range(0, count, 20_000):
            part = labels[rows][i : i + 20_000]
            x = centres[part] + 2.0 * rng.normal(size=(len(part), 1536)).astype(np.float32)
            backbone[i : i + len(part)] = np.maximum(x[:, :512], 0)
            projector[i : i + len(part)] = x[:, 512:]
        return Features(backbone, projector)

    def pixels(rows: slice, name: str) -> np.ndarray:
        count = rows.stop - rows.start
        flat = allocate(count, 3072, where(rows), name, np.uint8)
        for i in range(0, count, 20_000):
            flat[i : i + 20_000] = rng.integers(0, 256, (min(20_000, count - i), 3072), dtype=np.uint8)
        return flat

    train, test = slice(0, n_train), slice(n_train, n)
    config = parse(PretrainConfig, {"method": "imsvd", "backbone": "resnet18"}, "pretrain")
    emb = Embeddings(
        train=features(train, "train"),
        test=features(test, "test"),
        random_train=features(train, "random_train"),
        random_test=features(test, "random_test"),
        raw_train=pixels(train, "raw_train"),
        raw_test=pixels(test, "raw_test"),
        train_labels=labels[train],
        test_labels=labels[test],
        images_per_second=0.0,
        config=config,
    )
    images = rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8)
    return emb, images


def run(n: int, phases: list[str]) -> list[tuple[str, float, float]]:
    from imsvd.config import EvaluateConfig, parse
    from imsvd.data import TEST, ImageData
    from imsvd.evaluate import code_metrics, labelled_metrics, pictures, shape_metrics

    cfg = parse(EvaluateConfig, {}, "evaluate")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        emb, images = synthetic_embeddings(n, Path(scratch))
        data = ImageData(
            images=images,
            labels=emb.test_labels,
            splits=np.full(len(images), TEST),
            ids=np.array([f"t/{i}" for i in range(len(images))]),
            class_names=tuple(f"class{i}" for i in range(10)),
        )
        steps = {
            "shape": lambda: shape_metrics(emb),
            "codes": lambda: code_metrics(emb, cfg),
            "pictures": lambda: pictures(data, emb, cfg),
            "labelled": lambda: labelled_metrics(emb, cfg),
        }
        for phase in phases:
            start = time.perf_counter()
            with AnonymousPeak() as peak:
                before = peak.peak
                steps[phase]()
            rows.append((phase, peak.peak - before, time.perf_counter() - start))
            print(
                f"  {n:>9,} images  {phase:<9} +{rows[-1][1]:7.0f} MiB anonymous  {rows[-1][2]:7.1f} s",
                file=sys.stderr,
                flush=True,
            )
    return rows


def measure_commit(revision: str, work: Path, images: list[int], phases: list[str]) -> dict:
    """This script's phases, run in a child process that imports ``revision``'s code."""
    project = work / revision.replace("/", "_")
    commit = export_project(project, revision)
    check_imports(project)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(import_paths(project)), PYTHONUNBUFFERED="1")
    command = [sys.executable, __file__, "--json", "--images", *map(str, images), "--phases", *phases]
    child = subprocess.run(command, cwd=project, env=env, stdout=subprocess.PIPE, text=True)
    if child.returncode != 0:
        raise SystemExit(f"the phases at {commit} failed (exit {child.returncode})")
    results = json.loads(child.stdout.strip().splitlines()[-1])
    return {"commit": commit, "rows": {int(n): rows for n, rows in results.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, nargs="+", default=[20_000, 200_000])
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    parser.add_argument("--before", help="a commit to measure beside --after")
    parser.add_argument("--after", default="HEAD")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.before is None:
        results = {n: run(n, args.phases) for n in args.images}
        if args.json:
            import imsvd

            print(f"imsvd from {imsvd.__file__}", file=sys.stderr)
            print(json.dumps(results))
            return 0
        print("\n| phase | " + " | ".join(f"{n:,}: +MiB anonymous | s" for n in args.images) + " |")
        print("|---|" + "---|---|" * len(args.images))
        for i, phase in enumerate(args.phases):
            cells = " | ".join(f"{results[n][i][1]:.0f} | {results[n][i][2]:.1f}" for n in args.images)
            print(f"| {phase} | {cells} |")
        return 0
    with tempfile.TemporaryDirectory() as folder:
        sides = {
            side: measure_commit(getattr(args, side), Path(folder), args.images, args.phases)
            for side in ("before", "after")
        }
    before, after = sides["before"], sides["after"]
    print(f"\nadded anonymous memory (MiB) and time (s): before {before['commit']}, after {after['commit']}")
    print("| images | phase | before MiB | after MiB | after / before | before s | after s |")
    print("|---|---|---|---|---|---|---|")
    for n in args.images:
        for (phase, mib_b, s_b), (_, mib_a, s_a) in zip(before["rows"][n], after["rows"][n], strict=True):
            ratio = mib_a / mib_b if mib_b > 0 else float("nan")
            print(f"| {n:,} | {phase} | {mib_b:.0f} | {mib_a:.0f} | {ratio:.2f} | {s_b:.1f} | {s_a:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
