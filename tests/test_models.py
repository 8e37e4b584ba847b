"""Backbones and projector: shapes, widths, channels, torchvision parity."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from imsvd.errors import ConfigError
from imsvd.models import build_backbone, build_encoder, build_projector


@pytest.mark.parametrize(
    ("name", "features"), [("resnet18_cifar", 512), ("resnet18", 512), ("resnet50", 2048)]
)
def test_full_width_matches_torchvision_layout(name, features):
    ours = build_backbone(name, in_channels=3, width=1.0)
    reference = getattr(torchvision.models, name.removesuffix("_cifar"))()
    theirs = {k: v.shape for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    mine = {k: v.shape for k, v in ours.state_dict().items()}
    if name.endswith("_cifar"):
        theirs["conv1.weight"] = torch.Size([64, 3, 3, 3])  # the 3x3 CIFAR stem
    assert mine == theirs
    assert ours.num_features == features


def test_cifar_stem_keeps_resolution_and_width_scales():
    narrow = build_backbone("resnet18_cifar", in_channels=1, width=0.25)
    assert narrow.conv1.kernel_size == (3, 3) and narrow.conv1.stride == (1, 1)
    assert isinstance(narrow.maxpool, nn.Identity)
    assert narrow.num_features == 128
    out = narrow(torch.randn(3, 1, 16, 16))
    assert out.shape == (3, 128)


def test_encoder_outputs_features_and_embedding():
    encoder = build_encoder("resnet18_cifar", 0.125, (64, 32), in_channels=1)
    h, z = encoder(torch.randn(4, 1, 8, 8))
    assert h.shape == (4, 64) and z.shape == (4, 32)


def test_projector_layout_follows_spec():
    head = build_projector(128, (1024, 1024, 512))
    kinds = [type(m).__name__ for m in head]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert head[-1].bias is None and head[0].bias is not None
    assert head[-1].out_features == 512


def test_unknown_backbone_names_the_parameter():
    with pytest.raises(ConfigError, match="pretrain.backbone"):
        build_backbone("vgg16")
