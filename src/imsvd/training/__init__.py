"""Self-supervised pretraining with PyTorch Lightning (CPU, one GPU, or DDP).

- :mod:`imsvd.training.module`: the Lightning module (build, step, optimiser).
- :mod:`imsvd.training.callbacks`: history, progress, interruption, fresh pairs per epoch.
- :mod:`imsvd.training.resume`: the run's identity, the checkpoint to resume, atomic IO.
- :mod:`imsvd.training.loop`: :func:`pretrain`, the loop in named steps.
"""

from imsvd.training.loop import MonitorData, PretrainResult, crops_on_device, pretrain, resolve_precision
from imsvd.training.module import PretrainModule
from imsvd.training.resume import BEST, INTERRUPTED, LAST, RunIdentity, resume_checkpoint

__all__ = [
    "BEST",
    "INTERRUPTED",
    "LAST",
    "MonitorData",
    "PretrainModule",
    "PretrainResult",
    "RunIdentity",
    "crops_on_device",
    "pretrain",
    "resolve_precision",
    "resume_checkpoint",
]
