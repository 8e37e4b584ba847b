"""Backbones and projection heads.

The residual blocks are torchvision's own (``BasicBlock``, ``Bottleneck``); only the
stem and stage widths are assembled here, because torchvision's ``ResNet`` fixes the
stage widths at 64-128-256-512 and the input at three channels, and a CPU-practical
run needs a width multiplier and grey-scale input.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from imsvd.config import BACKBONES
from imsvd.errors import ConfigError

_STAGES = {
    "resnet18_cifar": (BasicBlock, (2, 2, 2, 2)),
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
}


class ResNetBackbone(nn.Module):
    """A ResNet trunk that returns pooled features (no classifier).

    Args:
        block: torchvision's ``BasicBlock`` or ``Bottleneck``.
        layers: blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18.
        in_channels: image channels (1 for grey-scale, 3 for RGB).
        width: channel multiplier; 1.0 gives torchvision's widths (64 ... 512).
        cifar_stem: 3x3 stride-1 first convolution and no max-pool (the reference's
            CIFAR choice for small images) instead of the 7x7 stride-2 stem + max-pool.

    Shapes:
        ``forward(x)``: x (N, in_channels, H, W) -> (N, num_features).
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: Sequence[int],
        in_channels: int = 3,
        width: float = 1.0,
        cifar_stem: bool = False,
    ) -> None:
        super().__init__()
        widths = [max(4, round(w * width)) for w in (64, 128, 256, 512)]
        self.inplanes = widths[0]
        if cifar_stem:
            self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, widths[0], layers[0], stride=1)
        self.layer2 = self._make_layer(block, widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(block, widths[2], layers[2], stride=2)
        self.layer4 = self._make_layer(block, widths[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.num_features = widths[3] * block.expansion
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _make_layer(
        self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int, stride: int
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        stage = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        stage += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


def build_backbone(name: str, in_channels: int = 3, width: float = 1.0) -> ResNetBackbone:
    """Build a backbone by name (``resnet18_cifar``, ``resnet18``, ``resnet50``).

    Raises:
        ConfigError: for an unknown name (names ``pretrain.backbone``) or a bad width.
    """
    if name not in _STAGES:
        raise ConfigError(f"pretrain.backbone must be one of {BACKBONES}, got {name!r}")
    if width <= 0:
        raise ConfigError(f"pretrain.width must be positive, got {width}")
    block, layers = _STAGES[name]
    return ResNetBackbone(block, layers, in_channels, width, cifar_stem=name.endswith("_cifar"))


def build_projector(in_features: int, dims: Sequence[int]) -> nn.Sequential:
    """MLP projector: Linear+BatchNorm+ReLU between layers, the last Linear without bias.

    Args:
        in_features: backbone feature size.
        dims: layer output sizes, e.g. ``(1024, 1024, 1024)`` from ``"1024-1024-1024"``.

    Shapes:
        (N, in_features) -> (N, dims[-1]).
    """
    sizes = [in_features, *dims]
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-2], sizes[1:-1], strict=True):
        layers += [nn.Linear(a, b), nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(sizes[-2], sizes[-1], bias=False))
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """Backbone followed by projector.

    Shapes:
        ``forward(x)``: x (N, C, H, W) -> (features (N, F), embedding (N, D)).
    """

    backbone: ResNetBackbone
    projector: nn.Sequential

    def __init__(self, backbone: ResNetBackbone, projector: nn.Sequential) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.backbone(x)
        return features, self.projector(features)


def build_encoder(backbone: str, width: float, projector: Sequence[int], in_channels: int) -> Encoder:
    """Backbone plus projector, as used by every method."""
    trunk = build_backbone(backbone, in_channels, width)
    return Encoder(trunk, build_projector(trunk.num_features, projector))
