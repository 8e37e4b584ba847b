"""The `pretrain` pipeline: validated images -> encoder, history, loss curve."""

from kedro.pipeline import Node, Pipeline

from .nodes import pretrain_encoder


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                pretrain_encoder,
                inputs=[
                    "validated_images",
                    "validation_report",
                    "view_cache_manifest",
                    "image_store",
                    "params:pretrain",
                    "params:augment",
                ],
                outputs=["encoder", "pretrain_history", "loss_curve_plot"],
                name="pretrain_encoder",
            )
        ]
    )
