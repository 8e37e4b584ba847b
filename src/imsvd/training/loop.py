"""The pretraining loop: a loader, callbacks and a Lightning trainer, run and read back.

:func:`pretrain` reads top to bottom as its steps: resume point, loader, module,
callbacks, trainer, fit, history. CPU, one GPU, or several devices with DDP.
"""

from __future__ import annotations

import gc
import logging
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from litdata import StreamingDataLoader
from torch.utils.data import DataLoader, Dataset

from imsvd.augment import StreamedPairs
from imsvd.augment.device import DeviceViews
from imsvd.checkpoints import load_weights
from imsvd.config import PretrainConfig
from imsvd.data import Images
from imsvd.decoding import frozen_heap
from imsvd.distributed import SharedShuffle, SyncBatchNormPlugin, is_writer, launched
from imsvd.errors import ConfigError, TrainingError
from imsvd.training.callbacks import (
    History,
    OnlineKNN,
    PlainProgress,
    SaveOnInterrupt,
    SetEpoch,
    ignore_interrupts,
)
from imsvd.training.module import PretrainModule
from imsvd.training.resume import INTERRUPTED, LAST, AtomicCheckpointIO, RunIdentity, resume_checkpoint

log = logging.getLogger(__name__)


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """True when the CPU computes in bf16 natively (the kernel reports ``avx512_bf16`` or
    ``amx_bf16``). Elsewhere oneDNN emulates bf16, which is slower than float32, so the
    flags are read rather than guessed from the vendor or torch's build.

    Args:
        cpuinfo: the text of ``/proc/cpuinfo`` (read when omitted; no file: False).
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def on_gpu(cfg: PretrainConfig) -> bool:
    """Whether the trainer will run on a GPU (``pretrain.accelerator`` auto, gpu or cuda,
    and one present)."""
    return cfg.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def crops_on_device(cfg: PretrainConfig) -> bool:
    """Whether the image store's views are drawn on the training device rather than in the
    DataLoader workers: ``pretrain.crop_on: device``, or ``auto`` on a GPU. On a CPU the
    workers draw them (``auto``): they run beside the step, where on the device the views
    would take the step's own cores."""
    if not cfg.stream_store:
        return False
    return cfg.crop_on == "device" or (cfg.crop_on == "auto" and on_gpu(cfg))


def resolve_precision(cfg: PretrainConfig) -> str:
    """``auto``: bf16-mixed on a GPU that supports it, 16-mixed on other GPUs; on a CPU,
    bf16-mixed where it has native bf16 arithmetic, else 32-true. The losses upcast to
    float32 whatever the precision."""
    if cfg.precision != "auto":
        return cfg.precision
    if not on_gpu(cfg):
        return "bf16-mixed" if cpu_has_native_bf16() else "32-true"
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


def placement(cfg: PretrainConfig) -> tuple[int | str, int]:
    """``(devices per node, nodes)`` for the trainer.

    Under ``torchrun`` or ``srun`` they come from the launcher (``pretrain.devices: auto``
    and ``pretrain.num_nodes: 1`` follow it; other values must agree with it); otherwise
    from the parameters, where ``auto`` is one device: Lightning's own ``auto`` takes every
    GPU and re-executes the command line once per rank, which would rerun the whole Kedro
    session in each (several devices without a launcher: ``pretrain.devices=N``).
    """
    devices: int | str = int(cfg.devices) if cfg.devices.isdigit() else cfg.devices
    launch = launched()
    if launch is None:
        return (1 if devices == "auto" else devices), cfg.num_nodes
    if devices not in ("auto", launch.local_world_size):
        raise ConfigError(
            f"pretrain.devices={cfg.devices} but {launch.launcher} started {launch.local_world_size} "
            "process(es) per node: leave pretrain.devices at auto under a launcher, or make them agree"
        )
    if cfg.num_nodes not in (1, launch.num_nodes):
        raise ConfigError(
            f"pretrain.num_nodes={cfg.num_nodes} but {launch.launcher} started {launch.num_nodes} "
            "node(s): leave pretrain.num_nodes at 1 under a launcher, or make them agree"
        )
    return launch.local_world_size, launch.num_nodes


def _strategy(cfg: PretrainConfig) -> Any:
    """DDP whenever more than one process trains.

    Under ``torchrun``/``srun`` the processes exist already and Lightning's cluster
    environment joins them. Several devices from a plain ``kedro run`` (one machine) use
    spawned workers instead: Lightning's default DDP launcher re-executes the whole
    command line once per rank, which would rerun the Kedro session in every rank.
    """
    if cfg.strategy != "auto":
        return cfg.strategy
    if world_size(cfg) == 1:
        return "auto"
    from lightning.pytorch.strategies import DDPStrategy

    backend = "nccl" if torch.cuda.is_available() and cfg.accelerator != "cpu" else "gloo"
    timeout = timedelta(seconds=cfg.collective_timeout_s)
    if launched() is not None:
        return DDPStrategy(process_group_backend=backend, timeout=timeout)
    return DDPStrategy(start_method="spawn", process_group_backend=backend, timeout=timeout)


