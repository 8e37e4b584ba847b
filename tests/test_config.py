"""Typed parameters: every bad value stops before any work, naming the parameter."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import torch
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

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = [
    ("validate", "data", DataConfig),
    ("validate", "validate", ValidateConfig),
    ("augment", "augment", AugmentConfig),
    ("pretrain", "pretrain", PretrainConfig),
    ("evaluate", "evaluate", EvaluateConfig),
]


def _keys(cls, prefix=""):
    """Dotted names of every field of a (nested) parameter dataclass."""
    names = set()
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        names |= _keys(hint, f"{prefix}{f.name}.") if dataclasses.is_dataclass(hint) else {prefix + f.name}
    return names


def _flat(values, prefix=""):
    out = set()
    for key, value in values.items():
        out |= _flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key}
    return out


@pytest.mark.parametrize(("pipeline", "section", "cls"), SECTIONS)
def test_shipped_parameters_are_the_dataclass_defaults(pipeline, section, cls):
    """One source of truth: the YAML sets every field, and to the class's default."""
    values = yaml.safe_load((ROOT / f"conf/base/parameters_{pipeline}.yml").read_text())[section]
    assert _flat(values) == _keys(cls)
    assert parse(cls, values, section) == cls()


def test_a_changed_default_is_caught():
    values = yaml.safe_load((ROOT / "conf/base/parameters_pretrain.yml").read_text())["pretrain"]
    values["imsvd"] = {**values["imsvd"], "bin_size": 32}
    assert parse(PretrainConfig, values, "pretrain") != PretrainConfig()


def test_method_sections_are_checked_only_when_chosen():
    # A bin size that does not divide the projector is an error for IMSVD only.
    bad_bins = {"projector": "128-120", "imsvd": {"bin_size": 16}}
    with pytest.raises(ConfigError, match=r"pretrain\.imsvd\.bin_size"):
        parse(PretrainConfig, bad_bins, "pretrain")
    assert parse(PretrainConfig, {**bad_bins, "method": "simclr"}, "pretrain").method == "simclr"
    with pytest.raises(ConfigError, match=r"pretrain\.simclr\.temperature"):
        parse(PretrainConfig, {"method": "simclr", "simclr": {"temperature": 0}}, "pretrain")
    with pytest.raises(ConfigError, match=r"pretrain\.vicreg\.std_coeff"):
        parse(PretrainConfig, {"method": "vicreg", "vicreg": {"std_coeff": -1}}, "pretrain")
    # Types and names are checked in every section, chosen or not.
    with pytest.raises(
        ConfigError, match=r"pretrain\.vicreg\.sim_coef \(did you mean pretrain\.vicreg\.sim_coeff\?\)"
    ):
        parse(PretrainConfig, {"vicreg": {"sim_coef": 1.0}}, "pretrain")
    with pytest.raises(ConfigError, match=r"pretrain\.barlow_twins\.lambda_offdiag must be a number"):
        parse(PretrainConfig, {"barlow_twins": {"lambda_offdiag": "x"}}, "pretrain")


def test_each_method_gets_its_own_settings():
    from imsvd.losses import loss_for_method

    z1 = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    z2 = z1 + 0.1 * torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    cases = {
        "barlow_twins": ("lambda_offdiag", 5e-3, 0.5, "off_diagonal"),
        "vicreg": ("cov_coeff", 1.0, 3.0, "covariance"),
        "simclr": ("temperature", 0.5, 0.1, "total"),
        "imsvd": ("invariance_coeff", 1.0, 2.0, "invariance"),
    }
    for method, (name, default, other, term) in cases.items():
        base = {"method": method, "projector": "64-32", "imsvd": {"bin_size": 8}}
        one = loss_for_method(parse(PretrainConfig, base, "pretrain"))(z1, z2)
        section = {**base.get(method, {}), name: other}
        two = loss_for_method(parse(PretrainConfig, {**base, method: section}, "pretrain"))(z1, z2)
        if method == "simclr":
            assert float(getattr(one, term)) != pytest.approx(float(getattr(two, term)))
        else:
            ratio = other / default
            assert float(getattr(two, term)) == pytest.approx(ratio * float(getattr(one, term)), rel=1e-5)


