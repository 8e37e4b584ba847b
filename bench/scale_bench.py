"""Every stage on a synthetic folder of photos of many sizes: wall time, throughput and peak
memory, measured from outside the process tree.

    python bench/scale_bench.py --images 20000 200000

The folder (seeded smooth colour pictures, each side drawn between 64 and 512 pixels, JPEG
and PNG alternating, 10 class folders, a fifth of them under test/) is made once per size
under ``--folder`` and reused. Each size gets its own project, exported at ``--commit`` into a
temporary folder (or into ``--keep``, kept and reused with its outputs). Each stage is one
``kedro run --pipeline=<stage>``: ``validate``, ``augment`` (views of 64x64, as shards unless
--max-array-mb), one epoch of ``pretrain`` capped at ``--steps`` steps, streaming the image
store (or the view cache: ``--pretrain-from cache``), and ``evaluate``. Memory is the peak,
sampled every 0.2 s, of the sum of PSS over the process tree (shared pages counted once),
and of its anonymous part (what is not a file's cached page: the libraries, and
memory-mapped features and chunks, are file pages the kernel can drop). The decode rate of
the cores is measured first: one process decoding a sample of the folder's files, times the
cores.

The encoder is the reference's ImageNet one, ``resnet18`` (stride-2 stem and max-pool), as
suits photos cropped to 64x64. ``--backbone resnet18_cifar`` (the small-image default, no
downsampling before the first stage) keeps 64x64 activation maps in the first stage: at
batch 256 its activations alone take about 1.8 GB, against 0.4 GB for ``resnet18``. That
memory is set by the batch and the view size, not by the number of images.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_methods import check_imports, export_project, import_paths, measure  # noqa: E402

STAGES = ("validate", "augment", "pretrain", "evaluate")


def _make_picture(root: Path, i: int, seed: int) -> None:
    """Picture ``i``: its own seeded generator, so any process can make any picture."""
    rng = np.random.default_rng([seed, i])
    split = "test" if (i // 10) % 5 == 4 else "train"  # every class in both splits
    folder = root / split / f"class{i % 10}"
    height, width = (int(s) for s in rng.integers(64, 513, size=2))
    coarse = Image.fromarray(rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8))
    picture = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    picture = np.clip(picture + rng.integers(-8, 8, size=picture.shape), 0, 255).astype(np.uint8)
    if i % 2:
        Image.fromarray(picture).save(folder / f"{i:07d}.png", optimize=False)
    else:
        Image.fromarray(picture).save(folder / f"{i:07d}.jpg", quality=90)


def _make_range(args: tuple[Path, int, int, int]) -> int:
    root, start, stop, seed = args
    for i in range(start, stop):
        _make_picture(root, i, seed)
    return stop - start


def make_folder(root: Path, n: int, seed: int = 0) -> Path:
    """``n`` seeded pictures with sides between 64 and 512, JPEG (quality 90) and PNG, made by
    one process per core (about 10 ms a picture each); a folder already complete is reused."""
    marker = root / f".complete-{n}"
    if marker.exists():
        return root
    for split in ("train", "test"):
        for label in range(10):
            (root / split / f"class{label}").mkdir(parents=True, exist_ok=True)
    step = 2_000
    ranges = [(root, start, min(start + step, n), seed) for start in range(0, n, step)]
    made = 0
    with multiprocessing.get_context("spawn").Pool(len(os.sched_getaffinity(0))) as pool:
        for count in pool.imap_unordered(_make_range, ranges):
            made += count
            print(f"  made {made:,} of {n:,} images", flush=True)
    marker.touch()
    return root


def decode_rate(root: Path, sample: int = 300) -> float:
    """Files per second one process fully decodes, on a sample of the folder read once
    before the clock starts: the CPU's rate, not the disk's (a cold 200,000-file folder
    measured 187 files/s a process, against 664 warm)."""
    files = sorted(root.rglob("*.jpg"))[: sample // 2] + sorted(root.rglob("*.png"))[: sample // 2]
    return warm_decode_rate(files)


def warm_decode_rate(files: list[Path]) -> float:
    """Files per second one process fully decodes, the files read once before the clock."""
    for path in files:
        path.read_bytes()
    start = time.perf_counter()
    for path in files:
        with Image.open(path) as img:
            img.load()
    return len(files) / (time.perf_counter() - start)


def measure_stage(command: list[str], cwd: Path, env: dict[str, str]) -> tuple[dict[str, float], str]:
    """:func:`compare_methods.measure`, stopping the bench when the stage fails; the
    figures and the stage's output."""
    figures, code, output = measure(command, cwd, env)
    if code != 0:
        raise SystemExit(f"{' '.join(command[-3:])} failed in {cwd}:\n{output[-3000:]}")
    return figures, output


