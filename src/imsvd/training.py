"""Self-supervised pretraining with PyTorch Lightning (CPU, one GPU, or DDP).

The Lightning module stays small: it builds the encoder, normalises the uint8 views on
the device, gathers the projector outputs across ranks (with gradients) and hands them
to a pure loss from :mod:`imsvd.losses`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor
from torch.utils.data import DataLoader

from imsvd.augment import normalize, random_hflip
from imsvd.checkpoints import AtomicCheckpointIO, load_weights
from imsvd.config import PretrainConfig
from imsvd.distributed import SyncBatchNormPlugin
from imsvd.errors import TrainingError, UntrustedFileError
from imsvd.losses import loss_for_method
from imsvd.models import Encoder, build_encoder
from imsvd.optim import build_optimizer, warmup_cosine

log = logging.getLogger(__name__)

LAST = "last.ckpt"
BEST = "best.ckpt"
INTERRUPTED = "interrupted.ckpt"


@dataclass(frozen=True)
class RunIdentity:
    """What a checkpoint must match to be resumed: parameters and data.

    Attributes:
        params_hash: hash of the parameters that shape training (epochs aside).
        data_fingerprint: fingerprint of the validated images.
        view_source: ``"cache"`` or ``"on-the-fly"`` (informational only).
    """

    params_hash: str
    data_fingerprint: str

    @classmethod
    def of(cls, cfg: PretrainConfig, augment: dict[str, Any], data_fingerprint: str) -> RunIdentity:
        blob = json.dumps(
            {"pretrain": cfg.fingerprint_fields(), "augment": augment}, sort_keys=True, default=str
        )
        return cls(hashlib.sha256(blob.encode()).hexdigest()[:16], data_fingerprint)

    def as_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


class PretrainModule(L.LightningModule):
    """Two views in, one self-supervised loss out.

    Args:
        cfg: typed pretraining parameters.
        in_channels: image channels.
        mean, std: per-channel normalisation in [0, 1] units.
        steps_per_epoch: optimiser steps per epoch (for the lr schedule).
        identity: parameters/data identity stored in every checkpoint.
    """

    mean: Tensor
    std: Tensor

    def __init__(
        self,
        cfg: PretrainConfig,
        in_channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        steps_per_epoch: int,
        identity: RunIdentity,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.identity = identity
        self.steps_per_epoch = steps_per_epoch
        self.encoder = build_encoder(cfg.backbone, cfg.width, cfg.projector_dims, in_channels)
        self.loss_fn = loss_for_method(cfg)
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))
        self._flip_generator: torch.Generator | None = None

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> tuple[Tensor, Tensor]:
        x1, x2 = batch
        if self.cfg.device_flip:
            if self._flip_generator is None or self._flip_generator.device != x1.device:
                self._flip_generator = torch.Generator(device=x1.device)
                self._flip_generator.manual_seed(self.cfg.seed * 1009 + self.global_rank)
            x1 = random_hflip(x1, self._flip_generator)
            x2 = random_hflip(x2, self._flip_generator)
        # normalize() takes per-channel sequences; the (1, C, 1, 1) buffers broadcast the same way
        return normalize(x1, self.mean, self.std), normalize(x2, self.mean, self.std)  # type: ignore[arg-type]

    def gather(self, z: Tensor) -> Tensor:
        """All ranks' rows, gradients flowing back to each rank (identity on one process)."""
        if self.trainer.world_size == 1:
            return z
        gathered: Tensor = self.all_gather(z, sync_grads=True)  # type: ignore[assignment]
        return gathered.flatten(0, 1)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x1, x2 = batch
        _, z1 = self.encoder(x1)
        _, z2 = self.encoder(x2)
        terms: Any = self.loss_fn(self.gather(z1).float(), self.gather(z2).float())
        bad = [name for name, value in terms._asdict().items() if not torch.isfinite(value).all()]
        if bad:
            values = ", ".join(f"{name}={float(getattr(terms, name).detach())}" for name in bad)
            raise TrainingError(
                f"non-finite loss at step {self.global_step} (epoch {self.current_epoch}): {values}; "
                f"training stopped, the last good checkpoint in {self.cfg.checkpoint_dir} is kept "
                f"(check pretrain.base_lr={self.cfg.base_lr})"
            )
        n = x1.shape[0] * self.trainer.world_size
        for name, value in terms._asdict().items():
            self.log(f"train/{name}", value, on_step=True, on_epoch=True, batch_size=n, sync_dist=False)
        return terms.total

    def configure_optimizers(self) -> Any:
        optimizer = build_optimizer(self.encoder, self.cfg.optimizer, self.cfg.lr, self.cfg.weight_decay)
        total = self.cfg.epochs * self.steps_per_epoch
        warmup = int(round(self.cfg.warmup_epochs * self.steps_per_epoch))
        min_ratio = self.cfg.min_lr_ratio
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, warmup, total, min_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        for name, param in self.encoder.named_parameters():
            if not torch.isfinite(param).all():
                raise TrainingError(
                    f"weights became non-finite ({name}) at step {self.global_step}: checkpoint not written; "
                    f"the last good checkpoint in {self.cfg.checkpoint_dir} is kept (check pretrain.base_lr)"
                )
        checkpoint["imsvd_identity"] = self.identity.as_dict()


