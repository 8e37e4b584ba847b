"""PSS of a command's process tree over time, as CSV: where in a run the memory goes.

    python bench/pss_timeline.py --out timeline.csv -- python -m kedro run --pipeline=validate

Samples every ``--every`` seconds, from outside, the PSS (shared pages counted once,
:func:`compare_methods.smaps_pss`) of the command's own process and of its whole tree, and
writes ``seconds, kedro_process_pss_mib, tree_pss_mib, processes, children_private_mib,
tree_anon_pss_mib`` rows as it goes. The fifth is the sum of the child processes' private
pages (``Private_Clean`` and ``Private_Dirty``): what they hold of their own, the pages they
copied from the forking parent included; the last, the anonymous part of the tree's PSS, is what file pages (the
libraries, which the kernel drops and reads again as the page cache needs) do not move.
The command's output goes to ``--log``. Prints the peak at the end.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_methods import smaps_pss  # noqa: E402


def private_mib(pid: int) -> float:
    """The private pages of process ``pid``, in MiB (``/proc/<pid>/smaps_rollup``)."""
    total = 0
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            key, _, rest = line.partition(":")
            if key in ("Private_Clean", "Private_Dirty"):
                total += int(rest.split()[0])
    return total / 1024


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="the CSV to write")
    parser.add_argument("--log", type=Path, default=Path("pss_timeline.log"), help="the command's output")
    parser.add_argument("--every", type=float, default=0.2, help="seconds between samples")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given (put it after --)")
    peak = peak_anon = 0.0
    with args.log.open("w") as log, args.out.open("w") as out:
        out.write(
            "seconds,kedro_process_pss_mib,tree_pss_mib,processes,children_private_mib,tree_anon_pss_mib\n"
        )
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        parent = psutil.Process(process.pid)
        while process.poll() is None:
            try:
                tree = [parent, *parent.children(recursive=True)]
                both = [smaps_pss(p.pid) for p in tree]
                pss, anon = [b[0] for b in both], [b[1] for b in both]
                private = sum(private_mib(p.pid) for p in tree[1:])
            except (psutil.Error, OSError):
                pass
            else:
                peak, peak_anon = max(peak, sum(pss)), max(peak_anon, sum(anon))
                out.write(
                    f"{time.perf_counter() - start:.1f},{pss[0]:.0f},{sum(pss):.0f},{len(tree)},{private:.0f},{sum(anon):.0f}\n"
                )
                out.flush()
            time.sleep(args.every)
    print(
        f"exit status {process.returncode}; peak PSS of the tree {peak:.0f} MiB, anonymous {peak_anon:.0f} MiB; "
        f"samples in {args.out}"
    )
    return process.returncode


if __name__ == "__main__":
    raise SystemExit(main())
