"""The GPU budget of the Fashion-MNIST comparison: each method trains for a fixed wall time
on one GPU, then is evaluated with the product's kNN and linear probe.

    python bench/gpu_budget.py --data /usr/share/datasets/fashion-mnist --seconds 180 \\
        --methods imsvd vicreg --seeds 0 1 2 --out bench/results/gpu_budget.json

It needs only torch and torchvision (the GPU machine has no Kedro, MLflow or Great
Expectations), with ``src/`` on the path: it imports the library's backbone, projector,
losses, optimiser, schedule and metrics, never its pipelines, the view cache (litdata) or
the sources (scikit-learn). The recipe is the benchmark's, scaled up: ``resnet18_cifar`` at
width 1, 32x32 views, batch 512, SGD at ``base_lr`` 0.4 (peak lr = base_lr x batch / 256),
weight decay 5e-4, warm-up over the first 5 % of the time, then a cosine to 0.001 of the
peak at the end of the budget; IMSVD at bin 8 and temperature 0.125 (the CPU recipe's
validation picks) and VICReg at its published coefficients.

The schedule runs on wall time, not steps: the lr at a step is set by the fraction of
``--seconds`` used so far, and training stops when it is used up, so every method gets the
same time whatever its step rate; the steps made are reported. Views are drawn on the GPU
(:func:`gpu_views`). The test split is read only for the final evaluation.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from imsvd.config import IMSVDConfig, PretrainConfig, VICRegConfig  # noqa: E402
from imsvd.losses import loss_for_method  # noqa: E402
from imsvd.metrics import effective_rank, knn_accuracy, linear_probe  # noqa: E402
from imsvd.models import build_encoder  # noqa: E402
from imsvd.optim import build_optimizer, warmup_cosine  # noqa: E402

SIZE = 32
METHODS = {
    "imsvd": dict(imsvd=IMSVDConfig(bin_size=8, temperature=0.125)),
    "vicreg": dict(vicreg=VICRegConfig()),
    "simclr": {},
    "barlow_twins": {},
}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped or not) as an array.

    ``imsvd.sources.read_idx_file`` does this with more checks, but its module imports
    scikit-learn and PIL, which the GPU machine lacks.
    """
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_split(folder: Path, stem: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,)) of ``train`` or ``t10k``."""
    images = next(
        p
        for p in (folder / f"{stem}-images-idx3-ubyte.gz", folder / f"{stem}-images-idx3-ubyte")
        if p.exists()
    )
    labels = next(
        p
        for p in (folder / f"{stem}-labels-idx1-ubyte.gz", folder / f"{stem}-labels-idx1-ubyte")
        if p.exists()
    )
    return read_idx(images), read_idx(labels).astype(np.int64)


def gpu_views(
    images: torch.Tensor, generator: torch.Generator, scale: tuple[float, float] = (0.5, 1.0)
) -> torch.Tensor:
    """One augmented 32x32 view of each image, all drawn in one batched pass on the device.

    The benchmark's recipe for grey images: RandomResizedCrop (area fraction in ``scale``,
    aspect ratio in [3/4, 4/3]), a horizontal flip with p = 0.5, and with p = 0.8 a
    brightness and a contrast jitter of 0.4 (saturation and hue do nothing to grey
    images). torchvision's v2 transforms draw one set of parameters per call, so per-image
    crops would be a Python loop over the batch; here every image gets its own affine
    crop in one ``grid_sample``. Unlike torchvision's crop, a crop that does not fit
    (only possible at ratios far from 1) is clipped to the image instead of redrawn.

    Args:
        images: (B, 1, H, W) float in [0, 1], on the device.
        generator: a generator on the same device.
        scale: the crop's area fraction range.

    Returns:
        (B, 1, 32, 32) float in [0, 1].
    """
    b, device = images.shape[0], images.device

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand(b, device=device, generator=generator) * (high - low) + low

    area = uniform(*scale)
    log_ratio = uniform(math.log(3 / 4), math.log(4 / 3))
    width = torch.sqrt(area * torch.exp(log_ratio)).clamp(max=1.0)
    height = torch.sqrt(area / torch.exp(log_ratio)).clamp(max=1.0)
    centre_x = (torch.rand(b, device=device, generator=generator) * 2 - 1) * (1 - width)
    centre_y = (torch.rand(b, device=device, generator=generator) * 2 - 1) * (1 - height)
    flip = torch.where(torch.rand(b, device=device, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3, device=device)
    theta[:, 0, 0] = width * flip
    theta[:, 0, 2] = centre_x
    theta[:, 1, 1] = height
    theta[:, 1, 2] = centre_y
    grid = F.affine_grid(theta, [b, 1, SIZE, SIZE], align_corners=False)
    views = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    jitter = (torch.rand(b, device=device, generator=generator) < 0.8).view(b, 1, 1, 1)
    brightness = uniform(0.6, 1.4).view(b, 1, 1, 1)
    contrast = uniform(0.6, 1.4).view(b, 1, 1, 1)
    jittered = (views * brightness).clamp(0, 1)
    mean = jittered.mean(dim=(1, 2, 3), keepdim=True)
    jittered = ((jittered - mean) * contrast + mean).clamp(0, 1)
    return torch.where(jitter, jittered, views)


@torch.no_grad()
def features(backbone: torch.nn.Module, images: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """Frozen backbone features of whole images resized to 32x32, on the CPU."""
    backbone.eval()
    out = []
    for start in range(0, len(images), 2048):
        batch = images[start : start + 2048].float().div(255).unsqueeze(1)
        batch = F.interpolate(batch, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=images.device.type == "cuda"):
            out.append(backbone((batch - mean) / std).float().cpu())
    return torch.cat(out)


def train_one(
    method: str, seed: int, seconds: float, train: torch.Tensor, args: argparse.Namespace
) -> tuple[torch.nn.Module, dict[str, object]]:
    """Pretrain one method for ``seconds`` of wall time; returns the backbone and figures."""
    device = train.device
    torch.manual_seed(seed)
    cfg = PretrainConfig(method=method, **METHODS[method])  # type: ignore[arg-type]
    loss_fn = loss_for_method(cfg)
    model = build_encoder("resnet18_cifar", args.width, [int(d) for d in args.projector.split("-")], 1)
    model = model.to(device, memory_format=torch.channels_last)
    peak_lr = args.base_lr * args.batch_size / 256
    optimizer = build_optimizer(model, "sgd", peak_lr, 5e-4)
    generator = torch.Generator(device=device).manual_seed(seed)
    mean, std = train.float().mean().item() / 255, train.float().std().item() / 255
    n = len(train)
    steps, losses, loss = 0, [], torch.tensor(float("nan"))
    model.train()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        order = torch.randperm(n, device=device, generator=generator)
        for first in range(0, n - args.batch_size + 1, args.batch_size):
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
            fraction = elapsed / seconds
            for group in optimizer.param_groups:
                group["lr"] = peak_lr * warmup_cosine(int(fraction * 10_000), 500, 10_000, 0.001)
            batch = train[order[first : first + args.batch_size]].float().div(255).unsqueeze(1)
            views = [(gpu_views(batch, generator) - mean) / std for _ in range(2)]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                _, z1 = model(views[0].contiguous(memory_format=torch.channels_last))
                _, z2 = model(views[1].contiguous(memory_format=torch.channels_last))
            loss = loss_fn(z1, z2)[0]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss = loss.detach()
            steps += 1
            if steps % 100 == 0:
                losses.append(float(loss))
                print(
                    f"  {method} seed {seed}: step {steps}, {elapsed:.0f} s, loss {losses[-1]:.4f}",
                    flush=True,
                )
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    if not math.isfinite(float(loss)):
        raise SystemExit(f"{method} seed {seed}: the loss is {float(loss)} at step {steps}")
    figures = {
        "steps": float(steps),
        "train_seconds": wall,
        "pairs_per_second": steps * args.batch_size / wall,
        "final_loss": float(loss),
        "loss_every_100_steps": losses,
        "mean": mean,
        "std": std,
    }
    return model.backbone, figures


def evaluate(
    backbone: torch.nn.Module,
    data: dict[str, torch.Tensor],
    mean: float,
    std: float,
) -> dict[str, float]:
    """kNN (k=20, T=0.07) and linear top-1 on the test split, as the evaluate pipeline does."""
    train_x = features(backbone, data["train_x"], mean, std)
    test_x = features(backbone, data["test_x"], mean, std)
    train_y, test_y = data["train_y"].cpu(), data["test_y"].cpu()
    knn = knn_accuracy(train_x, train_y, test_x, test_y, k=20, temperature=0.07, ks=(1,))
    linear = linear_probe(train_x, train_y, test_x, test_y, ks=(1,))
    return {
        "knn_top1": 100 * knn[1],
        "linear_top1": 100 * linear[1],
        "backbone_effective_rank": effective_rank(test_x),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--seconds", type=float, default=180.0, help="pretraining wall time per run")
    parser.add_argument("--methods", nargs="+", default=["imsvd", "vicreg"], choices=sorted(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--projector", default="1024-1024-1024")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--base-lr", type=float, default=0.4)
    parser.add_argument("--max-train", type=int, default=None, help="first N training images (smoke runs)")
    parser.add_argument("--max-test", type=int, default=None, help="first N test images (smoke runs)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None, help="write every figure here as JSON")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    train_x, train_y = load_split(args.data, "train")
    test_x, test_y = load_split(args.data, "t10k")
    data = {
        "train_x": torch.from_numpy(train_x[: args.max_train].copy()).to(device),
        "train_y": torch.from_numpy(train_y[: args.max_train].copy()),
        "test_x": torch.from_numpy(test_x[: args.max_test].copy()).to(device),
        "test_y": torch.from_numpy(test_y[: args.max_test].copy()),
    }
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"{len(data['train_x']):,} train / {len(data['test_x']):,} test images on {name}; "
        f"{args.seconds:g} s of pretraining per run, width {args.width:g}, batch {args.batch_size}, "
        f"{SIZE}x{SIZE} views",
        flush=True,
    )
    rows: list[dict[str, object]] = []
    for method in args.methods:
        for seed in args.seeds:
            backbone, figures = train_one(method, seed, args.seconds, data["train_x"], args)
            figures.update(evaluate(backbone, data, figures["mean"], figures["std"]))
            rows.append({"method": method, "seed": seed, **figures})
            print(
                f"{method} seed {seed}: {figures['steps']:.0f} steps in {figures['train_seconds']:.0f} s "
                f"({figures['pairs_per_second']:.0f} pairs/s), linear {figures['linear_top1']:.2f}, "
                f"kNN {figures['knn_top1']:.2f}",
                flush=True,
            )
            if args.out:  # row by row, so a run cut short keeps what it finished
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(
                    json.dumps(
                        {
                            "device": name,
                            "args": vars(args) | {"data": str(args.data), "out": str(args.out)},
                            "rows": rows,
                        },
                        indent=1,
                    )
                )
    print("| method | seeds | steps | pairs/s | linear top-1 | kNN top-1 |")
    print("|---|---|---|---|---|---|")
    for method in args.methods:
        mine = [r for r in rows if r["method"] == method]

        def stat(key: str, rows: list[dict[str, object]] = mine) -> str:
            values = np.array([float(r[key]) for r in rows])  # type: ignore[arg-type]
            return f"{values.mean():.2f}" + (f" ± {values.std(ddof=1):.2f}" if len(values) > 1 else "")

        print(
            f"| {method} | {len(mine)} | {stat('steps')} | {stat('pairs_per_second')} | "
            f"{stat('linear_top1')} | {stat('knn_top1')} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
