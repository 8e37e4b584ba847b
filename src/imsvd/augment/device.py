"""Views drawn on the device (``pretrain.crop_on: device``): the recipe for a whole batch at once.

The DataLoader workers only decode the image store's originals; each batch travels as one
flat uint8 buffer with the images' shapes (:func:`ragged_collate`: no padding to the
largest image on the way), and the device draws both views of every image:

1. a RandomResizedCrop box per view, with torchvision's rule (ten tries of a random
   area and log-uniform aspect ratio inside the image, then a central crop), sampled for
   the whole batch in a few tensor operations (:func:`crop_boxes`);
2. each image's two crops resized to ``augment.size`` with ``torchvision.ops.roi_align``, whose
   adaptive sampling averages about ``crop / size`` bilinear samples a side per output
   pixel: a box filter, so a 400-pixel crop shrunk to 64 does not alias;
3. flip, colour jitter, grayscale, blur and solarisation from kornia, which draws each
   image's own parameters in batched operations (torchvision's v2 transforms draw one
   set of parameters per call, so a batch would share them).

The views come back as uint8, as the workers' views do, so normalisation and the rest of
the step are the same for both. Randomness comes from one seed per step (the run's seed,
the epoch, the step and the rank), so a resumed run draws what it would have drawn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import kornia.augmentation as K
import torch
from torch import Tensor, nn
from torchvision.ops import roi_align

from imsvd.augment.recipe import blur_kernel_size
from imsvd.config import AugmentConfig
from imsvd.errors import DataError

#: torchvision's RandomResizedCrop tries this many random boxes before a central crop.
CROP_TRIES = 10


def ragged_collate(images: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """A batch of uint8 ``(C, H, W)`` images of different sizes as one flat buffer.

    Returns:
        ``(flat, shapes)``: the images' bytes one after another, and their ``(C, H, W)``
        as a ``(B, 3)`` int64 tensor. Padding to the batch's largest image would move
        several times the bytes to the device (sides drawn from 64 to 512: about 3x, a
        largest image near 512 x 512 against a mean near 288 x 288).
    """
    flat = torch.cat([image.reshape(-1) for image in images])
    shapes = torch.tensor([tuple(image.shape) for image in images], dtype=torch.int64)
    return flat, shapes


def crop_boxes(
    heights: Tensor,
    widths: Tensor,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
) -> Tensor:
    """One RandomResizedCrop box per image, torchvision's rule for a whole batch.

    Each image gets :data:`CROP_TRIES` candidate boxes of a uniform area fraction in
    ``scale`` and a log-uniform aspect ratio in ``ratio``; the first that fits is placed
    uniformly; an image where none fits gets the central crop of the largest box of a
    ratio within ``ratio``. torchvision's ``RandomResizedCrop.get_params`` draws one box
    per call on the CPU in Python; here the batch is drawn on its device at once.

    Args:
        heights, widths: (B,) int64 sides of the images.
        scale: range of the crop's area as a fraction of the image's.
        ratio: range of the crop's width / height.
        generator: draws everything; on the sides' device.

    Returns:
        (B, 4) float32 boxes ``(x1, y1, x2, y2)`` in pixels, ``x2 - x1`` the crop's width.
    """
    device = heights.device
    h = heights.to(torch.float32).unsqueeze(1)
    w = widths.to(torch.float32).unsqueeze(1)
    draws = torch.rand((len(heights), CROP_TRIES, 4), generator=generator, device=device)
    area = h * w * (scale[0] + (scale[1] - scale[0]) * draws[..., 0])
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_low + (log_high - log_low) * draws[..., 1])
    crop_w = torch.round(torch.sqrt(area * aspect))
    crop_h = torch.round(torch.sqrt(area / aspect))
    fits = (crop_w > 0) & (crop_w <= w) & (crop_h > 0) & (crop_h <= h)
    top = torch.floor(draws[..., 2] * (h - crop_h + 1))
    left = torch.floor(draws[..., 3] * (w - crop_w + 1))
    first = fits.to(torch.int8).argmax(dim=1, keepdim=True)  # the first try that fits
    pick = lambda values: values.gather(1, first).squeeze(1)  # noqa: E731

    # The fallback: the whole image clipped to the nearest allowed ratio, centred.
    h, w = h.squeeze(1), w.squeeze(1)
    in_ratio = w / h
    full_w = torch.where(in_ratio > ratio[1], torch.round(h * ratio[1]), w)
    full_h = torch.where(in_ratio < ratio[0], torch.round(w / ratio[0]), h)
    any_fit = fits.any(dim=1)
    crop_w = torch.where(any_fit, pick(crop_w), full_w)
    crop_h = torch.where(any_fit, pick(crop_h), full_h)
    top = torch.where(any_fit, pick(top), torch.div(h - full_h, 2, rounding_mode="floor"))
    left = torch.where(any_fit, pick(left), torch.div(w - full_w, 2, rounding_mode="floor"))
    return torch.stack([left, top, left + crop_w, top + crop_h], dim=1)


class DeviceViews(nn.Module):
    """Both views of every image of a ragged batch, drawn on the batch's device.

    Args:
        cfg: the recipe (``views``, ``workers`` and ``cache_dir`` are ignored).
        channels: channels of the images, 1 or 3 (one channel: brightness and contrast
            only, no grayscale, as :func:`imsvd.augment.recipe.view_transform`).
    """

    def __init__(self, cfg: AugmentConfig, channels: int) -> None:
        super().__init__()
        if channels not in (1, 3):
            raise DataError(f"augmentation needs images with 1 or 3 channels, got {channels}")
        self.size = cfg.size
        self.scale = (cfg.scale_min, cfg.scale_max)
        self.ratio = (3 / 4, 4 / 3)  # torchvision's RandomResizedCrop default, as in view_transform
        brightness, contrast, saturation, hue = cfg.jitter
        if channels == 1:
            saturation, hue = 0.0, 0.0
        steps: list[nn.Module] = [
            K.RandomHorizontalFlip(p=cfg.hflip_p),
            K.ColorJitter(brightness, contrast, saturation, hue, p=cfg.jitter_p),
        ]
        if channels == 3:
            steps.append(K.RandomGrayscale(p=cfg.grayscale_p))
        if cfg.blur_p > 0:
            steps.append(K.RandomGaussianBlur(blur_kernel_size(cfg.size), sigma=(0.1, 2.0), p=cfg.blur_p))
        if cfg.solarize_p > 0:
            # Threshold exactly 0.5 (128 of 255, as the workers' recipe) and nothing added.
            steps.append(K.RandomSolarize(thresholds=0.0, additions=0.0, p=cfg.solarize_p))
        self.colour = K.ImageSequential(*steps)

    def forward(self, flat: Tensor, shapes: Tensor, seed: int) -> tuple[Tensor, Tensor]:
        """Two views of each image.

        Args:
            flat, shapes: a batch from :func:`ragged_collate`, on the device.
            seed: draws every crop and colour parameter of the batch.

        Returns:
            Two uint8 ``(B, C, size, size)`` tensors: the first and second views.
        """
        self.to(flat.device)  # kornia's parameter generators keep their ranges as buffers
        generator = torch.Generator(device=flat.device)
        generator.manual_seed(seed)
        # Rows 2i and 2i + 1: the two views of image i.
        boxes = crop_boxes(
            shapes[:, 1].repeat_interleave(2),
            shapes[:, 2].repeat_interleave(2),
            self.scale,
            self.ratio,
            generator,
        )
        sizes = shapes.tolist()
        pieces = flat.split([c * h * w for c, h, w in sizes])
        # One roi_align per image, not one over the batch padded to its largest image: the
        # padded float copy was 800 MB for 256 photos of up to 512 pixels a side, and
        # roi_align reads half a pixel past a crop's edge, which must be the image's edge
        # (roi_align clamps at its input's border), not padding.
        # aligned=True puts pixel centres at half-integers, so (x1, x2) covers whole pixels.
        crops = torch.cat(
            [
                roi_align(piece.view(1, c, h, w).float(), [pair], (self.size, self.size), aligned=True)
                for piece, (c, h, w), pair in zip(pieces, sizes, boxes.split(2), strict=True)
            ]
        )
        devices = [flat.device] if flat.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # kornia draws from the global RNG
            torch.manual_seed(seed)
            if devices:
                torch.cuda.manual_seed(seed)
            views = self.colour(crops / 255.0)
        views = (views * 255.0).round_().clamp_(0, 255).to(torch.uint8)
        return views[0::2], views[1::2]
