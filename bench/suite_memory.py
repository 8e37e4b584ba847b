"""Memory the Great Expectations check of a manifest takes, at several numbers of rows.

    python bench/suite_memory.py --rows 20000 200000

For each size, in a fresh process: a seeded manifest of that many rows with the columns
``validate`` writes (ids like a folder's paths, hex digests, sizes, means), then
:func:`imsvd.validation.validate_manifest` on it (the four suites and the Data Docs site),
timed, with this process's resident memory polled every 10 ms. Prints the resident memory
before the check (Great Expectations imported) and its peak above that: the part of
``validate``'s end that grows with the number of files.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one(rows: int) -> None:
    """Measure ``rows`` in this process and print one line."""
    import numpy as np
    import pandas as pd
    import psutil

    sys.path.insert(0, str(ROOT / "src"))
    import great_expectations  # noqa: F401  (its import is the same at every size: not counted)

    from imsvd.config import ValidateConfig
    from imsvd.validation import validate_manifest

    rng = np.random.default_rng(0)
    classes = [f"class{c}" for c in range(10)]
    split = np.where(np.arange(rows) // 10 % 5 == 0, "test", "train")  # every label in both
    manifest = pd.DataFrame(
        {
            "id": [f"{split[i]}/{classes[i % 10]}/{i:07d}.jpg" for i in range(rows)],
            "split": split,
            "label": np.arange(rows) % 10,
            "height": rng.integers(64, 512, rows),
            "width": rng.integers(64, 512, rows),
            "channels": 3,
            "mode": "RGB",
            "sha256": [hashlib.sha256(str(i).encode()).hexdigest() for i in range(rows)],
            "mean_intensity": rng.random(rows) * 255,
        }
    )
    process = psutil.Process()
    peak, done = [0], threading.Event()

    def poll() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.01)

    with tempfile.TemporaryDirectory() as docs:
        config = ValidateConfig(data_docs_dir=docs, max_images=10 * rows)
        before = process.memory_info().rss
        watcher = threading.Thread(target=poll, daemon=True)
        watcher.start()
        start = time.perf_counter()
        report = validate_manifest(manifest, classes, config)
        seconds = time.perf_counter() - start
        done.set()
        watcher.join()
    print(
        f"{rows:>9,} rows: resident {before / 2**20:5.0f} MiB before the check, peak +{(peak[0] - before) / 2**20:4.0f} "
        f"MiB during it, {seconds:.1f} s (suite {'passed' if report['success'] else 'failed'})",
        flush=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[20_000, 200_000])
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # the child's own run
    args = parser.parse_args()
    if args.one:
        one(args.one)
        return 0
    for rows in args.rows:  # each in a fresh process: a peak is not left over from the last
        subprocess.run([sys.executable, __file__, "--one", str(rows)], check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
