"""Pretraining on tiny real data: the loss falls, checkpoints resume only when they should,
a non-finite loss stops the run, and untrusted checkpoints are refused."""

from __future__ import annotations

import dataclasses
import functools
import gc
import logging
import math
import os
import pickle
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from conftest import tiny_pretrain
from imsvd.augment import ShardPairs, build_view_cache, pair_dataset
from imsvd.checkpoints import encoder_payload, load_encoder, load_weights
from imsvd.config import AugmentConfig, IMSVDConfig, PretrainConfig
from imsvd.errors import ConfigError, TrainingError, UntrustedFileError
from imsvd.optim import LARS, warmup_cosine
from imsvd.preprocess import channel_stats
from imsvd.training import LAST, RunIdentity, pretrain
from imsvd.training.loop import StoreLoader, make_loader

STEPS_PER_EPOCH = 4  # 256 images, batch 64


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    return (load_digits().images * (255 / 16)).round().astype(np.uint8)[..., None][:256]


@pytest.fixture(scope="module")
def pairs(digits, tmp_path_factory):
    aug = AugmentConfig(size=8, views=4, cache_dir=str(tmp_path_factory.mktemp("views")))
    build_view_cache(digits, "digits-fp", aug, progress=False)
    dataset, source = pair_dataset(digits, "digits-fp", aug, use_cache=True, seed=0)
    assert source == "cache"
    return dataset


def tiny(tmp_path: Path, **overrides) -> PretrainConfig:
    values = dict(projector="128-128", epochs=2, batch_size=64, base_lr=1.6, warmup_epochs=0.0, resume=True)
    return tiny_pretrain(tmp_path / "checkpoints", **{**values, **overrides})


def run(pairs, digits, cfg, fingerprint="digits-fp"):
    mean, std = channel_stats(digits)
    return pretrain(pairs, "cache", 1, mean, std, cfg, RunIdentity.of(cfg, AugmentConfig(), fingerprint))


def test_loss_falls_and_every_term_is_logged(pairs, digits, tmp_path):
    result = run(pairs, digits, tiny(tmp_path, epochs=6))
    history = result.history
    assert {"total", "diagonal", "off_block", "invariance", "lr", "images_per_second"} <= set(history.columns)
    per_epoch = history.groupby("epoch")["total"].mean()
    assert len(per_epoch) == 6
    assert per_epoch.iloc[-1] < per_epoch.iloc[0] - 0.05
    np.testing.assert_allclose(
        history["total"], history["diagonal"] + history["off_block"] + history["invariance"], rtol=1e-5
    )
    assert (history["images_per_second"] > 0).all()
    assert (Path(tmp_path / "checkpoints") / LAST).is_file()
    assert (Path(tmp_path / "checkpoints") / "best.ckpt").is_file()


def test_rerun_resumes_from_last_checkpoint(pairs, digits, tmp_path, caplog):
    first = run(pairs, digits, tiny(tmp_path, epochs=1))
    assert first.resumed_from_epoch is None
    caplog.set_level(logging.INFO, logger="imsvd.training")
    second = run(pairs, digits, tiny(tmp_path, epochs=3))
    assert second.resumed_from_epoch == 1
    assert "resuming from" in caplog.text and "at epoch 1" in caplog.text
    # the history spans the epochs before and after the interruption, with every step once
    assert second.history["step"].tolist() == list(range(1, 3 * STEPS_PER_EPOCH + 1))
    assert int(load_weights(Path(tmp_path / "checkpoints") / LAST)["global_step"]) == 3 * STEPS_PER_EPOCH


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"imsvd": IMSVDConfig(bin_size=16, temperature=0.5)}, "different parameters"),
        ({"resume": False}, "pretrain.resume=false"),
    ],
)
def test_resume_only_with_same_parameters(pairs, digits, tmp_path, caplog, change, reason):
    run(pairs, digits, tiny(tmp_path, epochs=1))
    caplog.set_level(logging.INFO, logger="imsvd.training")
    again = run(pairs, digits, tiny(tmp_path, epochs=1, **change))
    assert again.resumed_from_epoch is None
    assert reason in caplog.text


