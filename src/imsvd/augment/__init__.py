"""Multiview augmentation, one module per concern.

- :mod:`imsvd.augment.recipe`: the per-view transform and seeded drawing of views.
- :mod:`imsvd.augment.cache`: the view cache (build, verify, open).
- :mod:`imsvd.augment.pairs`: the pair datasets pretraining reads.
- :mod:`imsvd.augment.device`: both views of a batch drawn on the training device.

Batch operations on the device (normalisation, the per-step flip) are in
:mod:`imsvd.preprocess`, shared with evaluation.
"""

from imsvd.augment.cache import (
    ShardedViews,
    ViewCache,
    build_view_cache,
    cache_paths,
    check_view_cache,
    open_view_cache,
)
from imsvd.augment.pairs import (
    CachedPairDataset,
    OnTheFlyPairDataset,
    Pair,
    ShardPairs,
    StoreImages,
    StorePairs,
    StreamedPairs,
    pair_dataset,
    pair_indices,
)
from imsvd.augment.recipe import (
    MultiViewTransform,
    augment_images,
    draw_seed,
    multi_view_transform,
    recipe_params,
    reference_cifar_recipe,
    view_transform,
)

__all__ = [
    "CachedPairDataset",
    "MultiViewTransform",
    "OnTheFlyPairDataset",
    "Pair",
    "ShardPairs",
    "ShardedViews",
    "StoreImages",
    "StorePairs",
    "StreamedPairs",
    "ViewCache",
    "augment_images",
    "build_view_cache",
    "cache_paths",
    "check_view_cache",
    "draw_seed",
    "multi_view_transform",
    "open_view_cache",
    "pair_dataset",
    "pair_indices",
    "recipe_params",
    "reference_cifar_recipe",
    "view_transform",
]
