"""The Lightning module: two views in, one self-supervised loss out.

It stays small: it builds the encoder, normalises the uint8 views on the device, gathers
the projector outputs across ranks (with gradients) and hands them to a pure loss from
:mod:`imsvd.losses`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor

from imsvd.augment.device import DeviceViews
from imsvd.augment.recipe import draw_seed
from imsvd.config import PretrainConfig
from imsvd.errors import TrainingError
from imsvd.losses import loss_for_method
from imsvd.models import build_encoder
from imsvd.optim import build_optimizer, warmup_cosine
from imsvd.preprocess import normalize, random_hflip
from imsvd.training.resume import RunIdentity


class PretrainModule(L.LightningModule):
    """Two views in, one self-supervised loss out.

    Args:
        cfg: typed pretraining parameters.
        in_channels: image channels.
        mean, std: per-channel normalisation in [0, 1] units.
        steps_per_epoch: optimiser steps per epoch (for the lr schedule).
        identity: parameters/data identity stored in every checkpoint.
        device_views: draws both views of each batch on the device, from the image store's
            decoded originals (``pretrain.crop_on``); ``None``: batches are pairs of views.
    """

    mean: Tensor
    std: Tensor
    device_views: DeviceViews | None

    def __init__(
        self,
        cfg: PretrainConfig,
        in_channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        steps_per_epoch: int,
        identity: RunIdentity,
        device_views: DeviceViews | None = None,
    ) -> None:
        super().__init__()
        # Not a registered submodule: it holds no weights, and a checkpoint must resume
        # whether its run drew the views in the workers or on the device.
        self.__dict__["device_views"] = device_views
        self.cfg = cfg
        self.identity = identity
        self.steps_per_epoch = steps_per_epoch
        self.encoder = build_encoder(cfg.backbone, cfg.width, cfg.projector_dims, in_channels)
        if cfg.channels_last:
            self.encoder.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        if cfg.compile:
            self.encoder.compile()  # in place: the state_dict keys stay those of the plain encoder
        self.loss_fn = loss_for_method(cfg)
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))
        self._flip_generator: torch.Generator | None = None

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> tuple[Tensor, Tensor]:
        if self.device_views is not None:
            flat, shapes = batch
            seed = draw_seed(self.cfg.seed, self.current_epoch, self.global_step, self.global_rank)
            x1, x2 = self.device_views(flat, shapes, seed)
        else:
            x1, x2 = batch
        if self.cfg.device_flip:
            if self._flip_generator is None or self._flip_generator.device != x1.device:
                self._flip_generator = torch.Generator(device=x1.device)
                self._flip_generator.manual_seed(self.cfg.seed * 1009 + self.global_rank)
            x1 = random_hflip(x1, self._flip_generator)
            x2 = random_hflip(x2, self._flip_generator)
        x1, x2 = normalize(x1, self.mean, self.std), normalize(x2, self.mean, self.std)
        if self.cfg.channels_last:
            x1 = x1.contiguous(memory_format=torch.channels_last)
            x2 = x2.contiguous(memory_format=torch.channels_last)
        return x1, x2

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
