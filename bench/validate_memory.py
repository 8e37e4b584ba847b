"""Peak memory and time of ``kedro run --pipeline=validate`` on a folder of JPEGs, for two
commits side by side (by default the one before the streamed decoding, and HEAD).

    python bench/validate_memory.py --images 20000 --before 33c7707 --after HEAD

The folder (seeded, ``--images`` RGB JPEGs of 256x256 in 10 class folders, a fifth of
them under test/) is made once under ``--folder`` and reused. Each commit runs in its own
``git archive`` export. Memory is sampled every 0.2 s from outside, over the process tree:
the sum of PSS (shared pages counted once: the decoding workers and the parent share the
image array) and the sum of RSS (what ``top`` adds up; it counts shared pages once per
process that touched them).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_methods import check_imports, export_project, import_paths  # noqa: E402
from scale_bench import measure_stage  # noqa: E402


def make_folder(root: Path, n: int, side: int = 256) -> Path:
    """Smooth seeded colour pictures (JPEG quality 90), so files compress like photos."""
    marker = root / f".complete-{n}-{side}"
    if marker.exists():
        return root
    rng = np.random.default_rng(0)
    for i in range(n):
        split = "test" if (i // 10) % 5 == 4 else "train"  # every class in both splits
        folder = root / split / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = Image.fromarray(rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8))
        picture = np.asarray(coarse.resize((side, side), Image.Resampling.BICUBIC), dtype=np.int16)
        picture = np.clip(picture + rng.integers(-12, 12, size=picture.shape), 0, 255).astype(np.uint8)
        Image.fromarray(picture).save(folder / f"{i:06d}.jpg", quality=90)
        if i and i % 5000 == 0:
            print(f"  made {i} images", flush=True)
    marker.touch()
    return root


def run_validate(project: Path, folder: Path) -> dict[str, float]:
    params = f"data.source=image_folder,data.path={folder}"
    env = dict(os.environ, KEDRO_DISABLE_TELEMETRY="true", DO_NOT_TRACK="1")
    env["PYTHONPATH"] = os.pathsep.join(import_paths(project))
    command = [sys.executable, "-m", "kedro", "run", "--pipeline=validate", "--params", params]
    return measure_stage(command, project, env)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "imsvd-validate-bench")
    parser.add_argument("--before", default="33c7707")
    parser.add_argument("--after", default="HEAD")
    args = parser.parse_args()

    folder = make_folder(args.folder / str(args.images), args.images)
    decoded = args.images * 256 * 256 * 3 / 2**30
    print(f"{args.images} JPEGs of 256x256 RGB in {folder}: {decoded:.2f} GiB once decoded", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for name in (args.before, args.after):
            project = Path(work) / name
            commit = export_project(project, name)
            check_imports(project)
            result = run_validate(project, folder)
            rows.append((commit, result))
            print(
                f"{commit}: {result['seconds']:.0f} s, peak PSS {result['pss'] / 1024:.2f} GiB, "
                f"peak RSS sum {result['rss'] / 1024:.2f} GiB, {result['processes']:.0f} processes",
                flush=True,
            )
    (before, b), (after, a) = rows
    print()
    print("| commit | wall s | files/s | peak PSS of the tree GiB | x decoded | peak RSS sum GiB |")
    print("|---|---|---|---|---|---|")
    for commit, r in rows:
        print(
            f"| {commit} | {r['seconds']:.0f} | {args.images / r['seconds']:.0f} | {r['pss'] / 1024:.2f} | "
            f"{r['pss'] / 1024 / decoded:.2f} | {r['rss'] / 1024:.2f} |"
        )
    print(
        f"\n{after} against {before}: peak PSS x{a['pss'] / b['pss']:.2f}, wall time x{a['seconds'] / b['seconds']:.2f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
