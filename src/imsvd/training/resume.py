"""What makes a pretraining run resumable: its identity, the checkpoint to resume, and
checkpoint files that are never half-written."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from imsvd.augment.recipe import recipe_params
from imsvd.checkpoints import load_weights
from imsvd.config import AugmentConfig, PretrainConfig
from imsvd.errors import UntrustedFileError
from imsvd.io import atomic_write_bytes

log = logging.getLogger(__name__)

LAST = "last.ckpt"
BEST = "best.ckpt"
INTERRUPTED = "interrupted.ckpt"


@dataclass(frozen=True)
class RunIdentity:
    """What a checkpoint must match to be resumed: parameters and data.

    Attributes:
        params_hash: hash of the pretraining parameters that shape training (epochs
            aside) and of the augmentation recipe and seed the views are drawn with.
        data_fingerprint: fingerprint of the validated images.
    """

    params_hash: str
    data_fingerprint: str

    @classmethod
    def of(cls, cfg: PretrainConfig, augment: AugmentConfig, data_fingerprint: str) -> RunIdentity:
        """The identity of a run; the augmentation counts through the same fields as the
        view cache's manifest (recipe and seed), so ``augment.workers`` and
        ``augment.cache_dir``, which change no view, never block a resume."""
        views = {"params": recipe_params(augment), "seed": augment.seed}
        blob = json.dumps(
            {"pretrain": cfg.fingerprint_fields(), "augment": views}, sort_keys=True, default=str
        )
        return cls(hashlib.sha256(blob.encode()).hexdigest()[:16], data_fingerprint)

    def as_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


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
    batches = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress", {})
    if batches.get("is_last_batch") is False:  # a mid-epoch checkpoint (checkpoint_every_n_steps)
        epoch = int(checkpoint.get("epoch", 0))
        log.info(
            "resuming from %s in the middle of epoch %d, after step %d: litdata's loader (image "
            "store or sharded view cache) continues where it stopped",
            path,
            epoch + 1,
            int(checkpoint.get("global_step", 0)),
        )
        return path, epoch
    epoch = int(checkpoint.get("epoch", -1)) + 1
    if epoch >= cfg.epochs:
        log.info("checkpoint %s already completed %d epochs", path, epoch)
    log.info("resuming from %s at epoch %d", path, epoch)
    return path, epoch


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that writes beside the target, then renames.

    Lightning's own ``_atomic_save`` stages the file in the system temporary folder and
    moves it, which degrades to a non-atomic copy when that folder is on another file
    system; a rename inside the checkpoint folder is atomic on POSIX.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write_bytes(path, buffer.getvalue())

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = True
    ) -> dict[str, Any]:
        return load_weights(path)