def test_resume_only_with_same_data(pairs, digits, tmp_path, caplog):
    run(pairs, digits, tiny(tmp_path, epochs=1))
    caplog.set_level(logging.INFO, logger="imsvd.training")
    again = run(pairs, digits, tiny(tmp_path, epochs=1), fingerprint="other-data")
    assert again.resumed_from_epoch is None
    assert "different data" in caplog.text


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(pairs, digits, tmp_path):
    run(pairs, digits, tiny(tmp_path, epochs=1))
    last = Path(tmp_path / "checkpoints") / LAST
    before = last.read_bytes()
    with pytest.raises(TrainingError) as info:
        run(pairs, digits, tiny(tmp_path, epochs=2, base_lr=1e30))
    message = str(info.value)
    assert "step" in message and "pretrain.base_lr" in message
    assert last.read_bytes() == before


class _Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_checkpoint_with_pickled_code_is_refused(pairs, digits, tmp_path):
    marker = tmp_path / "code-ran"
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    with open(folder / LAST, "wb") as handle:
        torch.save({"epoch": 0, "evil": _Payload(str(marker))}, handle, pickle_module=pickle)
    with pytest.raises(UntrustedFileError, match="last.ckpt"):
        run(pairs, digits, tiny(tmp_path, epochs=1))
    assert not marker.exists()


def _payload(result, cfg, digits, extra):
    mean, std = channel_stats(digits)
    return encoder_payload(result.module.encoder, cfg, 1, mean, std, image_size=8, extra=extra)


def test_encoder_payload_round_trips_with_weights_only(pairs, digits, tmp_path):
    cfg = tiny(tmp_path, epochs=1)
    result = run(pairs, digits, cfg)
    payload = _payload(result, cfg, digits, {"data_fingerprint": "digits-fp"})
    path = tmp_path / "encoder.pt"
    torch.save(payload, path)
    stored = load_weights(path)
    loaded = load_encoder(stored)
    x = torch.randn(5, 1, 8, 8)
    result.module.encoder.eval()
    torch.testing.assert_close(loaded.encoder(x)[1], result.module.encoder(x)[1])
    assert loaded.config == cfg  # the typed parameters, as trained
    assert (loaded.in_channels, loaded.image_size) == (1, 8)
    assert loaded.mean == pytest.approx(channel_stats(digits)[0])
    assert stored["data_fingerprint"] == "digits-fp"


def test_encoder_file_from_before_the_method_sections_still_loads(pairs, digits, tmp_path):
    cfg = tiny(tmp_path, epochs=1)
    payload = _payload(run(pairs, digits, cfg), cfg, digits, {})
    legacy = {
        k: v for k, v in payload["config"].items() if k not in ("imsvd", "vicreg", "simclr", "barlow_twins")
    }
    legacy.update(bin_size=16, temperature=1.0)
    assert load_encoder({**payload, "config": legacy}).config.imsvd == IMSVDConfig(bin_size=16)


def test_encoder_from_another_architecture_is_refused(pairs, digits, tmp_path):
    cfg = tiny(tmp_path, epochs=1)
    payload = _payload(run(pairs, digits, cfg), cfg, digits, {})
    payload["config"] = dataclasses.asdict(tiny(tmp_path, width=0.25))
    with pytest.raises(UntrustedFileError, match="do not match the architecture"):
        load_encoder(payload)


