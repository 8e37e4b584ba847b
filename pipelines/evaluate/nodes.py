"""Evaluation nodes: frozen features, metrics, pictures."""

from __future__ import annotations

from typing import Any

from matplotlib.figure import Figure

from imsvd import evaluate
from imsvd.config import EvaluateConfig, parse
from imsvd.data import ImageData
from imsvd.errors import DataError, UntrustedFileError
from imsvd.evaluate import Embeddings
from imsvd.validation import require_validated


def embed_images(
    validated_images: ImageData,
    validation_report: dict[str, Any],
    encoder: dict[str, Any],
    evaluate_params: dict[str, Any],
) -> Embeddings:
    """Frozen features of train and test images (trained and random encoder)."""
    cfg = parse(EvaluateConfig, evaluate_params, "evaluate")
    require_validated(validated_images, validation_report, "evaluate")
    if not isinstance(encoder, dict) or "state_dict" not in encoder:
        raise DataError("evaluate: the encoder file holds no 'state_dict': run the pretrain pipeline first")
    channels = encoder.get("in_channels")
    if channels and validated_images.images.shape[-1] != channels:
        raise DataError(
            f"evaluate: the encoder expects {channels}-channel images, the data has "
            f"{validated_images.images.shape[-1]}: rerun pretrain on this data"
        )
    try:
        return evaluate.embed(validated_images, encoder, cfg)
    except UntrustedFileError as exc:
        raise UntrustedFileError(f"the encoder from pretrain (catalog entry 'encoder'): {exc}") from None


def compute_metrics(embeddings: Embeddings, evaluate_params: dict[str, Any]) -> dict[str, Any]:
    """kNN, linear probe, redundancy and discrete-code metrics as flat keys."""
    return evaluate.compute_metrics(embeddings, parse(EvaluateConfig, evaluate_params, "evaluate"))


def draw_pictures(
    validated_images: ImageData, embeddings: Embeddings, evaluate_params: dict[str, Any]
) -> tuple[Figure, Figure, Figure, Figure]:
    """Joint matrix, variable attribution, bin occupancy, embedding map."""
    return evaluate.pictures(validated_images, embeddings, parse(EvaluateConfig, evaluate_params, "evaluate"))
