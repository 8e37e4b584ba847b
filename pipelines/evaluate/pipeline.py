"""The `evaluate` pipeline: encoder + validated images -> metrics and pictures."""

from kedro.pipeline import Node, Pipeline

from .nodes import compute_metrics, draw_pictures, embed_images


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                embed_images,
                inputs=["validated_images", "validation_report", "encoder", "params:evaluate"],
                outputs="embeddings",
                name="embed_images",
            ),
            Node(
                compute_metrics,
                inputs=["embeddings", "params:evaluate"],
                outputs="metrics",
                name="compute_metrics",
            ),
            Node(
                draw_pictures,
                inputs=["validated_images", "embeddings", "params:evaluate"],
                outputs=["joint_matrix_plot", "attribution_plot", "bin_occupancy_plot", "embedding_map_plot"],
                name="draw_pictures",
            ),
        ]
    )
