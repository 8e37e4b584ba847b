"""Lightning callbacks of the pretraining loop: history, progress, interruption, epochs."""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from imsvd.config import MonitorConfig
from imsvd.data import Images, take
from imsvd.inference import extract_features
from imsvd.metrics import knn_accuracy
from imsvd.preprocess import at_most
from imsvd.training.resume import INTERRUPTED

log = logging.getLogger(__name__)


class History(Callback):
    """Per-step loss terms, lr and throughput, kept in the checkpoint so a resumed run's
    curve includes the epochs before the interruption.

    ``images_per_second`` counts pairs of views over the whole time from one step's end to
    the next one's; ``data_wait_share`` is the part of it before the step began (loading
    and moving the batch, and Lightning's own work between steps).
    """

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []
        self._last: float | None = None
        self._wait = 0.0

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        self._wait = 0.0 if self._last is None else now - self._last
        if self._last is None:
            self._last = now

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        elapsed = max(now - (self._last or now), 1e-9)
        self._last = now
        images = batch[0].shape[0] * trainer.world_size
        ips = images / elapsed
        pl_module.log("train/images_per_second", ips, on_step=True, on_epoch=False, batch_size=images)
        row = {
            "epoch": float(trainer.current_epoch),
            "step": float(trainer.global_step),
            "images_per_second": ips,
            "data_wait_share": min(1.0, self._wait / elapsed),
        }
        row["lr"] = float(trainer.optimizers[0].param_groups[0]["lr"])
        for key, value in trainer.callback_metrics.items():
            if key.startswith("train/") and key.endswith("_step"):
                row[key[len("train/") : -len("_step")]] = float(value)
        self.rows.append(row)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last = None  # the gap between epochs is not throughput

    def state_dict(self) -> dict[str, Any]:
        keys = sorted({k for row in self.rows for k in row})
        return {"keys": keys, "values": [[row.get(k, math.nan) for k in keys] for row in self.rows]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        keys = state_dict.get("keys", [])
        self.rows = [dict(zip(keys, values, strict=True)) for values in state_dict.get("values", [])]


class SaveOnInterrupt(Callback):
    """Ctrl-C (SIGINT) or SIGTERM: save the state reached to ``interrupted.ckpt`` before exiting.

    ``last.ckpt`` stays the last complete epoch, which a rerun resumes from, so a resumed
    run makes exactly as many optimiser steps as an uninterrupted one.

    The first Ctrl-C only asks to stop: the step under way finishes and the stop happens
    before the next one, where Lightning itself acts on SIGTERM. Python's own Ctrl-C raises
    wherever the main thread happens to be, and landing inside a write to MLflow's SQLite
    store it could leave that store's connection unusable, so that the run could no longer be
    marked FAILED. A second Ctrl-C stops at once, for a step that hangs.
    """

    def __init__(self, directory: Path) -> None:
        self.path = directory / INTERRUPTED
        self.requested = False
        self._previous: Any = None

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self.requested:  # the second Ctrl-C
            raise KeyboardInterrupt
        self.requested = True
        log.warning("Ctrl-C: stopping after this step (press Ctrl-C again to stop at once)")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.requested = False
        # Only Python's default handler is replaced: an ignored SIGINT (a background job) or
        # the handler of a program that embeds the run stays as it is.
        in_main = threading.current_thread() is threading.main_thread()
        if in_main and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.requested:
            raise KeyboardInterrupt  # Lightning's Ctrl-C path: on_exception, teardown, exit 1

    def _restore(self) -> None:
        # Only while ours is still installed: on Ctrl-C Lightning ignores SIGINT for its
        # shutdown, and that is left to it.
        if self._previous is not None and signal.getsignal(signal.SIGINT) == self._on_sigint:
            signal.signal(signal.SIGINT, self._previous)
        self._previous = None

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore()
        if isinstance(exception, (KeyboardInterrupt, SIGTERMException)) and trainer.is_global_zero:
            trainer.save_checkpoint(self.path)
            log.warning(
                "interrupted at step %d (epoch %d): state saved to %s; rerun to resume from the last complete epoch",
                trainer.global_step,
                trainer.current_epoch,
                self.path,
            )


def ignore_interrupts(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: a terminal's Ctrl-C reaches the whole process group,
    and a worker that took it would exit, turning the graceful stop above into a
    "worker exited unexpectedly" error. The main process stops the workers itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class PlainProgress(Callback):
    """Periodic log lines for non-interactive runs (CI, ``dvc repro``), where a progress
    bar would only fill the log with carriage returns."""

    def __init__(self, every_n_steps: int) -> None:
        self.every = every_n_steps

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step % self.every == 0 and trainer.is_global_zero:
            loss = trainer.callback_metrics.get("train/total_step")
            log.info(
                "epoch %d/%d step %d loss %.4f",
                trainer.current_epoch + 1,
                trainer.max_epochs,
                trainer.global_step,
                float(loss) if loss is not None else math.nan,
            )

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            loss = trainer.callback_metrics.get("train/total_epoch")
            log.info(
                "epoch %d/%d done: mean loss %.4f",
                trainer.current_epoch + 1,
                trainer.max_epochs,
                float(loss) if loss is not None else math.nan,
            )


class SetEpoch(Callback):
    """A fresh pair of views per image each epoch: the pair datasets draw from (seed, epoch)."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loader = trainer.train_dataloader
        dataset = getattr(loader, "dataset", None)
        if dataset is not None and hasattr(dataset, "set_epoch"):
            dataset.set_epoch(trainer.current_epoch)


class OnlineKNN(Callback):
    """kNN top-1 of the frozen current backbone on a fixed labelled slice of the training
    images, so a user sees when the encoder stops improving (lightly's and solo-learn's
    online monitors do the same; theirs need a validation loader, this one a slice).

    The value goes to the logger as ``monitor/knn_top1`` (percent) and into the history
    row of that step as ``monitor_knn_top1``.

    Args:
        images: (N, H, W, C) uint8 labelled training images.
        labels: (N,) their labels (>= 0).
        size, mean, std: the encoder's input side and normalisation.
        cfg: the monitor's settings.
        history: the run's history, whose last row receives the value.
        seed: picks the slice and splits it into bank and queries.
    """

    def __init__(
        self,
        images: Images,
        labels: np.ndarray,
        size: int,
        mean: Any,
        std: Any,
        cfg: MonitorConfig,
        history: History,
        seed: int,
    ) -> None:
        order = np.random.default_rng(seed).permutation(len(images))[: cfg.images]
        self.images = at_most(take(images, order), size)  # photos are kept at the encoder's input size
        self.labels = np.asarray(labels)[order]
        self.bank = max(1, int(round(0.8 * len(order))))
        self.size, self.mean, self.std = size, mean, std
        self.cfg = cfg
        self.history = history
        self._last_step = 0
        self.seconds = 0.0

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        last_epoch = trainer.current_epoch + 1 >= (trainer.max_epochs or 0)
        if trainer.global_step - self._last_step < self.cfg.every_n_steps and not last_epoch:
            return
        self._last_step = trainer.global_step
        start = time.perf_counter()
        encoder: torch.nn.Module = pl_module.encoder  # type: ignore[assignment]
        features = extract_features(encoder, self.images, self.size, self.mean, self.std).backbone
        encoder.train()
        b = self.bank
        top1 = knn_accuracy(
            features[:b],
            self.labels[:b],
            features[b:],
            self.labels[b:],
            k=self.cfg.knn_k,
            temperature=self.cfg.knn_temperature,
            ks=(1,),
        )[1]
        self.seconds += time.perf_counter() - start
        pl_module.log("monitor/knn_top1", 100.0 * top1, on_step=False, on_epoch=True)
        if self.history.rows:
            self.history.rows[-1]["monitor_knn_top1"] = 100.0 * top1
        if trainer.is_global_zero:
            log.info(
                "epoch %d: online kNN top-1 %.1f %% on %d training images (%.2f s)",
                trainer.current_epoch + 1,
                100.0 * top1,
                len(self.labels) - b,
                time.perf_counter() - start,
            )