@dataclass
class PretrainResult:
    """What a pretraining run produces."""

    module: PretrainModule
    history: pd.DataFrame
    resumed_from_epoch: int | None
    view_source: str
    seconds: float


def world_size(cfg: PretrainConfig) -> int:
    """Processes taking part: the launcher's world size under ``torchrun``/``srun``, else
    nodes times devices per node (1 for ``devices: auto``)."""
    devices, nodes = placement(cfg)
    return nodes * (devices if isinstance(devices, int) else 1)


def check_mid_epoch_resume(dataset: Dataset, cfg: PretrainConfig) -> None:
    """Refuse ``pretrain.checkpoint_every_n_steps`` for views whose loader has no state.

    Raises:
        ConfigError: naming the parameter, when the views are not streamed by litdata.
    """
    if cfg.checkpoint_every_n_steps and not isinstance(dataset, StreamedPairs):
        raise ConfigError(
            f"pretrain.checkpoint_every_n_steps={cfg.checkpoint_every_n_steps} needs views that litdata "
            "streams, whose loader can resume mid-epoch: the image store (pretrain.stream_store=true) "
            "or a sharded view cache (augment.max_array_mb below the cache's size). These views come "
            "from an array or are drawn on the fly, and resume at an epoch's end"
        )


def make_loader(dataset: Dataset, cfg: PretrainConfig) -> DataLoader | StoreLoader:
    """Batches of ``batch_size / world size`` pairs per process, reshuffled each epoch.

    ``pretrain.batch_size`` is the global batch whatever the world size, so the learning
    rate (scaled by it) and the steps per epoch stay those of one process, and the
    global batches are those of one process too (:class:`SharedShuffle`). The image
    store's pairs and a sharded view cache's get litdata's loader instead
    (:class:`StoreLoader`), which splits the shards over the processes itself.
    """
    world = world_size(cfg)
    if cfg.batch_size % world:
        raise ConfigError(
            f"pretrain.batch_size={cfg.batch_size} (the global batch) does not split evenly over "
            f"{world} processes (nodes x devices); choose a multiple of {world}"
        )
    if isinstance(dataset, StreamedPairs):
        return StoreLoader(dataset, cfg.batch_size // world, cfg.num_workers)
    size = len(dataset)  # type: ignore[arg-type]
    return FrozenForkLoader(
        dataset,
        batch_size=cfg.batch_size // world,
        sampler=SharedShuffle(size, cfg.batch_size, cfg.seed),
        drop_last=size >= cfg.batch_size,
        num_workers=cfg.num_workers,
        persistent_workers=False,  # set_epoch must reach the workers each epoch
        worker_init_fn=ignore_interrupts if cfg.num_workers else None,
        pin_memory=torch.cuda.is_available(),
    )


class FrozenForkMixin:
    """Fork a loader's workers with the parent's objects kept from its collector.

    A forked DataLoader worker shares the training process's memory until either writes
    to a page, and a collection writes to the header of every container object it visits.
    Pretraining on 200,000 photos, the two workers held about 245 MiB each of private
    pages, against about 45 at 20,000, most of them copies of the main process's heap.
    :func:`gc.freeze` before the fork keeps the workers' collections off the inherited
    objects. The main process must not collect them either while the workers live: its
    own collection would copy the same pages from its side (at the epoch's end the run
    grew by 130 MiB that way). So the objects stay frozen until :func:`fit` returns, which
    runs the trainer inside :func:`imsvd.decoding.frozen_heap`; a loader used elsewhere
    leaves them frozen (they are still freed by reference counting, only cycles wait).

    ``_get_iterator`` is where ``DataLoader`` builds the iterator that forks its workers
    (every epoch, as they are not persistent); torch has no public hook around that fork.
    """

    def _get_iterator(self) -> Any:
        if getattr(self, "num_workers", 0):
            gc.freeze()  # also the objects made since the last epoch's fork
        return super()._get_iterator()  # type: ignore[misc]


class FrozenForkLoader(FrozenForkMixin, DataLoader):  # type: ignore[type-arg]
    """torch's ``DataLoader``, its workers forked as :class:`FrozenForkMixin` says."""


class FrozenForkStreamingLoader(FrozenForkMixin, StreamingDataLoader):
    """litdata's ``StreamingDataLoader``, its workers forked as :class:`FrozenForkMixin` says."""


class StoreLoader(L.LightningDataModule):
    """litdata's loader of the image store or of a sharded view cache, built inside each
    training process.

    litdata's ``StreamingDataset`` reads the DDP ranks when it is built, and spawned or
    launched ranks exist only once the trainer has started; Lightning calls
    ``train_dataloader`` in each of them then. litdata's ``StreamingDataLoader`` shards the
    store over the ranks and workers and has a ``state_dict``, which Lightning keeps in
    every checkpoint, so a resumed run continues where the loader stopped.

    Args:
        dataset: the pairs (rebuilt per process with ``fresh()``).
        batch_size: pairs per process (the global batch over the world size).
        num_workers: DataLoader workers per process.
    """

    def __init__(self, dataset: StreamedPairs, batch_size: int, num_workers: int) -> None:
        super().__init__()
        self.dataset = dataset
        self.batch_size = batch_size
        self.num_workers = num_workers

    def train_dataloader(self) -> FrozenForkStreamingLoader:
        dataset = self.dataset.fresh()
        return FrozenForkStreamingLoader(
            dataset,
            batch_size=self.batch_size,
            collate_fn=getattr(dataset, "collate", None),  # StoreImages: images of many sizes
            num_workers=self.num_workers,
            # As for the arrays: fewer images than a batch still make one (smaller) batch.
            drop_last=len(dataset) >= self.batch_size,
            worker_init_fn=ignore_interrupts if self.num_workers else None,
            pin_memory=torch.cuda.is_available(),
        )


def steps_per_epoch(dataset: Dataset, cfg: PretrainConfig) -> int:
    """Optimiser steps per epoch (the same on every rank and for any world size)."""
    size = len(dataset)  # type: ignore[arg-type]
    steps = max(1, size // cfg.batch_size)
    return max(1, min(steps, cfg.max_steps_per_epoch or steps))


@dataclass(frozen=True)
class MonitorData:
    """What the online kNN monitor embeds: labelled training images at the encoder's input.

    Attributes:
        images: (N, H, W, C) uint8 training images.
        labels: (N,) int labels, all >= 0.
        size: the side the encoder takes (``augment.size``).
    """

    images: Images
    labels: np.ndarray
    size: int


def make_callbacks(
    cfg: PretrainConfig, history: History, with_logger: bool, monitor: OnlineKNN | None = None
) -> list[Callback]:
    """History, the online monitor, fresh pairs per epoch, save on interrupt, checkpoints,
    lr and progress. The monitor runs before the checkpoints, so they hold its value."""
    ckpt_dir = Path(cfg.checkpoint_dir)
    callbacks: list[Callback] = [
        history,
        *([monitor] if monitor is not None else []),
        SetEpoch(),
        SaveOnInterrupt(ckpt_dir),
        # Two callbacks: Lightning's save_last only writes when the monitored loss improved,
        # but a rerun must resume from the last complete epoch whatever its loss.
        ModelCheckpoint(dirpath=ckpt_dir, filename="last", every_n_epochs=1, enable_version_counter=False),
        # Mid-epoch too when asked (image store only: litdata's loader state is in the
        # checkpoint, so a resumed run continues the epoch where the loader stopped).
        *(
            [
                ModelCheckpoint(
                    dirpath=ckpt_dir,
                    filename="last",
                    every_n_train_steps=cfg.checkpoint_every_n_steps,
                    enable_version_counter=False,
                )
            ]
            if cfg.checkpoint_every_n_steps
            else []
        ),
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
    if with_logger:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    if not sys.stderr.isatty():
        callbacks.append(PlainProgress(max(1, cfg.log_every_n_steps)))
    return callbacks


def make_trainer(
    cfg: PretrainConfig, steps: int, callbacks: list[Callback], logger: Logger | bool
) -> L.Trainer:
    """The Lightning trainer for ``cfg``: devices, strategy, precision, epochs."""
    devices, nodes = placement(cfg)
    return L.Trainer(
        accelerator=cfg.accelerator,
        devices=devices,
        num_nodes=nodes,
        strategy=_strategy(cfg),
        use_distributed_sampler=False,  # the loader's SharedShuffle splits the data over ranks
        precision=resolve_precision(cfg),  # type: ignore[arg-type]
        max_epochs=cfg.epochs,
        limit_train_batches=steps,
        logger=logger,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO(), SyncBatchNormPlugin()],
        enable_progress_bar=sys.stderr.isatty(),
        enable_model_summary=False,
        log_every_n_steps=cfg.log_every_n_steps,
        deterministic=False,
        num_sanity_val_steps=0,
    )


def fit(
    trainer: L.Trainer, module: PretrainModule, loader: DataLoader | StoreLoader, resume: Path | None
) -> float:
    """Run ``trainer.fit``; an interruption fails as a :class:`TrainingError`. Returns seconds.

    Lightning turns SIGTERM into SystemExit(None) (exit status 0) and Ctrl-C into
    SystemExit(1), which bypasses Kedro's error hooks (the MLflow run would stay
    RUNNING). Either way the run must fail as an error, so that no later stage mistakes
    the old encoder for a new one.
    """
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            # Every logged value is already the same on every rank (the losses are computed
            # on the batch gathered from all ranks, the monitor on the same slice), so the
            # extra all-reduce per value that Lightning recommends would change nothing.
            warnings.filterwarnings("ignore", message=r".*recommended to use `self\.log\(.*sync_dist=True")
            # The image store comes as a LightningDataModule; the module's own batch hook
            # (normalisation on the device) is the one meant to run.
            warnings.filterwarnings("ignore", message=r".*overridden `on_after_batch_transfer`")
            with frozen_heap():  # while the loader's workers live (FrozenForkMixin)
                trainer.fit(module, loader, ckpt_path=resume, weights_only=True)
    except SystemExit as exc:
        how = "terminated (SIGTERM)" if isinstance(exc, SIGTERMException) else "interrupted (Ctrl-C)"
        folder = Path(module.cfg.checkpoint_dir)
        raise TrainingError(
            f"pretraining was {how} at step {trainer.global_step}; state saved to "
            f"{folder / INTERRUPTED}, rerun to resume from the last complete epoch"
        ) from None
    return time.perf_counter() - start


def read_history(history: History, checkpoint_dir: Path) -> pd.DataFrame:
    """The per-step history, read back from ``last.ckpt`` where it exists: under spawned
    DDP the callbacks ran in the workers, and the checkpoint holds their history."""
    last = checkpoint_dir / LAST
    if last.is_file():
        for key, value in load_weights(last).get("callbacks", {}).items():
            if key.startswith("History"):
                history.load_state_dict(value)
    return pd.DataFrame(history.rows)


def pretrain(
    train_dataset: Dataset,
    view_source: str,
    in_channels: int,
    mean: Sequence[float],
    std: Sequence[float],
    cfg: PretrainConfig,
    identity: RunIdentity,
    logger: Logger | bool = False,
    monitor_data: MonitorData | None = None,
    device_views: DeviceViews | None = None,
) -> PretrainResult:
    """Train an encoder with ``cfg.method`` on pairs of uint8 views.

    Args:
        train_dataset: yields ``(view1, view2)`` uint8 (C, H, W) tensors and has
            ``set_epoch(epoch)`` (see :mod:`imsvd.augment.pairs`).
        view_source: ``"cache"``, ``"on-the-fly"`` or ``"image store"`` (logged).
        in_channels, mean, std: image channels and per-channel normalisation.
        cfg: pretraining parameters.
        identity: parameters/data identity (checkpoints are resumed only on a match).
        logger: a Lightning logger (MLflow) or ``False``.
        monitor_data: labelled training images for the online kNN monitor (``None``, or
            ``pretrain.monitor.every_n_steps: 0``, runs without it).
        device_views: draws the views on the device, when ``train_dataset`` yields the
            store's images (:class:`imsvd.augment.StoreImages`) rather than pairs.
    """
    check_mid_epoch_resume(train_dataset, cfg)  # before anything is written
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    ckpt_dir = Path(cfg.checkpoint_dir)
    if is_writer():  # under a launcher the other ranks only read (see README "Many GPUs")
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    # A checkpoint that is not resumed stays until this run's first epoch replaces it, so
    # a run that fails early (bad lr, Ctrl-C) loses none of the earlier results.
    found = resume_checkpoint(cfg, identity)
    resume, resumed_epoch = found if found else (None, None)

    loader = make_loader(train_dataset, cfg)
    steps = steps_per_epoch(train_dataset, cfg)
    module = PretrainModule(cfg, in_channels, mean, std, steps, identity, device_views)
    history = History()
    monitor = None
    if monitor_data is not None and cfg.monitor.every_n_steps > 0:
        monitor = OnlineKNN(
            monitor_data.images,
            monitor_data.labels,
            monitor_data.size,
            mean,
            std,
            cfg.monitor,
            history,
            cfg.seed,
        )
    trainer = make_trainer(cfg, steps, make_callbacks(cfg, history, bool(logger), monitor), logger)
    log.info(
        "pretraining %s (%s, width %s) for %d epochs of %d steps, views from the %s",
        cfg.method,
        cfg.backbone,
        cfg.width,
        cfg.epochs,
        steps,
        view_source,
    )
    seconds = fit(trainer, module, loader, resume)
    if monitor is not None:
        log.info("online kNN monitor: %.1f s of %.1f s of training", monitor.seconds, seconds)
    frame = read_history(history, ckpt_dir)
    return PretrainResult(trainer.lightning_module, frame, resumed_epoch, view_source, seconds)  # type: ignore[arg-type]