def bar_rate(output: str, desc: str) -> float | None:
    """Items per second of the last finished tqdm bar ``desc`` in ``output``: its count over
    its elapsed time (the rate tqdm prints is smoothed)."""
    done = re.findall(rf"{re.escape(desc)}: 100%\|[^|]*\| (\d+)/\d+ \[(?:(\d+):)?(\d+):(\d+)", output)
    if not done:
        return None
    count, hours, minutes, seconds = done[-1]
    elapsed = int(hours or 0) * 3600 + int(minutes) * 60 + int(seconds)
    return int(count) / elapsed if elapsed else None


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, nargs="+", default=[20_000, 200_000])
    parser.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "imsvd-scale-bench")
    parser.add_argument("--commit", default="HEAD")
    parser.add_argument("--steps", type=int, default=50, help="pretraining steps (one capped epoch)")
    parser.add_argument("--views", type=int, default=2, help="views per image in the cache")
    parser.add_argument("--backbone", default="resnet18", help="pretrain.backbone (see above)")
    parser.add_argument(
        "--stages", nargs="+", choices=STAGES, default=list(STAGES), help="stages to run, in order"
    )
    parser.add_argument(
        "--max-in-memory-mb",
        type=float,
        default=0,
        help="data.max_in_memory_mb: 0 (default) streams every size through the image store, "
        "the path whose memory is meant to stay flat; 2048 is the product's default",
    )
    parser.add_argument(
        "--pretrain-from",
        choices=("store", "cache"),
        default="store",
        help="store (default): crop views from the image store's originals in DataLoader workers; "
        "cache: read the augment stage's view cache (shards unless --max-array-mb), no workers",
    )
    parser.add_argument(
        "--max-array-mb",
        type=float,
        default=0,
        help="augment.max_array_mb: 0 (default) writes the view cache as shards, read with file "
        "reads; 2048 is the product's default (one memory-mapped array up to 2 GiB)",
    )
    parser.add_argument(
        "--keep",
        type=Path,
        help="keep the projects (one per size, with their outputs) in this folder, and reuse "
        "them: a later run with --stages evaluate reruns only that stage on the kept outputs",
    )
    args = parser.parse_args()

    cores = len(os.sched_getaffinity(0))
    rows = []
    keep = contextlib.nullcontext(str(args.keep)) if args.keep else tempfile.TemporaryDirectory()
    with keep as work:
        for n in args.images:
            # One project per size, so a size's stages read that size's outputs. A kept one
            # gets the code of --commit afresh and keeps its data/ (to rerun a stage).
            project = Path(work) / f"project-{n}"
            for code in ("src", "conf", "pipelines"):
                shutil.rmtree(project / code, ignore_errors=True)
            commit = export_project(project, args.commit)
            check_imports(project)
            env = dict(os.environ, KEDRO_DISABLE_TELEMETRY="true", DO_NOT_TRACK="1", PYTHONUNBUFFERED="1")
            env["PYTHONPATH"] = os.pathsep.join(import_paths(project))
            env["MLFLOW_TRACKING_URI"] = f"sqlite:///{project / 'mlflow.db'}"
            folder = make_folder(args.folder / str(n), n)
            rate = decode_rate(folder)
            print(
                f"{n:,} images in {folder}; one process decodes {rate:.0f} files/s, {cores} cores {rate * cores:.0f}/s"
            )
            params = ",".join(
                [
                    "data.source=image_folder",
                    f"data.path={folder}",
                    f"data.max_in_memory_mb={args.max_in_memory_mb:g}",
                    "augment.size=64",
                    f"augment.views={args.views}",
                    f"augment.max_array_mb={args.max_array_mb:g}",
                    f"pretrain.backbone={args.backbone}",
                    "pretrain.epochs=1",
                    f"pretrain.max_steps_per_epoch={args.steps}",
                    f"pretrain.stream_store={'true' if args.pretrain_from == 'store' else 'false'}",
                    f"pretrain.num_workers={cores if args.pretrain_from == 'store' else 0}",
                    "pretrain.resume=false",
                    "pretrain.monitor.every_n_steps=0",
                ]
            )
            for stage in args.stages:
                command = [sys.executable, "-m", "kedro", "run", f"--pipeline={stage}", "--params", params]
                result, output = measure_stage(command, project, env)
                count = args.steps * 256 if stage == "pretrain" else n
                rows.append((n, stage, result, count))
                print(
                    f"  {stage:<9} {result['seconds']:7.0f} s  {count / result['seconds']:8.0f} images/s  "
                    f"peak PSS {result['pss'] / 1024:6.2f} GiB, anonymous {result['pss_anon'] / 1024:5.2f} GiB  "
                    f"({result['processes']:.0f} processes)",
                    flush=True,
                )
                streamed = bar_rate(output, "decoding into the store") if stage == "validate" else None
                if streamed:
                    print(
                        f"            the files streamed into the store at {streamed:.0f} files/s: "
                        f"{streamed / (rate * cores):.2f} of the cores' decode rate ({rate * cores:.0f}/s)",
                        flush=True,
                    )
    print(
        f"\ncommit {commit}, {cores} cores; data.max_in_memory_mb={args.max_in_memory_mb:g}, "
        f"augment.max_array_mb={args.max_array_mb:g}; "
        f"pretrain: {args.backbone}, {args.steps} steps of 256 pairs, views 64x64, from the {args.pretrain_from}"
    )
    print("| images | stage | wall s | images/s | peak PSS of the tree GiB | of it anonymous GiB |")
    print("|---|---|---|---|---|---|")
    for n, stage, r, count in rows:
        print(
            f"| {n:,} | {stage} | {r['seconds']:.0f} | {count / r['seconds']:.0f} | {r['pss'] / 1024:.2f} "
            f"| {r['pss_anon'] / 1024:.2f} |"
        )
    sizes = sorted({n for n, *_ in rows})
    if len(sizes) == 2:
        small, large = sizes
        for stage in args.stages:
            a = next(r for n, s, r, _ in rows if n == small and s == stage)
            b = next(r for n, s, r, _ in rows if n == large and s == stage)
            print(
                f"{stage}: peak PSS at {large:,} / at {small:,} = x{b['pss'] / a['pss']:.2f}, "
                f"anonymous x{b['pss_anon'] / a['pss_anon']:.2f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
