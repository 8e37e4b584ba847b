"""Time and peak memory of ``imsvd_loss`` against the straightforward reference form.

Both variants run forward AND backward on the same inputs, each in a fresh subprocess so
that its peak memory is measured from a clean process:

- CPU: peak resident set size above the level reached once the inputs are built (the
  kernel's high-water mark is reset through ``/proc/self/clear_refs`` where Linux allows
  it; elsewhere ``ru_maxrss`` is used);
- CUDA: ``torch.cuda.max_memory_allocated`` above the allocation after the inputs are
  built, after ``reset_peak_memory_stats``.

Time is the median of ``--repeats`` runs after warm-up (the best run is shown too, for
machines shared with other work; ``--check`` uses the medians). On a shared machine the two
variants would otherwise be timed under different loads, so the subprocesses run in
``--rounds`` alternating rounds (reference, project, project, reference, ...) and the
table shows the median over all rounds of each variant's per-round median (peak memory:
the largest seen).

Usage::

    python bench/loss_bench.py --device cpu --n 256 --d 8160 --bin 80 --repeats 3 --rounds 3 --check
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import torch
from torch import Tensor

VARIANTS = ("reference", "project")


def reference_imsvd_total(z1: Tensor, z2: Tensor, bin_size: int, temperature: float = 1.0) -> Tensor:
    """The straightforward form: full D x D P by einsum, off-diagonal blocks gathered."""
    n, dim = z1.shape
    blocks = dim // bin_size
    p1 = torch.softmax(z1.view(n, blocks, bin_size) / temperature, dim=-1).clamp(min=1e-8).view(n, dim)
    p2 = torch.softmax(z2.view(n, blocks, bin_size) / temperature, dim=-1).clamp(min=1e-8).view(n, dim)
    joint = torch.einsum("ni,nj->ij", p1, p2) / n
    idx = torch.arange(dim, device=z1.device)
    diag = joint[idx, idx]
    diagonal = (diag * torch.log(diag)).sum() / blocks
    grid = joint.reshape(blocks, bin_size, blocks, bin_size).permute(0, 2, 1, 3)
    rows, cols = torch.meshgrid(
        torch.arange(blocks, device=z1.device), torch.arange(blocks, device=z1.device), indexing="ij"
    )
    off = rows != cols
    off_blocks = grid[rows[off], cols[off]].flatten()
    off_block = (off_blocks * torch.log(off_blocks)).sum() / (blocks * (blocks - 1))
    agreement = (p1 * p2).view(n, blocks, bin_size).sum(-1)
    invariance = -torch.log(agreement).mean()
    return diagonal + off_block + invariance


def _project_total(z1: Tensor, z2: Tensor, bin_size: int) -> Tensor:
    from imsvd.losses import imsvd_loss

    return imsvd_loss(z1, z2, bin_size).total


def _rss_kib() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _hwm_kib() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """Run one variant in this process and return its median time and peak memory."""
    device = torch.device(args.device)
    step = _project_total if args.worker == "project" else reference_imsvd_total
    gen = torch.Generator().manual_seed(0)
    z1 = torch.randn(args.n, args.d, generator=gen).to(device).requires_grad_(True)
    z2 = torch.randn(args.n, args.d, generator=gen).to(device).requires_grad_(True)

    def run_once() -> float:
        total = step(z1, z2, args.bin)
        torch.autograd.grad(total, (z1, z2))
        return float(total.detach())

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    # Peak memory of one forward+backward from a clean state (nothing cached yet).
    if device.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        value = run_once()
        sync()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        exact = _reset_hwm()
        base = _rss_kib() if exact else _hwm_kib()
        value = run_once()
        peak = (_hwm_kib() - base) * 1024
    for _ in range(args.warmup):
        run_once()
    times = []
    for _ in range(args.repeats):
        sync()
        start = time.perf_counter()
        run_once()
        sync()
        times.append(time.perf_counter() - start)
    return {
        "variant": args.worker,
        "ms": 1000 * statistics.median(times),
        "best_ms": 1000 * min(times),
        "peak_mib": peak / 2**20,
        "value": value,
    }


def _run_worker(variant: str, forwarded: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run one variant in a fresh interpreter and return its measurements."""
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), *forwarded, f"--worker={variant}"],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} worker failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--d", type=int, default=8160)
    parser.add_argument("--bin", type=int, default=80)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per subprocess")
    parser.add_argument("--rounds", type=int, default=3, help="alternating subprocess rounds per variant")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--check", action="store_true", help="exit 1 if a ratio exceeds 0.5")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    if args.device == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available", file=sys.stderr)
        return 2
    forwarded = [f"--device={args.device}", f"--n={args.n}", f"--d={args.d}", f"--bin={args.bin}",
                 f"--repeats={args.repeats}", f"--warmup={args.warmup}"]  # fmt: skip
    env = dict(os.environ)
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "src")
    env["PYTHONPATH"] = os.pathsep.join([os.path.abspath(src), env.get("PYTHONPATH", "")])
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in VARIANTS}
    for round_index in range(args.rounds):
        order = VARIANTS if round_index % 2 == 0 else VARIANTS[::-1]
        for variant in order:
            try:
                runs[variant].append(_run_worker(variant, forwarded, env))
            except RuntimeError as exc:
                print(exc, file=sys.stderr)
                return 2
    results = {
        name: {
            "ms": statistics.median(r["ms"] for r in rs),
            "best_ms": min(r["best_ms"] for r in rs),
            "peak_mib": max(r["peak_mib"] for r in rs),
            "value": rs[0]["value"],
            "rounds_ms": [round(r["ms"], 1) for r in rs],
        }
        for name, rs in runs.items()
    }

    ref, own = results["reference"], results["project"]
    time_ratio = own["ms"] / ref["ms"]
    mem_ratio = own["peak_mib"] / ref["peak_mib"]
    device_name = (
        torch.cuda.get_device_name() if args.device == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    )
    print(
        f"imsvd_loss forward+backward  N={args.n} D={args.d} bin={args.bin} float32  device={device_name}  "
        f"rounds={args.rounds} repeats={args.repeats} warmup={args.warmup}"
    )
    header = f"{'variant':<10} {'median ms':>10} {'peak MiB':>10} {'best ms':>10} {'loss':>12}"
    print(f"{header}   per-round median ms")
    for name in VARIANTS:
        r = results[name]
        print(
            f"{name:<10} {r['ms']:>10.1f} {r['peak_mib']:>10.1f} {r['best_ms']:>10.1f} {r['value']:>12.6f}"
            f"   {r['rounds_ms']}"
        )
    best_ratio = own["best_ms"] / ref["best_ms"]
    print(f"{'ratio':<10} {time_ratio:>10.3f} {mem_ratio:>10.3f} {best_ratio:>10.3f}   (project / reference)")
    if abs(own["value"] - ref["value"]) > 1e-3 * max(1.0, abs(ref["value"])):
        print("values disagree", file=sys.stderr)
        return 1
    if args.check and (time_ratio > 0.5 or mem_ratio > 0.5):
        print("FAIL: a ratio exceeds 0.5", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
