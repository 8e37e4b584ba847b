"""IMSVD against Barlow Twins, VICReg and SimCLR: same harness, same budget, one table.

Every row runs the product's own pipelines with ``kedro run --params`` in a copy of the
project exported from the current commit (so the user's ``data/`` is untouched and the
table names the code that made it): ``validate`` and ``augment`` once per
data set (the view cache is shared by all methods), then ``pretrain`` and ``evaluate``
per method at the first seed, then every further seed for IMSVD and for the best
baseline (by linear top-1 at the first seed). Only ``pretrain.method`` (and each method's projector) changes
between rows: backbone, views, optimiser, epochs, batch and evaluation are shared.

    python bench/compare_methods.py --data digits --epochs 30 --seeds 0 1 2
    python bench/compare_methods.py --data fashion_mnist --max-train 6000 --max-test 2000 --epochs 10
    python bench/compare_methods.py --budget gpu ...      # wider backbone, bigger batch

Writes ``bench/results/compare_<data>.md`` (the table) and ``.json`` (every figure).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("imsvd", "barlow_twins", "vicreg", "simclr")
# Published heads scaled to a 2-core budget: IMSVD's reference CIFAR projector for the
# three redundancy-reduction methods; SimCLR's 2-layer head with a 128-d output.
PROJECTOR = {
    "imsvd": "1024-1024-1024",
    "barlow_twins": "1024-1024-1024",
    "vicreg": "1024-1024-1024",
    "simclr": "1024-128",
}
BUDGETS = {
    "cpu": {"pretrain.width": 0.25, "pretrain.batch_size": 256, "augment.size": 16},
    "gpu": {"pretrain.width": 1.0, "pretrain.batch_size": 512, "augment.size": 32, "pretrain.num_workers": 4},
}


def export_project(destination: Path, revision: str = "HEAD") -> str:
    """Export a committed tree (``git archive REVISION``) to ``destination``; return the commit.

    The runs use what is committed, not the working tree, so a table always names the code
    and parameters that produced it: an uncommitted edit (for example a parameter file left
    behind by ``dvc exp run`` in the workspace) can no longer slip into the figures unseen.
    """
    commit = subprocess.run(
        ["git", "rev-parse", "--short", revision], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    destination.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", revision], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(destination)], input=archive, check=True)
    # Compare bytes, not git's stat cache: an edit that kept size and mtime escapes it.
    changed = [
        str(exported.relative_to(destination))
        for part in ("conf", "src", "pipelines")
        for exported in sorted((destination / part).rglob("*"))
        if exported.is_file()
        and (
            not (ROOT / exported.relative_to(destination)).is_file()
            or (ROOT / exported.relative_to(destination)).read_bytes() != exported.read_bytes()
        )
    ]
    if changed:
        print(
            f"note: {', '.join(changed)} differ from the working tree; the runs use {revision} ({commit})",
            flush=True,
        )
    return commit


def import_paths(project: Path) -> list[str]:
    """Put the export's own packages first on the path of every run.

    The working tree is installed in editable mode, and its finder maps ``imsvd_pipelines``
    to the working tree's ``pipelines/``: without this, an export's runs would import the
    export's ``imsvd`` (Kedro puts ``src/`` first) but the working tree's pipelines, and
    an edit made while a long comparison runs would break it or change its rows.
    """
    shim = project / ".imports"
    shim.mkdir(exist_ok=True)
    link = shim / "imsvd_pipelines"
    if link.is_symlink() and link.resolve() != (project / "pipelines").resolve():
        link.unlink()  # a project copied or moved from elsewhere (scale_bench --keep)
    if not link.exists():
        link.symlink_to(project / "pipelines", target_is_directory=True)
    return [str(project / "src"), str(shim)]


def check_imports(project: Path) -> None:
    """Fail at once unless a run in ``project`` imports both packages from the export."""
    code = "import imsvd, imsvd_pipelines; print(imsvd.__file__); print(imsvd_pipelines.__file__)"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(import_paths(project)))
    found = subprocess.run(
        [sys.executable, "-c", code], cwd=project, env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    outside = [f for f in found if not Path(f).resolve().is_relative_to(project.resolve())]
    if outside:
        raise SystemExit(f"the export at {project} would import {outside} from outside it")


def smaps_pss(pid: int) -> tuple[float, float]:
    """(PSS, its anonymous part) of process ``pid`` in MiB, from ``/proc/<pid>/smaps_rollup``.

    The rest of PSS is file pages: the libraries, and memory-mapped files (features, the
    store's chunks) whose cached pages count while mapped although the kernel may drop them.
    """
    values = {}
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            key, _, rest = line.partition(":")
            if key in ("Pss", "Pss_Anon"):
                values[key] = int(rest.split()[0]) / 1024
    return values.get("Pss", 0.0), values.get("Pss_Anon", 0.0)


def measure(command: list[str], cwd: Path, env: dict[str, str]) -> tuple[dict[str, float], int, str]:
    """Run ``command`` and sample its process tree every 0.2 s from outside.

    Returns:
        The figures (wall ``seconds``; the peaks, in MiB, of the tree's summed ``pss``, shared
        pages counted once, of its anonymous part ``pss_anon`` (:func:`smaps_pss`), and of
        the summed ``rss``, what ``top`` adds up; the most ``processes``; ``cpu_main``, the
        CPU seconds of the command's own process, and ``cpu_children``, those of the
        children it has waited for, as last sampled), the exit status, and the merged
        stdout and stderr.
    """
    start = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    peak = {"pss": 0.0, "pss_anon": 0.0, "rss": 0.0, "processes": 0.0, "cpu_main": 0.0, "cpu_children": 0.0}

    def sample() -> None:
        parent = psutil.Process(process.pid)
        while process.poll() is None:
            try:
                tree = [parent, *parent.children(recursive=True)]
                both = [smaps_pss(p.pid) for p in tree]
                rss = sum(p.memory_info().rss for p in tree) / 2**20
                cpu = parent.cpu_times()
            except (psutil.Error, OSError):
                pass
            else:
                peak["pss"] = max(peak["pss"], sum(p for p, _ in both))
                peak["pss_anon"] = max(peak["pss_anon"], sum(a for _, a in both))
                peak["rss"] = max(peak["rss"], rss)
                peak["processes"] = max(peak["processes"], len(tree))
                peak["cpu_main"] = cpu.user + cpu.system
                peak["cpu_children"] = cpu.children_user + cpu.children_system
            time.sleep(0.2)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    output, _ = process.communicate()
    watcher.join()
    return {"seconds": time.perf_counter() - start, **peak}, process.returncode, output


class Diverged(RuntimeError):
    """Pretraining stopped on a non-finite loss."""


def kedro(
    project: Path, pipeline: str, params: dict[str, object], conf_env: str | None = None
) -> tuple[float, float]:
    """Run one pipeline; return (wall seconds, peak resident MiB of the process tree)."""
    text = ",".join(f"{k}={v}" for k, v in params.items())
    env = dict(os.environ, KEDRO_DISABLE_TELEMETRY="true", DO_NOT_TRACK="1", COLUMNS="200")
    env["PYTHONPATH"] = os.pathsep.join(import_paths(project))
    command = [sys.executable, "-m", "kedro", "run", f"--pipeline={pipeline}", "--params", text]
    if conf_env:
        command.append(f"--env={conf_env}")
    figures, code, output = measure(command, project, env)
    if code != 0:
        if "non-finite loss" in output:
            raise Diverged(output.strip().splitlines()[-1])
        raise SystemExit(f"kedro run --pipeline={pipeline} failed:\n{output[-4000:]}")
    return figures["seconds"], figures["rss"]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", choices=("digits", "fashion_mnist"), default="digits")
    parser.add_argument("--data-path", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--max-train", type=int)
    parser.add_argument("--max-test", type=int)
    parser.add_argument("--epochs", type=int, help="default: the environment's (--budget env) or 20")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument(
        "--extra-seed-methods",
        nargs="*",
        default=["imsvd"],
        help="methods run with every seed (besides the best baseline at the first seed)",
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument(
        "--budget",
        choices=(*BUDGETS, "env"),
        default="cpu",
        help="shared width, batch and view size; 'env' takes them (and the epochs, unless "
        "--epochs is given) from the Kedro environment named by --env",
    )
    parser.add_argument("--env", help="Kedro configuration environment for every run (e.g. fashion_mnist)")
    parser.add_argument("--set", nargs="*", default=[], help="extra key=value parameters for every run")
    parser.add_argument(
        "--commit",
        default="HEAD",
        help="the commit to export and run (default HEAD): several invocations that add rows "
        "to one table with --reuse can share one commit while work goes on",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--name", help="output file stem, dots kept (default compare_<data>[_<budget>])")
    parser.add_argument(
        "--reuse",
        type=Path,
        help="an earlier results .json: its rows join the table (marked with their commit) "
        "unless this run redoes that method and seed, so adding seeds reruns nothing",
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="imsvd-compare-"))
    project = work / "project"
    commit = export_project(project, args.commit)
    check_imports(project)
    if args.budget == "env" and not args.env:
        parser.error("--budget env needs --env")
    data = {"data.source": args.data}
    if args.data != "digits" and args.budget != "env":
        data["data.path"] = args.data_path
    if args.max_train:
        data["data.max_train"] = args.max_train
    if args.max_test:
        data["data.max_test"] = args.max_test
    shared = {**data, **BUDGETS.get(args.budget, {}), "pretrain.resume": "false"}
    if args.epochs or args.budget != "env":
        shared["pretrain.epochs"] = args.epochs or 20
    shared.update(dict(item.split("=", 1) for item in args.set))
    rows: list[dict] = []
    if args.reuse:
        # Rows this run would redo are dropped; every kept row keeps the commit it ran at.
        earlier = json.loads(args.reuse.read_text())

        def settings(params: dict) -> dict:  # the starting learning rate may differ
            return {k: v for k, v in params.items() if k != "pretrain.base_lr"}

        if settings(earlier["shared"]) != settings(shared):
            raise SystemExit(f"--reuse {args.reuse}: its shared parameters differ from this run's")
        rows = [
            # Result files written before e8c8bce carry no commit.
            {"commit": earlier.get("commit", "before e8c8bce"), **row}
            for row in earlier["rows"]
            if not (row["method"] in args.methods and row["seed"] in args.seeds)
        ]
    print(f"work folder {project}; shared parameters {shared}", flush=True)
    kedro(project, "validate", shared, args.env)
    kedro(project, "augment", shared, args.env)

    # The exported commit's own default (parameters_pretrain.yml) unless --set names one.
    shipped = yaml.safe_load((project / "conf/base/parameters_pretrain.yml").read_text())["pretrain"]
    if args.env and (project / "conf" / args.env / "parameters.yml").is_file():
        shipped.update(
            (yaml.safe_load((project / "conf" / args.env / "parameters.yml").read_text()) or {}).get(
                "pretrain", {}
            )
        )
    start_lr = float(shared.get("pretrain.base_lr", shipped["base_lr"]))
    base_lr = dict.fromkeys(args.methods, start_lr)
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = {"cpu": "", "env": f"_{args.env}"}.get(args.budget, f"_{args.budget}")
    stem = args.out / (args.name or f"compare_{args.data}{suffix}")

    def save() -> None:
        """Rewrite the results after every row, so an interrupted run keeps what it measured."""
        stem.with_name(stem.name + ".json").write_text(
            json.dumps({"commit": commit, "shared": shared, "rows": rows}, indent=2, default=str)
        )
        if any("linear_top1" in r for r in rows):
            stem.with_name(stem.name + ".md").write_text(table(rows, shared, args, commit))

    def run(method: str, seed: int) -> None:
        # One shared optimiser; a method whose loss diverges at the shared learning rate is
        # retried at half of it (down to an eighth), and the table says which rate it
        # trained at; a method that diverges at every rate gets a "diverged" row.
        while True:
            params = {
                **shared,
                "pretrain.method": method,
                "pretrain.seed": seed,
                "pretrain.projector": PROJECTOR[method],
                "pretrain.base_lr": base_lr[method],
            }
            try:
                wall, peak = kedro(project, "pretrain", params, args.env)
                break
            except Diverged as error:
                print(f"{method} seed {seed} diverged at base_lr {base_lr[method]}: {error}", flush=True)
                if base_lr[method] <= start_lr / 8:
                    rows.append(
                        {
                            "commit": commit,
                            "method": method,
                            "seed": seed,
                            "base_lr": base_lr[method],
                            "diverged": str(error),
                        }
                    )
                    save()
                    return
                base_lr[method] /= 2
        kedro(project, "evaluate", params, args.env)
        metrics = json.loads((project / "data/08_reporting/metrics.json").read_text())
        history = (project / "data/07_model_output/pretrain_history.csv").read_text().splitlines()
        header = history[0].split(",")
        ips = [float(line.split(",")[header.index("images_per_second")]) for line in history[1:]]
        steps = int(float(history[-1].split(",")[header.index("step")]))
        rows.append(
            {
                "commit": commit,
                "method": method,
                "seed": seed,
                "base_lr": base_lr[method],
                "pretrain_wall_s": wall,
                "optimizer_steps": steps,
                "images_per_second": statistics.median(ips[len(ips) // 4 :]),
                "peak_rss_mib": peak,
                **metrics,
            }
        )
        save()
        print(
            f"{method:<13} seed {seed}: linear {metrics.get('linear_top1', float('nan')):.2f} "
            f"knn {metrics.get('knn_top1', float('nan')):.2f} rank {metrics['effective_rank']:.1f} {wall:.0f} s",
            flush=True,
        )

    first, *others = args.seeds
    for method in args.methods:
        run(method, first)
    # More seeds for IMSVD and for the best baseline at the first seed (by linear top-1).
    baselines = [r for r in rows if r["method"] != "imsvd" and "linear_top1" in r]
    best = max(baselines, key=lambda r: r.get("linear_top1", 0.0))["method"] if baselines else None
    for method in [m for m in dict.fromkeys([*args.extra_seed_methods, best]) if m in args.methods]:
        for seed in others:
            run(method, seed)

    save()
    print(stem.with_name(stem.name + ".md").read_text())
    return 0


def _cell(values: list[float]) -> str:
    known = [v for v in values if math.isfinite(v)]  # a figure lost for one seed (NaN) is left out
    if not known:
        return "–"
    note = "" if len(known) == len(values) else f" ({len(known)} of {len(values)})"
    if len(known) == 1:
        return f"{known[0]:.2f}{note}"
    return f"{statistics.mean(known):.2f} ± {statistics.stdev(known):.2f}{note}"


def table(rows: list[dict], shared: dict, args: argparse.Namespace, commit: str) -> str:
    cpu = platform.processor() or platform.machine()
    lines = [
        f"Run {datetime.date.today().isoformat()} at commit {commit} on {os.cpu_count()} cores ({cpu}), torch CPU; "
        f"data {args.data}"
        + (f" (train ≤ {args.max_train}, test ≤ {args.max_test})" if args.max_train else "")
        + f"; budget '{args.budget}'"
        + (f" (Kedro environment `{args.env}`)" if args.env else "")
        + f": {shared.get('pretrain.epochs', 'the environment’s')} epochs, shared parameters `{json.dumps(shared)}`.",
        "Accuracies in percent on the "
        + (
            "validation slice of the training images (data.holdout=validation)"
            if shared.get("data.holdout") == "validation"
            else "test split"
        )
        + "; ± is the standard deviation over the seeds "
        f"{sorted({r['seed'] for r in rows})} where a row ran more than one; a row from an earlier "
        "commit says so.",
        "",
        "| method | seeds | base_lr | linear top-1 | kNN top-1 (k=20, T=0.07) | kNN top-1 (k=200, T=0.1) | effective rank | optimiser steps | pretrain wall s | images/s | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method in dict.fromkeys(r["method"] for r in rows):
        group = [r for r in rows if r["method"] == method and "linear_top1" in r]
        failed = [r for r in rows if r["method"] == method and "diverged" in r]
        if failed:
            lines.append(
                f"| {method} | {len(failed)} diverged | ≤ {failed[0]['base_lr']} | "
                f"seeds {[r['seed'] for r in failed]}: non-finite loss | – | – | – | – | – | – | – |"
            )
        if not group:
            continue

        def col(key: str, group: list[dict] = group) -> str:
            return _cell([float(r[key]) for r in group])

        earlier = sorted({r["commit"] for r in group if r.get("commit", commit) != commit})
        label = method + (
            f" ({sum(r.get('commit', commit) != commit for r in group)} from {', '.join(earlier)})"
            if earlier
            else ""
        )
        lines.append(
            f"| {label} | {len(group)} | {' / '.join(str(lr) for lr in dict.fromkeys(r['base_lr'] for r in group))} | {col('linear_top1')} | {col('knn_top1')} | {col('knn200_top1')} | "
            f"{col('effective_rank')} | {col('optimizer_steps') if all('optimizer_steps' in r for r in group) else '–'} | {col('pretrain_wall_s')} | {col('images_per_second')} | {col('peak_rss_mib')} |"
        )
    first = next(r for r in rows if "linear_top1" in r)
    for name, suffix in (("raw pixels", "_raw_pixels"), ("random encoder", "_random_encoder")):
        lines.append(
            f"| {name} | – | – | {first['linear_top1' + suffix]:.2f} | {first['knn_top1' + suffix]:.2f} | "
            f"{first['knn200_top1' + suffix]:.2f} | – | – | – | – | – |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