class History(Callback):
    """Per-step loss terms, lr and throughput, kept in the checkpoint so a resumed run's
    curve includes the epochs before the interruption."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []
        self._last: float | None = None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._last is None:
            self._last = time.perf_counter()

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
    """

    def __init__(self, directory: Path) -> None:
        self.path = directory / INTERRUPTED

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(exception, (KeyboardInterrupt, SIGTERMException)) and trainer.is_global_zero:
            trainer.save_checkpoint(self.path)
            log.warning(
                "interrupted at step %d (epoch %d): state saved to %s; rerun to resume from the last complete epoch",
                trainer.global_step,
                trainer.current_epoch,
                self.path,
            )


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


def resume_checkpoint(cfg: PretrainConfig, identity: RunIdentity) -> tuple[Path, int] | None:
    """The last checkpoint to resume from and the epoch it resumes at, or ``None``
    (with the reason logged).

    Only a checkpoint made with the same parameters (epochs aside) and the same data
    is resumed; it is read with ``weights_only=True`` first, so an untrusted file is
    refused before Lightning touches it.
    """
    path = Path(cfg.checkpoint_dir) / LAST
    if not cfg.resume:
        log.info("pretrain.resume=false: starting fresh")
        return None
    if not path.is_file():
        log.info("no checkpoint at %s: starting fresh", path)
        return None
    try:
        checkpoint = load_weights(path)
    except UntrustedFileError as exc:
        raise UntrustedFileError(f"cannot resume: {exc}") from None
    stored = checkpoint.get("imsvd_identity", {})
    if stored.get("data_fingerprint") != identity.data_fingerprint:
        log.warning("checkpoint %s was made on different data: starting fresh", path)
        return None
    if stored.get("params_hash") != identity.params_hash:
        log.warning("checkpoint %s was made with different parameters: starting fresh", path)
        return None
    epoch = int(checkpoint.get("epoch", -1)) + 1
    if epoch >= cfg.epochs:
        log.info("checkpoint %s already completed %d epochs", path, epoch)
    log.info("resuming from %s at epoch %d", path, epoch)
    return path, epoch


def resolve_precision(cfg: PretrainConfig) -> str:
    """``auto``: bf16-mixed on a GPU that supports it, 16-mixed on other GPUs, 32 on CPU."""
    if cfg.precision != "auto":
        return cfg.precision
    on_gpu = cfg.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    if not on_gpu:
        return "32-true"
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


def _devices(value: str) -> int | str:
    return int(value) if value.isdigit() else value


