"""The default ``kedro run`` (digits, every stage) at two commits, interleaved: wall time,
peak memory and the headline metrics of each run, and the ratio of the means.

    python bench/default_run_speed.py --before 7780ad9^ --after HEAD --repeats 2

#15 asks that the digits, now streamed through the image store like every source, run no
slower than before the store by more than 10 %. ``7780ad9^`` is the last commit before it.
Each run is a fresh export of its commit (``git archive``) with its own MLflow store, so
no run resumes from or reuses another's outputs; the commits alternate (ABBA...), as this
VM's speed drifts between runs (README, "Figures").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_methods import check_imports, export_project, import_paths, measure  # noqa: E402

METRICS = ("knn_top1", "linear_top1", "knn_top1_raw_pixels")


def one_run(revision: str, work: Path, label: str) -> dict[str, object]:
    project = work / label
    commit = export_project(project, revision)
    check_imports(project)
    env = dict(os.environ, KEDRO_DISABLE_TELEMETRY="true", DO_NOT_TRACK="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(import_paths(project))
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{project / 'mlflow.db'}"
    figures, code, output = measure([sys.executable, "-m", "kedro", "run"], project, env)
    if code != 0:
        raise SystemExit(f"kedro run at {commit} failed in {project}:\n{output[-3000:]}")
    metrics = json.loads((project / "data/08_reporting/metrics.json").read_text())
    return {"commit": commit, **figures, **{k: metrics.get(k) for k in METRICS}}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--before", default="7780ad9^")
    parser.add_argument("--after", default="HEAD")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each commit")
    args = parser.parse_args()
    runs: dict[str, list[dict[str, object]]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        for r in range(args.repeats):
            order = ("before", "after") if r % 2 == 0 else ("after", "before")
            for side in order:
                row = one_run(getattr(args, side), work, f"{side}-{r}")
                runs[side].append(row)
                scores = " ".join(f"{k} {row[k]:.2f}" for k in METRICS if isinstance(row[k], float))
                print(
                    f"{side:<6} {row['commit']}  {row['seconds']:6.1f} s  peak PSS {float(row['pss']) / 1024:.2f} GiB  {scores}",
                    flush=True,
                )
    mean = {side: statistics.mean(float(r["seconds"]) for r in rows) for side, rows in runs.items()}
    print(
        f"\nmean wall time: before {mean['before']:.1f} s, after {mean['after']:.1f} s: "
        f"after / before = {mean['after'] / mean['before']:.3f} (bound: 1.10)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