def test_warmup_then_cosine_to_the_floor():
    assert warmup_cosine(0, 10, 100, 0.001) == 0.0
    assert warmup_cosine(5, 10, 100, 0.001) == pytest.approx(0.5)
    assert warmup_cosine(10, 10, 100, 0.001) == pytest.approx(1.0)
    assert warmup_cosine(55, 10, 100, 0.001) == pytest.approx(0.5 + 0.5 * 0.001)
    assert warmup_cosine(100, 10, 100, 0.001) == pytest.approx(0.001)
    values = [warmup_cosine(s, 10, 100, 0.001) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_lars_skips_decay_and_adaptation_for_biases_and_norms():
    weight = torch.nn.Parameter(torch.ones(3, 3))
    bias = torch.nn.Parameter(torch.ones(3))
    optimizer = LARS([weight, bias], lr=1.0, weight_decay=0.5, momentum=0.0, eta=0.001)
    weight.grad = torch.ones(3, 3)
    bias.grad = torch.ones(3)
    optimizer.step()
    torch.testing.assert_close(bias.detach(), torch.zeros(3))  # plain SGD step: 1 - 1*1
    # weight: trust ratio eta*|w|/|g + wd*w| scales the step far below the raw gradient
    expected = 1.0 - 0.001 * 3.0 / (1.5 * 3.0) * 1.5
    torch.testing.assert_close(weight.detach(), torch.full((3, 3), expected))
    assert math.isfinite(float(weight.sum()))


def test_each_epoch_draws_a_fresh_pair_of_views():
    import lightning as L
    from torch.utils.data import DataLoader

    from imsvd.augment import CachedPairDataset
    from imsvd.training.callbacks import SetEpoch

    views = np.random.default_rng(0).integers(0, 255, (8, 6, 1, 4, 4), dtype=np.uint8)
    seen: list[torch.Tensor] = []

    class Recorder(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch, batch_idx):
            seen.append(torch.stack(batch))
            return self.w.sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    trainer = L.Trainer(
        max_epochs=2,
        callbacks=[SetEpoch()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Recorder(), DataLoader(CachedPairDataset(views, seed=0), batch_size=8, shuffle=False))
    assert len(seen) == 2
    assert not torch.equal(seen[0], seen[1])


def test_last_checkpoint_is_written_every_epoch_even_without_improvement(pairs, digits, tmp_path):
    # lr ~ 0: the loss only wanders with the fresh view pairs, so some epochs do not improve.
    run(pairs, digits, tiny(tmp_path, epochs=4, base_lr=1e-9))
    last = load_weights(Path(tmp_path / "checkpoints") / LAST)
    assert int(last["global_step"]) == 4 * STEPS_PER_EPOCH
    assert int(last["epoch"]) == 3


SIGTERM_SCRIPT = """
import sys
import numpy as np
from sklearn.datasets import load_digits
from imsvd.augment import build_view_cache, pair_dataset
from imsvd.config import AugmentConfig, IMSVDConfig, PretrainConfig
from imsvd.preprocess import channel_stats
from imsvd.training import RunIdentity, pretrain

folder = sys.argv[1]
images = (load_digits().images * (255 / 16)).round().astype(np.uint8)[..., None][:256]
aug = AugmentConfig(size=8, views=4, cache_dir=folder + "/views")
build_view_cache(images, "fp", aug, progress=False)
dataset, _ = pair_dataset(images, "fp", aug, use_cache=True, seed=0)
cfg = PretrainConfig(width=0.125, projector="128-128", imsvd=IMSVDConfig(bin_size=16), epochs=500,
                     batch_size=64, checkpoint_dir=folder + "/checkpoints", accelerator="cpu", devices="1")
pretrain(dataset, "cache", 1, *channel_stats(images), cfg, RunIdentity.of(cfg, aug, "fp"))
"""


@pytest.mark.slow
def test_sigterm_fails_the_run_and_saves_the_state(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    process = subprocess.Popen(
        [sys.executable, "-c", SIGTERM_SCRIPT, str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    last = tmp_path / "checkpoints" / LAST
    deadline = time.monotonic() + 300
    while not last.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    assert last.exists(), "no checkpoint before the deadline"
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=300)
    # Lightning alone would exit 0 here (SystemExit(None)); the product fails the run.
    assert process.returncode != 0, output[-2000:]
    assert "terminated (SIGTERM)" in output
    assert int(load_weights(tmp_path / "checkpoints" / "interrupted.ckpt")["global_step"]) >= STEPS_PER_EPOCH


def test_native_bf16_is_read_from_the_cpu_flags():
    from imsvd.training.loop import cpu_has_native_bf16

    zen4 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512vl\n"
    sapphire = "flags\t\t: fpu avx512f amx_bf16 amx_tile\n"
    older = "flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512vl\n"
    assert cpu_has_native_bf16(zen4) and cpu_has_native_bf16(sapphire)
    assert not cpu_has_native_bf16(older) and not cpu_has_native_bf16("")


def test_auto_precision_on_a_cpu_follows_its_bf16_support(tmp_path):
    from imsvd.training import resolve_precision
    from imsvd.training.loop import cpu_has_native_bf16

    auto = tiny(tmp_path, accelerator="cpu")
    assert resolve_precision(auto) == ("bf16-mixed" if cpu_has_native_bf16() else "32-true")
    assert resolve_precision(tiny(tmp_path, precision="32-true")) == "32-true"


def test_bf16_channels_last_training_keeps_float32_weights_in_nhwc(pairs, digits, tmp_path):
    cfg = tiny(tmp_path, epochs=2, precision="bf16-mixed", channels_last=True)
    result = run(pairs, digits, cfg)
    history = result.history
    per_epoch = history.groupby("epoch")["total"].mean()
    assert np.isfinite(history["total"]).all() and per_epoch.iloc[-1] < per_epoch.iloc[0]
    assert ((history["data_wait_share"] >= 0) & (history["data_wait_share"] <= 1)).all()
    conv = result.module.encoder.backbone.conv1.weight
    assert conv.dtype == torch.float32  # mixed precision: bf16 compute, float32 weights
    assert conv.is_contiguous(memory_format=torch.channels_last)
    plain = run(pairs, digits, tiny(tmp_path / "plain", epochs=1, precision="32-true", channels_last=False))
    assert plain.module.encoder.backbone.conv1.weight.is_contiguous()


def test_online_knn_monitor_reports_on_training_images_at_its_interval(pairs, digits, tmp_path, caplog):
    from imsvd.config import MonitorConfig
    from imsvd.training import MonitorData

    labels = load_digits().target[: len(digits)]
    cfg = tiny(tmp_path, epochs=5, monitor=MonitorConfig(every_n_steps=8, images=200))
    mean, std = channel_stats(digits)
    caplog.set_level(logging.INFO, logger="imsvd.training")
    result = pretrain(
        pairs, "cache", 1, mean, std, cfg, RunIdentity.of(cfg, AugmentConfig(), "digits-fp"),
        monitor_data=MonitorData(digits, labels, 8),
    )  # fmt: skip
    checked = result.history.dropna(subset=["monitor_knn_top1"])
    # every 8 steps (4 per epoch): after epochs 2 and 4, and at the last epoch, 5
    assert checked["step"].tolist() == [2.0 * STEPS_PER_EPOCH, 4.0 * STEPS_PER_EPOCH, 5.0 * STEPS_PER_EPOCH]
    assert ((checked["monitor_knn_top1"] >= 0) & (checked["monitor_knn_top1"] <= 100)).all()
    assert checked["monitor_knn_top1"].iloc[-1] > 20  # ten classes: far above chance even this early
    assert "online kNN top-1" in caplog.text and "online kNN monitor:" in caplog.text
    off = pretrain(
        pairs, "cache", 1, mean, std, tiny(tmp_path / "off", epochs=1, monitor=MonitorConfig(every_n_steps=0)),
        RunIdentity.of(cfg, AugmentConfig(), "digits-fp"), monitor_data=MonitorData(digits, labels, 8),
    )  # fmt: skip
    assert "monitor_knn_top1" not in off.history.columns


def test_the_first_ctrl_c_asks_to_stop_and_the_second_stops_at_once():
    """Real SIGINTs to this process: the first only sets the request, which the next step's
    start turns into Lightning's KeyboardInterrupt; the second raises where it lands."""
    from imsvd.training.callbacks import SaveOnInterrupt

    original = signal.signal(signal.SIGINT, signal.default_int_handler)  # what `kedro run` has
    callback = SaveOnInterrupt(Path("unused"))
    trainer: Any = None
    try:
        callback.on_fit_start(trainer, trainer)
        callback.on_train_batch_start(trainer, trainer, None, 0)  # nothing asked yet
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert callback.requested
        with pytest.raises(KeyboardInterrupt):
            callback.on_train_batch_start(trainer, trainer, None, 1)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        callback.teardown(trainer, trainer, "fit")
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, original)


@pytest.mark.slow
def test_training_streams_a_sharded_view_cache(digits, tmp_path):
    """A sharded cache trains through litdata's loader, in two DataLoader worker processes:
    the same steps per epoch as the array, and the loss falls."""
    histories = {}
    for name, line, workers in (("array", 2048.0, 0), ("shards", 0.0, 2)):
        aug = AugmentConfig(size=8, views=4, cache_dir=str(tmp_path / name / "views"), max_array_mb=line)
        assert build_view_cache(digits, "digits-fp", aug, progress=False).manifest["format"] == name
        dataset, source = pair_dataset(digits, "digits-fp", aug, use_cache=True, seed=0)
        assert source == "cache" and isinstance(dataset, ShardPairs) == (name == "shards")
        # 5 epochs: at 3 the fall was 0.04-0.10 depending on the torch build's rounding.
        cfg = tiny(tmp_path / name, epochs=5, num_workers=workers, resume=False)
        histories[name] = run(dataset, digits, cfg).history
        assert gc.get_freeze_count() == 0  # the parent's objects are back with its collector
    for history in histories.values():
        assert history["step"].tolist() == list(range(1, 5 * STEPS_PER_EPOCH + 1))
        assert np.isfinite(history["total"]).all()
    per_epoch = histories["shards"].groupby("epoch")["total"].mean()
    assert per_epoch.iloc[-1] < per_epoch.iloc[0] - 0.05


def _note_frozen_objects(folder: Path, worker_id: int) -> None:
    (folder / f"worker{worker_id}").write_text(str(gc.get_freeze_count()))


@pytest.mark.parametrize("name, line", [("array", 2048.0), ("shards", 0.0)])
def test_loader_workers_are_forked_with_the_parents_objects_frozen(digits, tmp_path, name, line):
    """Both loaders (torch's for an in-memory cache, litdata's for shards) freeze the
    training process's objects before they fork their workers, so a worker's collections
    do not copy the pages those objects sit on."""
    aug = AugmentConfig(size=8, views=4, cache_dir=str(tmp_path / "views"), max_array_mb=line)
    assert build_view_cache(digits, "digits-fp", aug, progress=False).manifest["format"] == name
    dataset, _ = pair_dataset(digits, "digits-fp", aug, use_cache=True, seed=0)
    loader = make_loader(dataset, tiny(tmp_path, num_workers=1))
    if isinstance(loader, StoreLoader):
        loader = loader.train_dataloader()
    loader.worker_init_fn = functools.partial(_note_frozen_objects, tmp_path)
    tables = [{"path": f"file-{i}"} for i in range(50_000)]  # like a store's per-file records
    assert gc.get_freeze_count() == 0
    try:
        next(iter(loader))
    finally:
        gc.unfreeze()
    assert int((tmp_path / "worker0").read_text()) > len(tables)


def test_mid_epoch_checkpoints_are_refused_for_array_views(pairs, digits, tmp_path):
    """Only litdata's loaders (image store, sharded cache) have a state to resume mid-epoch."""
    cfg = tiny(tmp_path, epochs=1, checkpoint_every_n_steps=2)
    with pytest.raises(
        ConfigError, match=r"pretrain\.checkpoint_every_n_steps=2 needs views that litdata streams"
    ):
        run(pairs, digits, cfg)
    assert not (tmp_path / "checkpoints").exists()  # refused before anything was written
