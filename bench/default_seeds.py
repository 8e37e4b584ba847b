"""The shipped default ``kedro run`` (embedded digits) at several seeds, against a random
encoder of the same shape and raw pixels: the README's "Default run" table.

Each seed runs the whole default pipeline, ``kedro run --params pretrain.seed=S``, in a
copy of the project exported from a commit (``compare_methods.export_project``), so the
figures name the code that made them. Rows are written as they finish.

    python bench/default_seeds.py --seeds 0 1 2 --out bench/results/digits_default_3seeds.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare_methods as cm  # noqa: E402 - the sibling script's export and run helpers

COLUMNS = [
    "commit",
    "seed",
    "wall_s",
    "pretrain_s",
    "steps",
    "median_pairs_per_s",
    "knn",
    "linear",
    "knn_random",
    "linear_random",
    "knn_raw",
    "linear_raw",
    "code_knn",
    "monitor_last",
]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--commit", default="HEAD")
    parser.add_argument("--out", type=Path, default=cm.ROOT / "bench/results/digits_default_3seeds.csv")
    args = parser.parse_args()

    project = Path(tempfile.mkdtemp(prefix="imsvd-default-")) / "project"
    commit = cm.export_project(project, args.commit)
    cm.check_imports(project)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, COLUMNS)
        writer.writeheader()
        for seed in args.seeds:
            start = time.perf_counter()
            cm.kedro(project, "__default__", {"pretrain.seed": seed})
            wall = time.perf_counter() - start
            metrics = json.loads((project / "data/08_reporting/metrics.json").read_text())
            history = list(csv.DictReader((project / "data/07_model_output/pretrain_history.csv").open()))
            rates = [float(r["images_per_second"]) for r in history]
            monitor = [float(r["monitor_knn_top1"]) for r in history if r.get("monitor_knn_top1")]
            from imsvd.checkpoints import load_weights

            encoder = load_weights(project / "data/06_models/encoder.pt")
            row = {
                "commit": commit,
                "seed": seed,
                "wall_s": f"{wall:.1f}",
                "pretrain_s": f"{encoder['train_seconds']:.1f}",
                "steps": int(float(history[-1]["step"])),
                "median_pairs_per_s": f"{statistics.median(rates[len(rates) // 4 :]):.0f}",
                "knn": f"{metrics['knn_top1']:.2f}",
                "linear": f"{metrics['linear_top1']:.2f}",
                "knn_random": f"{metrics['knn_top1_random_encoder']:.2f}",
                "linear_random": f"{metrics['linear_top1_random_encoder']:.2f}",
                "knn_raw": f"{metrics['knn_top1_raw_pixels']:.2f}",
                "linear_raw": f"{metrics['linear_top1_raw_pixels']:.2f}",
                "code_knn": f"{metrics['code_knn_top1']:.2f}",
                "monitor_last": f"{monitor[-1]:.1f}" if monitor else "",
            }
            writer.writerow(row)
            handle.flush()
            print(row, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
