"""Two CPU processes (gloo, spawned by Lightning's DDP) give the loss and the gradient
step of one process on the concatenated batch: P is computed on the batch gathered from
every rank with gradients flowing back, and BatchNorm statistics are synchronised."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from conftest import tiny_pretrain
from imsvd.augment import ShardPairs, build_view_cache, pair_dataset
from imsvd.checkpoints import load_weights
from imsvd.config import AugmentConfig
from imsvd.preprocess import channel_stats
from imsvd.training import RunIdentity, pretrain

pytestmark = pytest.mark.slow


def _train(tmp_path, devices: str, method: str = "imsvd"):
    images = (load_digits().images * (255 / 16)).round().astype(np.uint8)[..., None][:16]
    aug = AugmentConfig(size=8, views=4, cache_dir=str(tmp_path / "views"))
    build_view_cache(images, "fp", aug, progress=False)
    dataset, _ = pair_dataset(images, "fp", aug, use_cache=True, seed=0)
    cfg = tiny_pretrain(
        tmp_path / f"ckpt-{devices}",
        method=method,
        base_lr=25.6,  # lr 1.6: a visible step
        weight_decay=0.0,
        warmup_epochs=0.0,
        device_flip=False,
        devices=devices,
        # float32: the equality below is to float rounding; bf16 autocast (auto on a CPU with
        # native bf16) rounds each rank's half batch differently from the whole.
        precision="32-true",
    )
    mean, std = channel_stats(images)
    identity = RunIdentity.of(cfg, aug, "fp")
    torch.manual_seed(0)
    result = pretrain(dataset, "cache", 1, mean, std, cfg, identity)
    return result


@pytest.mark.parametrize("method", ["imsvd", "barlow_twins", "vicreg", "simclr"])
def test_two_processes_equal_one_process_on_the_whole_batch(tmp_path, method):
    single = _train(tmp_path / "one", "1", method)
    double = _train(tmp_path / "two", "2", method)
    # one optimiser step over the same 16 images in both runs
    assert single.history["step"].tolist() == [1.0]
    assert double.history["step"].tolist() == [1.0]
    np.testing.assert_allclose(double.history["total"], single.history["total"], rtol=1e-5)

    # The same initial weights (same seed) and one SGD step: equal weights afterwards
    # mean equal gradients. Compare the updates so the test is not dominated by the
    # (identical) starting point.
    torch.manual_seed(0)
    start = copy.deepcopy(_initial_encoder(single))
    one = single.module.encoder.state_dict()
    two = double.module.encoder.state_dict()
    deltas = {
        name: (one[name] - before, two[name] - before)
        for name, before in start.items()
        if before.is_floating_point()
    }
    # Tolerance relative to the largest update: a Linear bias before BatchNorm has a true
    # gradient of zero, so its "update" is rounding noise on either side.
    largest = max(float(d1.abs().max()) for d1, _ in deltas.values())
    assert largest > 1e-3
    for name, (delta_one, delta_two) in deltas.items():
        torch.testing.assert_close(delta_two, delta_one, rtol=1e-3, atol=1e-4 * largest, msg=name)
    compared = len(deltas)
    assert compared > 10


def _initial_encoder(result):
    """Rebuild the encoder exactly as pretrain() did before training (same seed)."""
    import lightning as L

    from imsvd.models import build_encoder

    cfg = result.module.cfg
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    return build_encoder(cfg.backbone, cfg.width, cfg.projector_dims, 1).state_dict()


def test_two_ddp_processes_each_stream_their_own_half_of_a_sharded_view_cache(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (64, 10, 10, 1), dtype=np.uint8)
    aug = AugmentConfig(size=8, views=4, cache_dir=str(tmp_path / "views"), max_array_mb=0)
    assert build_view_cache(images, "fp", aug, progress=False).manifest["format"] == "shards"
    dataset, source = pair_dataset(images, "fp", aug, use_cache=True, seed=0)
    assert source == "cache" and isinstance(dataset, ShardPairs)
    cfg = tiny_pretrain(tmp_path / "ckpt", devices="2")
    result = pretrain(dataset, "cache", 1, [0.5], [0.25], cfg, RunIdentity.of(cfg, aug, "fp"))
    assert result.history["step"].tolist() == [1.0, 2.0, 3.0, 4.0]  # 64 pairs in global batches of 16
    loader = load_weights(tmp_path / "ckpt" / "last.ckpt")["loops"]["fit_loop"]["state_dict"][
        "combined_loader"
    ][0]
    # Rank 0 (the one that checkpoints) saw half of the epoch, in batches of 8, though the
    # whole cache is one chunk: litdata splits a chunk's items between the ranks.
    assert loader["dataset"]["world_size"] == 2
    assert loader["num_samples_yielded"] == 32 and loader["dataset"]["batch_size"] == 8
