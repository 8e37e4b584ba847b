"""Wiring of the `validate` pipeline."""

from __future__ import annotations

from typing import Any

from kedro.pipeline import Node, Pipeline

from .nodes import accept_validated, load_and_check


def create_pipeline(**kwargs: Any) -> Pipeline:
    """Read and check the images, then accept them only when the suite passed."""
    return Pipeline(
        [
            Node(
                load_and_check,
                inputs=["params:data", "params:validate"],
                outputs=["candidate_images", "candidate_manifest", "validation_report"],
                name="load_and_check_images",
            ),
            Node(
                accept_validated,
                inputs=["candidate_images", "candidate_manifest", "validation_report", "params:data"],
                outputs=["validated_images", "manifest", "image_store"],
                name="accept_validated_images",
            ),
        ]
    )
