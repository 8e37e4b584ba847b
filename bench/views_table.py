"""Does the view cache cost accuracy? One table from the comparison bench's result files.

Each argument is ``label=file.json[,file.json...]``: results written by
``bench/compare_methods.py`` (IMSVD rows only). The script prints, per label, the seeds, the
mean ± standard deviation of linear and kNN top-1, and the difference of every later label
from the first with a 95 % Welch confidence interval, so "within 1 point" can be read off
with its uncertainty instead of from two means.

    python bench/views_table.py \\
        "cache, 8 views=bench/results/digits_imsvd_cache.json" \\
        "on the fly=bench/results/digits_imsvd_on_the_fly.json"
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from scipy import stats


def load(spec: str) -> tuple[str, dict[int, dict]]:
    label, files = spec.split("=", 1)
    rows: dict[int, dict] = {}
    for name in files.split(","):
        for row in json.loads(Path(name).read_text())["rows"]:
            if row["method"] == "imsvd" and "knn_top1" in row:
                rows[row["seed"]] = row
    return label, rows


def welch(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of b − a and the half-width of its 95 % Welch interval."""
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return statistics.mean(b) - statistics.mean(a), stats.t.ppf(0.975, dof) * (va + vb) ** 0.5


def main(specs: list[str]) -> int:
    if len(specs) < 2:
        raise SystemExit(__doc__)
    groups = [load(spec) for spec in specs]
    print(
        "| views from | seeds | linear top-1 | kNN top-1 | linear vs first (95 % CI) | kNN vs first (95 % CI) |"
    )
    print("|---|---|---|---|---|---|")
    base = groups[0][1]
    for label, rows in groups:
        cells = []
        for key in ("linear_top1", "knn_top1"):
            values = [r[key] for r in rows.values()]
            cells.append(f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}")
        for key in ("linear_top1", "knn_top1"):
            if rows is base:
                cells.append("–")
            else:
                diff, half = welch([r[key] for r in base.values()], [r[key] for r in rows.values()])
                cells.append(f"{diff:+.1f} ({diff - half:+.1f} to {diff + half:+.1f})")
        print(f"| {label} | {sorted(rows)} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
