"""Redundancy of a trained encoder where it means something for IMSVD, next to a random
encoder of the same shape: the projector outputs (what the loss sees before the softmax),
the soft codes (what the loss is computed on: the softmax ignores a shift of a block's
logits, so the outputs' correlation and rank can mislead), and the backbone features
(what downstream tasks use). Test split only.

    python bench/redundancy_report.py data/06_models/encoder.pt --data fashion_mnist
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from imsvd.checkpoints import load_encoder, load_weights
from imsvd.data import TEST
from imsvd.inference import extract_features
from imsvd.losses import joint_distribution, soft_discretize
from imsvd.metrics import effective_rank, mean_abs_off_diagonal_correlation, off_block_mutual_information
from imsvd.models import build_encoder
from imsvd.sources import load_digits, load_fashion_mnist


def report(features, bin_size: int, temperature: float) -> dict[str, float]:
    z = features.projector
    codes = soft_discretize(torch.from_numpy(z), bin_size, temperature).reshape(len(z), -1)
    return {
        "projector |corr|": mean_abs_off_diagonal_correlation(z),
        "projector rank": effective_rank(z),
        "codes |corr| between blocks": mean_abs_off_diagonal_correlation(codes, block=bin_size),
        "codes rank": effective_rank(codes),
        "codes off-block MI (nats)": off_block_mutual_information(
            joint_distribution(codes, codes).numpy(), bin_size, seed=0
        ),
        "backbone |corr|": mean_abs_off_diagonal_correlation(features.backbone),
        "backbone rank": effective_rank(features.backbone),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("encoder", type=Path)
    parser.add_argument("--data", choices=("digits", "fashion_mnist"), default="digits")
    parser.add_argument("--data-path", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    args = parser.parse_args()

    data = load_fashion_mnist(args.data_path) if args.data == "fashion_mnist" else load_digits(0.25, 0)
    images = data.split(TEST).images
    loaded = load_encoder(load_weights(args.encoder))
    cfg = loaded.config
    torch.manual_seed(0)
    random = build_encoder(cfg.backbone, cfg.width, cfg.projector_dims, loaded.in_channels)
    rows = {}
    for name, model in (("trained", loaded.encoder), ("random", random)):
        features = extract_features(model, images, loaded.image_size, loaded.mean, loaded.std)
        rows[name] = report(features, cfg.imsvd.bin_size, cfg.imsvd.temperature)
    print(f"{'':30s} {'trained':>10s} {'random':>10s}")
    for key in rows["trained"]:
        print(f"{key:30s} {rows['trained'][key]:10.3f} {rows['random'][key]:10.3f}")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
