"""Validation throughput against the cores' decode rate, for several commits side by side.

    python bench/validate_throughput.py --images 20000 --commits b1260dd HEAD --repeats 2

On the seeded folder of ``scale_bench.py`` (photos of 64 to 512 pixels a side, JPEG and PNG,
10 classes), each commit runs ``kedro run --pipeline=validate`` streaming the folder into the
image store (``data.max_in_memory_mb=0``), in its own fresh project, so no earlier store's
record is reused. The commits take turns (A B A B ...), so a drift of the machine's speed
falls on all of them. Per run it prints the wall time, files per second for the whole
``kedro run`` (Kedro's start, the header pass, the streaming, Great Expectations and the
outputs), the rate of the streaming pass alone (its progress bar: each file read, hashed,
decoded, digested and written into the store), the peak PSS of the process tree, and the
CPU seconds of the ``kedro`` process itself and of its children (the decoding workers).
The main process's share bounds the rate at any number of cores: what it does for each
file, one core has to do for all of them.

The decode rate of the cores is one process fully decoding (``Image.load()``) a sample of
the folder's files, times the cores, measured between the runs on files already read once:
the CPU's rate, not the disk's. The folder is read once before the first run (``--no-warm``
skips that) so that the runs compare code, not the page cache; a folder larger than the
page cache cannot be held warm, and its validation is then bound by the disk as well.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_methods import check_imports, export_project, import_paths  # noqa: E402
from scale_bench import bar_rate, make_folder, measure_stage, warm_decode_rate  # noqa: E402


def sample_files(root: Path, sample: int) -> list[Path]:
    """``sample`` files spread over the folder: every k-th of the sorted list."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    return files[:: max(1, len(files) // sample)][:sample]


def read_all(root: Path) -> int:
    """Read every file once (into the page cache); the bytes read."""
    total = 0
    for path in sorted(root.rglob("*")):
        if path.is_file():
            total += len(path.read_bytes())
    return total


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "imsvd-scale-bench")
    parser.add_argument("--commits", nargs="+", default=["HEAD"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sample", type=int, default=600, help="files timed for the decode rate")
    parser.add_argument("--no-warm", action="store_true", help="do not read the folder before the runs")
    args = parser.parse_args()

    cores = len(os.sched_getaffinity(0))
    folder = make_folder(args.folder / str(args.images), args.images)
    if not args.no_warm:
        start = time.perf_counter()
        size = read_all(folder)
        print(
            f"read the folder once: {size / 2**30:.2f} GiB in {time.perf_counter() - start:.0f} s", flush=True
        )
    sample = sample_files(folder, args.sample)
    rows: list[tuple[str, dict[str, float], float | None, float]] = []
    with tempfile.TemporaryDirectory() as work:
        for repeat in range(args.repeats):
            for revision in args.commits:
                project = Path(work) / f"project-{repeat}-{revision}"
                commit = export_project(project, revision)
                check_imports(project)
                env = dict(os.environ, KEDRO_DISABLE_TELEMETRY="true", DO_NOT_TRACK="1", PYTHONUNBUFFERED="1")
                env["PYTHONPATH"] = os.pathsep.join(import_paths(project))
                env["MLFLOW_TRACKING_URI"] = f"sqlite:///{project / 'mlflow.db'}"
                rate = warm_decode_rate(sample) * cores
                params = f"data.source=image_folder,data.path={folder},data.max_in_memory_mb=0"
                command = [sys.executable, "-m", "kedro", "run", "--pipeline=validate", "--params", params]
                result, output = measure_stage(command, project, env)
                streamed = bar_rate(output, "decoding into the store")
                rows.append((commit, result, streamed, rate))
                shown = f"{streamed:.0f} files/s ({streamed / rate:.2f} of it)" if streamed else "?"
                print(
                    f"  {commit}: {result['seconds']:5.0f} s, {args.images / result['seconds']:5.0f} files/s "
                    f"for the run; streaming pass {shown}; cores' decode rate {rate:.0f}/s; "
                    f"peak PSS {result['pss'] / 1024:.2f} GiB; CPU s: main process "
                    f"{result['cpu_main']:.1f}, its children {result['cpu_children']:.1f}",
                    flush=True,
                )
                shutil.rmtree(project, ignore_errors=True)  # its store is as large as the folder

    print(f"\n{args.images:,} files in {folder}, {cores} cores; {args.repeats} runs a commit, taking turns")
    print(
        "| commit | wall s | files/s, whole run | files/s, streaming pass | cores' decode rate /s "
        "| pass / decode | peak PSS GiB | CPU s, main process | CPU s, its children |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    # One decode rate for the machine: the mean of every measurement (each times 600 files
    # for well under a second, so one alone moves by a fifth).
    decode = statistics.mean(r[3] for r in rows)
    for revision in dict.fromkeys(r[0] for r in rows):
        mine = [r for r in rows if r[0] == revision]
        wall = statistics.mean(r[1]["seconds"] for r in mine)
        passes = [r[2] for r in mine if r[2]]
        passed = statistics.mean(passes) if passes else float("nan")
        print(
            f"| {revision} | {wall:.0f} | {args.images / wall:.0f} | {passed:.0f} | {decode:.0f} | "
            f"{passed / decode:.2f} | {max(r[1]['pss'] for r in mine) / 1024:.2f} | "
            f"{statistics.mean(r[1]['cpu_main'] for r in mine):.1f} | "
            f"{statistics.mean(r[1]['cpu_children'] for r in mine):.1f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