def test_old_flat_names_point_to_the_method_section():
    with pytest.raises(ConfigError, match=r"pretrain\.bin_size \(did you mean pretrain\.imsvd\.bin_size\?\)"):
        parse(PretrainConfig, {"bin_size": 16}, "pretrain")


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        ({"imsvd": {"bin_sze": 16}}, "pretrain.imsvd.bin_sze (did you mean pretrain.imsvd.bin_size?)"),
        ({"imsvd": {"bin_size": 30}}, "pretrain.imsvd.bin_size"),
        ({"imsvd": 3}, "pretrain.imsvd must be a mapping"),
        ({"base_lr": 0.0}, "pretrain.base_lr"),
        ({"base_lr": -1.0}, "pretrain.base_lr"),
        ({"batch_size": 0}, "pretrain.batch_size"),
        ({"backbone": "vgg11"}, "pretrain.backbone"),
        ({"epochs": "ten"}, "pretrain.epochs must be an integer"),
        ({"resume": "yes"}, "pretrain.resume must be true or false"),
        ({"projector": "1024-x"}, "pretrain.projector"),
        ({"method": "byol"}, "pretrain.method"),
        ({"optimizer": "adam"}, "pretrain.optimizer"),
        ({"crop_on": "gpu"}, "pretrain.crop_on must be one of"),
        ({"crop_on": "device"}, "pretrain.crop_on device crops the image store's originals"),
        ({"imsvd": {"temperature": 0}}, "pretrain.imsvd.temperature"),
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


def test_resume_identity_ignores_epochs_and_other_methods_settings():
    a = parse(PretrainConfig, {"epochs": 5}, "pretrain").fingerprint_fields()
    b = parse(PretrainConfig, {"epochs": 50, "vicreg": {"sim_coeff": 1.0}}, "pretrain").fingerprint_fields()
    c = parse(PretrainConfig, {"epochs": 5, "imsvd": {"bin_size": 32}}, "pretrain").fingerprint_fields()
    assert a == b
    assert a != c


def test_resume_identity_follows_the_views_not_the_cache_workers():
    from imsvd.training import RunIdentity

    pretrain = PretrainConfig()
    base = RunIdentity.of(pretrain, AugmentConfig(), "fp")
    assert RunIdentity.of(pretrain, AugmentConfig(workers=1, cache_dir="elsewhere"), "fp") == base
    assert RunIdentity.of(pretrain, AugmentConfig(size=32), "fp") != base
    assert RunIdentity.of(pretrain, AugmentConfig(seed=1), "fp") != base
    assert RunIdentity.of(dataclasses.replace(pretrain, base_lr=0.1), AugmentConfig(), "fp") != base


def test_the_fashion_mnist_environment_changes_only_what_it_names():
    from imsvd_pipelines.settings import CONFIG_LOADER_ARGS, CONFIG_LOADER_CLASS

    from imsvd.config import check_sections

    def params(env):
        loader = CONFIG_LOADER_CLASS(conf_source=str(ROOT / "conf"), env=env, **CONFIG_LOADER_ARGS)
        return loader["parameters"]

    base, fashion = params(None), params("fashion_mnist")
    check_sections(fashion)
    assert fashion["data"]["source"] == "fashion_mnist"
    assert fashion["data"]["path"] == "/usr/share/datasets/fashion-mnist"
    assert fashion["pretrain"]["imsvd"]["bin_size"] == 8 and fashion["augment"]["size"] == 28
    assert fashion["pretrain"]["imsvd"]["temperature"] == 0.125
    # merged key by key: what the environment does not name keeps base's value, even
    # inside a section (pretrain.imsvd) it changes other keys of
    imsvd, base_imsvd = fashion["pretrain"]["imsvd"], base["pretrain"]["imsvd"]
    assert imsvd["off_block_coeff"] == base_imsvd["off_block_coeff"]
    assert imsvd["invariance_coeff"] == base_imsvd["invariance_coeff"]
    assert fashion["pretrain"]["base_lr"] == base["pretrain"]["base_lr"]
    assert fashion["validate"] == base["validate"]
