"""Saving and loading weights and training checkpoints safely.

Everything is loaded with ``torch.load(weights_only=True)``: a file that carries
arbitrary pickled objects (which could run code when unpickled) is refused.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from imsvd.errors import UntrustedFileError
from imsvd.io import atomic_write_bytes


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