def _strategy(cfg: PretrainConfig) -> Any:
    """Several devices from inside a ``kedro run`` use spawned workers: Lightning's default
    DDP launcher re-executes the whole command line once per rank, which would rerun the
    Kedro session in every rank."""
    if cfg.strategy != "auto":
        return cfg.strategy
    devices = _devices(cfg.devices)
    many = cfg.num_nodes > 1 or (isinstance(devices, int) and devices > 1)
    if many and "LOCAL_RANK" not in os.environ:
        from lightning.pytorch.strategies import DDPStrategy

        backend = "nccl" if torch.cuda.is_available() and cfg.accelerator != "cpu" else "gloo"
        return DDPStrategy(start_method="spawn", process_group_backend=backend)
    return "auto"


@dataclass
class PretrainResult:
    """What a pretraining run produces."""

    module: PretrainModule
    history: pd.DataFrame
    resumed_from_epoch: int | None
    view_source: str
    seconds: float


def pretrain(
    train_dataset: torch.utils.data.Dataset,
    view_source: str,
    in_channels: int,
    mean: Sequence[float],
    std: Sequence[float],
    cfg: PretrainConfig,
    identity: RunIdentity,
    logger: Logger | bool = False,
) -> PretrainResult:
    """Train an encoder with ``cfg.method`` on pairs of uint8 views.

    Args:
        train_dataset: yields ``(view1, view2)`` uint8 (C, H, W) tensors and has
            ``set_epoch(epoch)`` (see :mod:`imsvd.augment`).
        view_source: ``"cache"`` or ``"on-the-fly"`` (logged).
        in_channels, mean, std: image channels and per-channel normalisation.
        cfg: pretraining parameters.
        identity: parameters/data identity (checkpoints are resumed only on a match).
        logger: a Lightning logger (MLflow) or ``False``.
    """
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    ckpt_dir = Path(cfg.checkpoint_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    # A checkpoint that is not resumed stays until this run's first epoch replaces it, so
    # a run that fails early (bad lr, Ctrl-C) loses none of the earlier results.
    found = resume_checkpoint(cfg, identity)
    resume, resumed_epoch = found if found else (None, None)

    world = cfg.num_nodes * (int(cfg.devices) if cfg.devices.isdigit() else 1)
    per_device = max(1, cfg.batch_size // world)
    loader = DataLoader(
        train_dataset,
        batch_size=per_device,
        shuffle=True,
        drop_last=len(train_dataset) >= per_device,  # type: ignore[arg-type]
        num_workers=cfg.num_workers,
        persistent_workers=False,  # set_epoch must reach the workers each epoch
        pin_memory=torch.cuda.is_available(),
    )
    steps = len(loader) // world if world > 1 else len(loader)
    steps = max(1, min(steps, cfg.max_steps_per_epoch or steps))
    module = PretrainModule(cfg, in_channels, mean, std, steps, identity)

    interactive = sys.stderr.isatty()
    history = History()
    callbacks: list[Callback] = [
        history,
        _SetEpoch(),
        SaveOnInterrupt(ckpt_dir),
        # Two callbacks: Lightning's save_last only writes when the monitored loss improved,
        # but a rerun must resume from the last complete epoch whatever its loss.
        ModelCheckpoint(dirpath=ckpt_dir, filename="last", every_n_epochs=1, enable_version_counter=False),
        ModelCheckpoint(
            dirpath=ckpt_dir,
            filename="best",
            monitor="train/total_epoch",
            mode="min",
            save_top_k=1,
            every_n_epochs=1,
            enable_version_counter=False,
        ),
    ]
    if logger:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    if not interactive:
        callbacks.append(PlainProgress(max(1, cfg.log_every_n_steps)))
    trainer = L.Trainer(
        accelerator=cfg.accelerator,
        devices=_devices(cfg.devices),
        num_nodes=cfg.num_nodes,
        strategy=_strategy(cfg),
        precision=resolve_precision(cfg),  # type: ignore[arg-type]
        max_epochs=cfg.epochs,
        limit_train_batches=steps,
        logger=logger,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO(), SyncBatchNormPlugin()],
        enable_progress_bar=interactive,
        enable_model_summary=False,
        log_every_n_steps=cfg.log_every_n_steps,
        deterministic=False,
        num_sanity_val_steps=0,
    )
    log.info(
        "pretraining %s (%s, width %s) for %d epochs of %d steps, views from the %s",
        cfg.method,
        cfg.backbone,
        cfg.width,
        cfg.epochs,
        steps,
        view_source,
    )
    start = time.perf_counter()
    try:
        trainer.fit(module, loader, ckpt_path=resume, weights_only=True)
    except SystemExit as exc:
        # Lightning turns SIGTERM into SystemExit(None) (exit status 0) and Ctrl-C into
        # SystemExit(1), which bypasses Kedro's error hooks (the MLflow run would stay
        # RUNNING). Either way the run must fail as an error, so that no later stage mistakes
        # the old encoder for a new one.
        how = "terminated (SIGTERM)" if isinstance(exc, SIGTERMException) else "interrupted (Ctrl-C)"
        raise TrainingError(
            f"pretraining was {how} at step {trainer.global_step}; state saved to "
            f"{ckpt_dir / INTERRUPTED}, rerun to resume from the last complete epoch"
        ) from None
    seconds = time.perf_counter() - start
    # Under spawned DDP the callbacks ran in the workers: the history is read back from
    # the last checkpoint, which holds it.
    last = ckpt_dir / LAST
    if last.is_file():
        state = load_weights(last).get("callbacks", {})
        for key, value in state.items():
            if key.startswith("History"):
                history.load_state_dict(value)
    frame = pd.DataFrame(history.rows)
    return PretrainResult(trainer.lightning_module, frame, resumed_epoch, view_source, seconds)  # type: ignore[arg-type]


class _SetEpoch(Callback):
    """A fresh pair of views per image each epoch: the pair datasets draw from (seed, epoch)."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loader = trainer.train_dataloader
        dataset = getattr(loader, "dataset", None)
        if dataset is not None and hasattr(dataset, "set_epoch"):
            dataset.set_epoch(trainer.current_epoch)


def encoder_payload(result: PretrainResult, image_size: int, extra: dict[str, Any]) -> dict[str, Any]:
    """The final encoder as plain tensors and values (loadable with weights_only=True).

    Raises:
        TrainingError: if any weight is not finite (a NaN encoder is never a result).
    """
    module = result.module
    state = {k: v.detach().cpu() for k, v in module.encoder.state_dict().items()}
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise TrainingError(f"the trained encoder has non-finite weights ({bad[0]} ...): not saved")
    return {
        "state_dict": state,
        "config": dataclasses.asdict(module.cfg),
        "in_channels": int(module.encoder.backbone.conv1.in_channels),
        "mean": [float(x) for x in module.mean.flatten().tolist()],
        "std": [float(x) for x in module.std.flatten().tolist()],
        "image_size": int(image_size),
        "identity": module.identity.as_dict(),
        **extra,
    }


def load_encoder(payload: dict[str, Any]) -> tuple[Encoder, dict[str, Any]]:
    """Rebuild the encoder from :func:`encoder_payload`'s dict."""
    from imsvd.config import parse

    cfg = parse(PretrainConfig, {k: v for k, v in payload["config"].items()}, "encoder.config")
    encoder = build_encoder(cfg.backbone, cfg.width, cfg.projector_dims, payload["in_channels"])
    try:
        encoder.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise UntrustedFileError(
            f"encoder weights do not match the architecture {cfg.backbone} (width {cfg.width}, "
            f"projector {cfg.projector}): {str(exc).splitlines()[0]}"
        ) from None
    encoder.eval()
    return encoder, payload


def to_numpy(x: Tensor) -> np.ndarray:
    return x.detach().cpu().numpy()
