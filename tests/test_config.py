"""Typed parameters: every bad value stops before any work, naming the parameter."""

from __future__ import annotations

import pytest
import yaml

from imsvd.config import (
    AugmentConfig,
    DataConfig,
    EvaluateConfig,
    PretrainConfig,
    ValidateConfig,
    parse,
)
from imsvd.errors import ConfigError

SECTIONS = [
    ("validate", "data", DataConfig),
    ("validate", "validate", ValidateConfig),
    ("augment", "augment", AugmentConfig),
    ("pretrain", "pretrain", PretrainConfig),
    ("evaluate", "evaluate", EvaluateConfig),
]


@pytest.mark.parametrize(("pipeline", "section", "cls"), SECTIONS)
def test_shipped_parameters_parse(pipeline, section, cls):
    with open(f"conf/base/parameters_{pipeline}.yml") as handle:
        values = yaml.safe_load(handle)[section]
    parsed = parse(cls, values, section)
    # every key of the file is a field, and the file sets every field the class has
    assert set(values) == {f for f in cls.__dataclass_fields__}
    assert isinstance(parsed, cls)


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        ({"bin_sze": 16}, "pretrain.bin_sze (did you mean pretrain.bin_size?)"),
        ({"bin_size": 30}, "pretrain.bin_size"),
        ({"base_lr": 0.0}, "pretrain.base_lr"),
        ({"base_lr": -1.0}, "pretrain.base_lr"),
        ({"batch_size": 0}, "pretrain.batch_size"),
        ({"backbone": "vgg11"}, "pretrain.backbone"),
        ({"epochs": "ten"}, "pretrain.epochs must be an integer"),
        ({"resume": "yes"}, "pretrain.resume must be true or false"),
        ({"projector": "1024-x"}, "pretrain.projector"),
        ({"method": "byol"}, "pretrain.method"),
        ({"optimizer": "adam"}, "pretrain.optimizer"),
        ({"temperature": 0}, "pretrain.temperature"),
    ],
)
def test_bad_pretrain_parameters_name_the_parameter(values, needle):
    with pytest.raises(ConfigError) as info:
        parse(PretrainConfig, values, "pretrain")
    assert needle in str(info.value)


def test_peak_lr_scales_with_batch():
    assert parse(PretrainConfig, {"batch_size": 512, "base_lr": 0.1}, "pretrain").lr == pytest.approx(0.2)


def test_bool_is_not_an_int():
    with pytest.raises(ConfigError, match="pretrain.epochs"):
        parse(PretrainConfig, {"epochs": True}, "pretrain")


def test_image_folder_needs_a_path():
    with pytest.raises(ConfigError, match="data.path"):
        parse(DataConfig, {"source": "image_folder"}, "data")


def test_nested_list_types_are_checked():
    with pytest.raises(ConfigError, match=r"augment.jitter\[1\]"):
        parse(AugmentConfig, {"jitter": [0.4, "a", 0.4, 0.1]}, "augment")


def test_resume_identity_ignores_epochs_only():
    a = parse(PretrainConfig, {"epochs": 5}, "pretrain").fingerprint_fields()
    b = parse(PretrainConfig, {"epochs": 50}, "pretrain").fingerprint_fields()
    c = parse(PretrainConfig, {"epochs": 5, "bin_size": 16}, "pretrain").fingerprint_fields()
    assert a == b
    assert a != c
