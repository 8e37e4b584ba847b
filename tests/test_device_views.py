"""Views drawn on the training device (``pretrain.crop_on: device``), run here on the CPU:
the same crop rule as torchvision's RandomResizedCrop, crops aligned on the image, edges
read from the image, and one draw per seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from imsvd.augment.device import DeviceViews, crop_boxes, ragged_collate
from imsvd.config import AugmentConfig

RATIO = (3 / 4, 4 / 3)


def boxes_for(shape: tuple[int, int], count: int, scale=(0.2, 1.0), seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    heights = torch.full((count,), shape[0])
    widths = torch.full((count,), shape[1])
    return crop_boxes(heights, widths, scale, RATIO, generator)


def test_crop_boxes_follow_torchvisions_random_resized_crop():
    boxes = boxes_for((300, 200), 40_000)
    width, height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 200).all() and (boxes[:, 3] <= 300).all()
    assert (width >= 1).all() and (height >= 1).all()
    area = (width * height / 60_000).numpy()
    ratio = (width / height).numpy()

    transform = v2.RandomResizedCrop(16, scale=(0.2, 1.0))
    torch.manual_seed(0)
    reference = [transform.make_params([torch.zeros(3, 300, 200)]) for _ in range(40_000)]
    ref_area = np.array([p["height"] * p["width"] / 60_000 for p in reference])
    ref_ratio = np.array([p["width"] / p["height"] for p in reference])
    # Same distribution of area and shape (quantiles within sampling error).
    for q in (0.1, 0.5, 0.9):
        assert np.quantile(area, q) == pytest.approx(np.quantile(ref_area, q), abs=0.01)
        assert np.quantile(ratio, q) == pytest.approx(np.quantile(ref_ratio, q), abs=0.01)
    # Placed uniformly: the crops' centres spread over the image as torchvision's do.
    centre = ((boxes[:, 0] + boxes[:, 2]) / 2 / 200).numpy()
    ref_centre = np.array([(p["left"] + p["width"] / 2) / 200 for p in reference])
    assert np.std(centre) == pytest.approx(np.std(ref_centre), abs=0.01)


@pytest.mark.parametrize("shape", [(10, 300), (300, 10), (64, 64)])
def test_an_image_where_no_try_fits_gets_torchvisions_central_crop(shape):
    """Whole-image crops of a ratio outside [3/4, 4/3] never fit: the fallback decides."""
    boxes = boxes_for(shape, 50, scale=(1.0, 1.0))
    params = v2.RandomResizedCrop(16, scale=(1.0, 1.0)).make_params([torch.zeros(3, *shape)])
    expected = [
        params["left"],
        params["top"],
        params["left"] + params["width"],
        params["top"] + params["height"],
    ]
    if shape == (64, 64):
        # Only an aspect of exactly 1 fits, which a continuous draw never gives.
        expected = [0, 0, 64, 64]
    assert boxes.tolist() == [expected] * 50


def test_views_of_a_plain_image_stay_plain_up_to_its_edges():
    """Crops reach half a pixel past their box; next to a smaller image in the batch, that
    must read the image's own edge."""
    images = [
        torch.full((3, h, w), 200, dtype=torch.uint8) for h, w in [(40, 25), (17, 33), (64, 64), (9, 70)]
    ]
    recipe = AugmentConfig(size=12, jitter_p=0.0, grayscale_p=0.0, blur_p=0.5)
    first, second = DeviceViews(recipe, 3)(*ragged_collate(images), seed=1)
    assert first.shape == second.shape == (4, 3, 12, 12) and first.dtype == torch.uint8
    assert first.unique().tolist() == second.unique().tolist() == [200]


def test_a_whole_image_crop_is_the_image_resized_in_place():
    """A crop of the whole image (scale 1 on a square image) is the image shrunk with a box
    filter, aligned on it: close to torchvision's antialiased resize, not shifted."""
    y, x = np.mgrid[0:128, 0:128]
    picture = np.stack([2 * x, 2 * y, 255 - x - y], axis=0).clip(0, 255).astype(np.uint8)
    image = torch.from_numpy(picture)
    recipe = AugmentConfig(size=32, scale_min=1.0, scale_max=1.0, jitter_p=0.0, grayscale_p=0.0)
    first, second = DeviceViews(recipe, 3)(*ragged_collate([image]), seed=0)
    expected = v2.functional.resize(image, [32, 32], antialias=True).float()
    assert (first[0].float() - expected).abs().mean() < 1.0
    assert torch.equal(first, second)  # no randomness left but the (unused) crop position


def test_views_repeat_under_a_seed_and_change_with_it():
    rng = np.random.default_rng(0)
    images = [
        torch.from_numpy(rng.integers(0, 256, (1, h, w), dtype=np.uint8)) for h, w in [(30, 20), (12, 50)]
    ]
    draw = DeviceViews(AugmentConfig(size=8, hflip_p=0.5, blur_p=0.5, solarize_p=0.5), channels=1)
    batch = ragged_collate(images)
    a1, b1 = draw(*batch, seed=3)
    a2, b2 = draw(*batch, seed=3)
    a3, _ = draw(*batch, seed=4)
    assert a1.shape == (2, 1, 8, 8)
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    assert not torch.equal(a1, b1) and not torch.equal(a1, a3)


def test_ragged_batches_carry_each_image_once():
    images = [
        torch.arange(3 * h * w, dtype=torch.int64).to(torch.uint8).view(3, h, w) for h, w in [(5, 7), (2, 9)]
    ]
    flat, shapes = ragged_collate(images)
    assert flat.numel() == 3 * (35 + 18) and shapes.tolist() == [[3, 5, 7], [3, 2, 9]]
