"""The project's pipelines: validate, augment, pretrain, evaluate, and all four chained."""

from __future__ import annotations

from kedro.pipeline import Pipeline


def register_pipelines() -> dict[str, Pipeline]:
    """Map pipeline names to pipelines; ``__default__`` chains all four."""
    from imsvd_pipelines import augment, evaluate, pretrain, validate

    pipelines = {
        "validate": validate.create_pipeline(),
        "augment": augment.create_pipeline(),
        "pretrain": pretrain.create_pipeline(),
        "evaluate": evaluate.create_pipeline(),
    }
    pipelines["__default__"] = sum(pipelines.values(), Pipeline([]))
    return pipelines
