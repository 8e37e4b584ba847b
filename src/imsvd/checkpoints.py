"""Weights on disk: safe loading and saving, and the encoder file.

Everything is loaded with ``torch.load(weights_only=True)``: a file that carries
arbitrary pickled objects (which could run code when unpickled) is refused. Nothing
here imports Lightning, so evaluation and tracking load an encoder without it; the
Lightning checkpoint IO lives with the training loop (:mod:`imsvd.training.resume`).
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from imsvd.config import PretrainConfig, parse
from imsvd.errors import TrainingError, UntrustedFileError
from imsvd.io import atomic_write_bytes
from imsvd.models import Encoder, build_encoder

# Method settings that encoder files written before the per-method sections kept at the
# top level of their config.
_LEGACY_IMSVD_KEYS = ("bin_size", "temperature", "diagonal_coeff", "off_block_coeff", "invariance_coeff")


def save_weights(path: str | os.PathLike[str], payload: dict[str, Any]) -> None:
    """Save a dict of tensors and plain values atomically (write then rename)."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_weights(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a dict saved by :func:`save_weights` or a Lightning checkpoint, tensors only.

    Raises:
        UntrustedFileError: if the file holds anything beyond tensors and primitive
            types (its pickled objects are never executed) or is not a torch file.
    """
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UntrustedFileError(
            f"{path} holds objects other than tensors and plain values; refusing to load it "
            f"(weights_only=True): {str(exc).splitlines()[0]}"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise UntrustedFileError(f"{path} is not a readable torch file: {exc}") from None
    if not isinstance(payload, dict):
        raise UntrustedFileError(f"{path} does not hold a dict of weights (got {type(payload).__name__})")
    return payload


@dataclass(frozen=True)
class LoadedEncoder:
    """An encoder rebuilt from its file, in eval mode, with what it needs as input.

    Attributes:
        encoder: backbone and projector with the trained weights.
        config: the typed parameters it was trained with.
        in_channels: image channels it takes.
        image_size: side of the square input it was trained on.
        mean, std: per-channel normalisation in [0, 1] units.
    """

    encoder: Encoder
    config: PretrainConfig
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


def encoder_payload(
    encoder: Encoder,
    cfg: PretrainConfig,
    in_channels: int,
    mean: Sequence[float],
    std: Sequence[float],
    image_size: int,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """The encoder file's content as plain tensors and values (loadable with weights_only=True).

    Raises:
        TrainingError: if any weight is not finite (a NaN encoder is never a result).
    """
    state = {k: v.detach().cpu() for k, v in encoder.state_dict().items()}
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise TrainingError(f"the trained encoder has non-finite weights ({bad[0]} ...): not saved")
    return {
        "state_dict": state,
        "config": dataclasses.asdict(cfg),
        "in_channels": int(in_channels),
        "mean": [float(x) for x in mean],
        "std": [float(x) for x in std],
        "image_size": int(image_size),
        **extra,
    }


def _upgrade_config(config: dict[str, Any]) -> dict[str, Any]:
    """Move an older file's top-level IMSVD settings into their ``imsvd`` section."""
    legacy = {k: config[k] for k in _LEGACY_IMSVD_KEYS if k in config}
    if not legacy:
        return config
    rest = {k: v for k, v in config.items() if k not in legacy}
    return {**rest, "imsvd": {**legacy, **dict(rest.get("imsvd") or {})}}


def load_encoder(payload: dict[str, Any]) -> LoadedEncoder:
    """Rebuild the encoder from :func:`encoder_payload`'s dict.

    Raises:
        UntrustedFileError: if the weights do not fit the architecture the config names.
        ConfigError: if the stored config is not a valid ``pretrain`` section.
    """
    cfg = parse(PretrainConfig, _upgrade_config(dict(payload["config"])), "encoder.config")
    in_channels = int(payload["in_channels"])
    encoder = build_encoder(cfg.backbone, cfg.width, cfg.projector_dims, in_channels)
    try:
        encoder.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise UntrustedFileError(
            f"encoder weights do not match the architecture {cfg.backbone} (width {cfg.width}, "
            f"projector {cfg.projector}): {str(exc).splitlines()[0]}"
        ) from None
    encoder.eval()
    return LoadedEncoder(
        encoder=encoder,
        config=cfg,
        in_channels=in_channels,
        image_size=int(payload["image_size"]),
        mean=tuple(float(x) for x in payload["mean"]),
        std=tuple(float(x) for x in payload["std"]),
    )
