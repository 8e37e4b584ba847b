"""The `augment` pipeline: validated images -> view cache (its manifest is the output)."""

from __future__ import annotations

from typing import Any

from kedro.pipeline import Node, Pipeline

from .nodes import build_view_cache


def create_pipeline(**kwargs: Any) -> Pipeline:
    """One node: draw the augmented views of every training image once and store them."""
    return Pipeline(
        [
            Node(
                build_view_cache,
                inputs=["validated_images", "validation_report", "params:augment"],
                outputs="view_cache_manifest",
                name="build_view_cache",
            )
        ]
    )
