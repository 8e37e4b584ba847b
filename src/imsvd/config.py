"""Typed, frozen parameter objects, parsed and checked at each node boundary.

Kedro hands nodes plain dictionaries; each pipeline turns its section into one of these
dataclasses before any work, so a typo, an unknown key, a wrong type or an out-of-range
value stops the run with a message that names the parameter (``pretrain.bin_size``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from imsvd.errors import ConfigError

T = TypeVar("T")

BACKBONES = ("resnet18_cifar", "resnet18", "resnet50")
METHODS = ("imsvd", "barlow_twins", "vicreg", "simclr")
OPTIMIZERS = ("sgd", "lars")
#: Where the image store's views are drawn: auto (the device when it is a GPU), workers, device.
CROP_PLACES = ("auto", "workers", "device")
SOURCES = ("digits", "fashion_mnist", "image_folder")


def parse(cls: type[T], values: Mapping[str, Any] | None, prefix: str) -> T:
    """Build the dataclass ``cls`` from ``values``, checking names and types.

    Args:
        cls: a frozen dataclass whose fields have simple annotations (int, float, str,
            bool, ``X | None``, ``tuple[X, ...]``).
        values: the parameter mapping (missing keys take the field defaults).
        prefix: the dotted name of the section, used in messages (``"pretrain"``).

    Raises:
        ConfigError: on an unknown key (with the closest known names), a wrong type,
            or whatever ``cls.__post_init__`` rejects.
    """
    if values is not None and not isinstance(values, Mapping):
        raise ConfigError(f"{prefix} must be a mapping, got {type(values).__name__}")
    values = dict(values or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        import difflib

        hints_txt = []
        for key in unknown:
            close = difflib.get_close_matches(key, list(fields), n=1)
            nested = [
                f"{name}.{key}"
                for name, hint in hints.items()
                if dataclasses.is_dataclass(hint) and key in {f.name for f in dataclasses.fields(hint)}
            ]
            # A key that a method section has exactly beats a look-alike of this section.
            guess = nested[0] if nested else (close[0] if close else None)
            hints_txt.append(f"{prefix}.{key}" + (f" (did you mean {prefix}.{guess}?)" if guess else ""))
        raise ConfigError(f"unknown parameter(s): {', '.join(hints_txt)}; known: {', '.join(sorted(fields))}")
    kwargs = {name: _coerce(values[name], hints[name], f"{prefix}.{name}") for name in values}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:  # pragma: no cover - defensive
        raise ConfigError(f"{prefix}: {exc}") from exc


def _coerce(value: Any, hint: Any, name: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{name} must be a mapping of parameters, got {value!r}")
        return parse(hint, value, name)  # type: ignore[arg-type]
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for option in inner:
            try:
                return _coerce(value, option, name)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{name}: bad value {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        item = args[0]
        return tuple(_coerce(v, item, f"{name}[{i}]") for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{name}: unsupported parameter type {hint}")  # pragma: no cover


def _check(condition: bool, name: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{name} {message}")


@dataclass(frozen=True)
class DataConfig:
    """``data.*``: where the images come from."""

    source: str = "digits"
    path: str | None = None
    test_size: float = 0.25
    seed: int = 0
    max_image_pixels: int = 50_000_000
    workers: int | None = None
    max_train: int | None = None
    max_test: int | None = None
    holdout: str = "test"
    validation_size: float = 0.2
    store_dir: str = "data/03_primary/image_store"
    max_in_memory_mb: float = 2048.0

    def __post_init__(self) -> None:
        _check(
            self.max_in_memory_mb >= 0, "data.max_in_memory_mb", f"must be >= 0, got {self.max_in_memory_mb}"
        )
        for name in ("max_train", "max_test", "workers"):
            value = getattr(self, name)
            _check(value is None or value >= 1, f"data.{name}", "must be >= 1 or null")
        _check(self.source in SOURCES, "data.source", f"must be one of {SOURCES}, got {self.source!r}")
        _check(0.0 < self.test_size < 1.0, "data.test_size", f"must be in (0, 1), got {self.test_size}")
        _check(self.max_image_pixels > 0, "data.max_image_pixels", "must be positive")
        _check(
            self.holdout in ("test", "validation"),
            "data.holdout",
            f"must be 'test' or 'validation', got {self.holdout!r}",
        )
        _check(0.0 < self.validation_size < 1.0, "data.validation_size", "must be in (0, 1)")
        if self.source != "digits":
            _check(bool(self.path), "data.path", f"is required for data.source={self.source}")


@dataclass(frozen=True)
class ValidateConfig:
    """``validate.*``: thresholds of the Great Expectations suite."""

    min_train_images: int = 10
    min_test_images: int = 1
    max_images: int = 5_000_000
    min_side: int = 4
    max_side: int = 4096
    allowed_channels: tuple[int, ...] = (1, 3)
    min_per_class: int = 2
    max_duplicate_share: float = 0.05
    min_pixel_std: float = 1.0
    report_examples: int = 5
    data_docs_dir: str = "data/08_reporting/data_docs"

    def __post_init__(self) -> None:
        _check(self.min_train_images >= 1, "validate.min_train_images", "must be at least 1")
        _check(self.min_side >= 1, "validate.min_side", "must be at least 1")
        _check(self.max_side >= self.min_side, "validate.max_side", "must be >= validate.min_side")
        _check(0.0 <= self.max_duplicate_share <= 1.0, "validate.max_duplicate_share", "must be in [0, 1]")


@dataclass(frozen=True)
class AugmentConfig:
    """``augment.*``: the multiview augmentation recipe and its cache.

    The defaults are those of ``parameters_augment.yml``: the reference CIFAR recipe
    except the crop scale, which starts at 0.5 (the reference's 0.2 keeps too little of
    an 8x8 digit), and no horizontal flip (a mirrored digit is another glyph);
    :func:`imsvd.augment.reference_cifar_recipe` gives the paper's values.
    """

    views: int = 8
    size: int = 16
    scale_min: float = 0.5
    scale_max: float = 1.0
    hflip_p: float = 0.0
    jitter: tuple[float, ...] = (0.4, 0.4, 0.4, 0.1)
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.0
    solarize_p: float = 0.0
    seed: int = 0
    workers: int | None = None
    cache_dir: str = "data/05_model_input/view_cache"
    max_array_mb: float = 2048.0
    encode_above: int = 64

    def __post_init__(self) -> None:
        _check(self.max_array_mb >= 0, "augment.max_array_mb", f"must be >= 0, got {self.max_array_mb}")
        _check(self.encode_above >= 0, "augment.encode_above", f"must be >= 0, got {self.encode_above}")
        _check(self.views >= 2, "augment.views", f"must be at least 2, got {self.views}")
        _check(self.size >= 4, "augment.size", f"must be at least 4, got {self.size}")
        _check(
            0 < self.scale_min <= self.scale_max <= 1,
            "augment.scale_min",
            "must satisfy 0 < scale_min <= scale_max <= 1",
        )
        _check(len(self.jitter) == 4, "augment.jitter", "must be [brightness, contrast, saturation, hue]")
        for name in ("hflip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            _check(0.0 <= getattr(self, name) <= 1.0, f"augment.{name}", "must be a probability in [0, 1]")
        _check(self.workers is None or self.workers >= 1, "augment.workers", "must be >= 1 or null")


@dataclass(frozen=True)
class IMSVDConfig:
    """``pretrain.imsvd.*``: the soft discretization and the weights of the three terms.

    Field names are the keyword arguments of :func:`imsvd.losses.imsvd_loss`.
    """

    bin_size: int = 16
    temperature: float = 1.0
    diagonal_coeff: float = 1.0
    off_block_coeff: float = 1.0
    invariance_coeff: float = 1.0

    def check(self, embedding_dim: int, prefix: str) -> None:
        """Raise ``ConfigError`` unless the blocks fit an embedding of ``embedding_dim`` units."""
        _check(self.bin_size >= 2, f"{prefix}.bin_size", f"must be at least 2, got {self.bin_size}")
        _check(
            embedding_dim % self.bin_size == 0,
            f"{prefix}.bin_size",
            f"({self.bin_size}) must divide the projector output size {embedding_dim} (pretrain.projector)",
        )
        _check(embedding_dim // self.bin_size >= 2, f"{prefix}.bin_size", "must leave at least two blocks")
        _check(self.temperature > 0, f"{prefix}.temperature", f"must be positive, got {self.temperature}")
        for name in ("diagonal_coeff", "off_block_coeff", "invariance_coeff"):
            _check(getattr(self, name) >= 0, f"{prefix}.{name}", "must be >= 0")


@dataclass(frozen=True)
class BarlowTwinsConfig:
    """``pretrain.barlow_twins.*``: λ of the off-diagonal term (published: 5e-3)."""

    lambda_offdiag: float = 5e-3

    def check(self, embedding_dim: int, prefix: str) -> None:
        _check(self.lambda_offdiag >= 0, f"{prefix}.lambda_offdiag", "must be >= 0")


@dataclass(frozen=True)
class VICRegConfig:
    """``pretrain.vicreg.*``: λ, μ, ν of the three terms (published: 25, 25, 1)."""

    sim_coeff: float = 25.0
    std_coeff: float = 25.0
    cov_coeff: float = 1.0

    def check(self, embedding_dim: int, prefix: str) -> None:
        for name in ("sim_coeff", "std_coeff", "cov_coeff"):
            _check(getattr(self, name) >= 0, f"{prefix}.{name}", "must be >= 0")


@dataclass(frozen=True)
class SimCLRConfig:
    """``pretrain.simclr.*``: the NT-Xent temperature (published CIFAR value: 0.5)."""

    temperature: float = 0.5

    def check(self, embedding_dim: int, prefix: str) -> None:
        _check(self.temperature > 0, f"{prefix}.temperature", f"must be positive, got {self.temperature}")


MethodConfig = IMSVDConfig | BarlowTwinsConfig | VICRegConfig | SimCLRConfig


@dataclass(frozen=True)
class MonitorConfig:
    """``pretrain.monitor.*``: the online kNN monitor.

    At the end of an epoch, once ``every_n_steps`` optimiser steps have passed since the
    last check (and at the last epoch), the frozen current backbone embeds a fixed,
    seeded slice of ``images`` labelled *training* images (never the test split); a
    weighted kNN (``knn_k``, ``knn_temperature``) on 80 % of them classifies the other
    20 %. ``every_n_steps: 0`` turns it off.
    """

    every_n_steps: int = 25
    images: int = 1024
    knn_k: int = 20
    knn_temperature: float = 0.07

    def __post_init__(self) -> None:
        _check(self.every_n_steps >= 0, "pretrain.monitor.every_n_steps", "must be >= 0 (0: off)")
        _check(self.images >= 10, "pretrain.monitor.images", f"must be at least 10, got {self.images}")
        _check(self.knn_k >= 1, "pretrain.monitor.knn_k", "must be at least 1")
        _check(self.knn_temperature > 0, "pretrain.monitor.knn_temperature", "must be positive")


@dataclass(frozen=True)
class PretrainConfig:
    """``pretrain.*``: the self-supervised method, encoder and optimisation.

    Settings every method shares live here; each method's own settings live in its
    section (``pretrain.imsvd``, ``pretrain.vicreg`` ...), which is checked only when
    ``pretrain.method`` chooses it.
    """

    method: str = "imsvd"
    backbone: str = "resnet18_cifar"
    width: float = 0.25
    projector: str = "1024-1024-1024"
    imsvd: IMSVDConfig = IMSVDConfig()
    barlow_twins: BarlowTwinsConfig = BarlowTwinsConfig()
    vicreg: VICRegConfig = VICRegConfig()
    simclr: SimCLRConfig = SimCLRConfig()
    monitor: MonitorConfig = MonitorConfig()
    epochs: int = 150
    batch_size: int = 256
    base_lr: float = 0.4
    min_lr_ratio: float = 0.001
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    optimizer: str = "sgd"
    resume: bool = True
    seed: int = 0
    use_cache: bool = True
    stream_store: bool = False
    crop_on: str = "auto"
    device_flip: bool = False
    accelerator: str = "auto"
    devices: str = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    collective_timeout_s: float = 600.0
    precision: str = "auto"
    channels_last: bool = True
    compile: bool = False
    num_workers: int = 0
    log_every_n_steps: int = 5
    max_steps_per_epoch: int | None = None
    checkpoint_every_n_steps: int = 0
    checkpoint_dir: str = "data/06_models/checkpoints"

    def __post_init__(self) -> None:
        _check(self.method in METHODS, "pretrain.method", f"must be one of {METHODS}, got {self.method!r}")
        _check(
            self.backbone in BACKBONES,
            "pretrain.backbone",
            f"must be one of {BACKBONES}, got {self.backbone!r}",
        )
        _check(self.width > 0, "pretrain.width", f"must be positive, got {self.width}")
        self.method_config.check(self.projector_dims[-1], f"pretrain.{self.method}")
        _check(self.epochs >= 1, "pretrain.epochs", f"must be at least 1, got {self.epochs}")
        _check(self.batch_size >= 2, "pretrain.batch_size", f"must be at least 2, got {self.batch_size}")
        _check(self.base_lr > 0, "pretrain.base_lr", f"must be positive, got {self.base_lr}")
        _check(self.weight_decay >= 0, "pretrain.weight_decay", "must be >= 0")
        _check(self.warmup_epochs >= 0, "pretrain.warmup_epochs", "must be >= 0")
        _check(0 <= self.min_lr_ratio <= 1, "pretrain.min_lr_ratio", "must be in [0, 1]")
        _check(
            self.optimizer in OPTIMIZERS,
            "pretrain.optimizer",
            f"must be one of {OPTIMIZERS}, got {self.optimizer!r}",
        )
        _check(self.num_workers >= 0, "pretrain.num_workers", "must be >= 0")
        _check(
            self.crop_on in CROP_PLACES,
            "pretrain.crop_on",
            f"must be one of {CROP_PLACES}, got {self.crop_on!r}",
        )
        _check(
            self.crop_on != "device" or self.stream_store,
            "pretrain.crop_on",
            "device crops the image store's originals: it needs pretrain.stream_store=true "
            "(the view cache and the in-memory arrays hold views or images of one size)",
        )
        _check(self.num_nodes >= 1, "pretrain.num_nodes", f"must be at least 1, got {self.num_nodes}")
        _check(
            self.collective_timeout_s > 0,
            "pretrain.collective_timeout_s",
            f"must be positive, got {self.collective_timeout_s}",
        )
        _check(self.log_every_n_steps >= 1, "pretrain.log_every_n_steps", "must be >= 1")
        _check(self.checkpoint_every_n_steps >= 0, "pretrain.checkpoint_every_n_steps", "must be >= 0")
        # Whether the views' loader can resume mid-epoch is known once they are opened:
        # training.loop.check_mid_epoch_resume.
        _check(
            self.max_steps_per_epoch is None or self.max_steps_per_epoch >= 1,
            "pretrain.max_steps_per_epoch",
            "must be >= 1 or null",
        )

    @property
    def method_config(self) -> MethodConfig:
        """The section of the chosen method (``pretrain.<method>``)."""
        section: MethodConfig = getattr(self, self.method)
        return section

    @property
    def projector_dims(self) -> tuple[int, ...]:
        """The projector spec as integers (``"1024-1024-1024"`` -> ``(1024, 1024, 1024)``)."""
        try:
            dims = tuple(int(d) for d in self.projector.split("-"))
        except ValueError:
            raise ConfigError(
                f"pretrain.projector must look like '1024-1024-1024', got {self.projector!r}"
            ) from None
        if not dims or any(d < 1 for d in dims):
            raise ConfigError(f"pretrain.projector sizes must be positive, got {self.projector!r}")
        return dims

    @property
    def lr(self) -> float:
        """Peak learning rate: ``base_lr * batch_size / 256`` (the reference's linear scaling)."""
        return self.base_lr * self.batch_size / 256

    def fingerprint_fields(self) -> dict[str, Any]:
        """Parameters a checkpoint must share to be resumed: those that shape training,
        with the chosen method's section only (the number of epochs aside)."""
        skip = {
            "epochs",
            "resume",
            "checkpoint_dir",
            "checkpoint_every_n_steps",
            "accelerator",
            "crop_on",
            "devices",
            "num_nodes",
            "strategy",
            "collective_timeout_s",
            "num_workers",
            "log_every_n_steps",
            "precision",
            "channels_last",
            "compile",
            "monitor",
            *(name for name in METHODS if name != self.method),
        }
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


@dataclass(frozen=True)
class EvaluateConfig:
    """``evaluate.*``: downstream protocols and pictures."""

    knn_k: int = 20
    knn_temperature: float = 0.07
    knn_k_lightly: int = 200
    knn_temperature_lightly: float = 0.1
    linear_epochs: int = 200
    linear_lr: float = 0.1
    linear_weight_decay: float = 1e-4
    linear_batch_size: int = 4096
    linear_minibatch_epochs: int = 30
    memory_budget_mb: float = 1024.0
    scratch_dir: str | None = None
    raw_pixels_size: int = 32
    batch_size: int = 256
    matrix_blocks: int = 4
    attribution_units: int = 6
    attribution_images: int = 8
    collapse_rank_ratio: float = 0.005
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.knn_k >= 1, "evaluate.knn_k", "must be at least 1")
        _check(self.knn_temperature > 0, "evaluate.knn_temperature", "must be positive")
        _check(self.linear_epochs >= 1, "evaluate.linear_epochs", "must be at least 1")
        _check(self.linear_batch_size >= 1, "evaluate.linear_batch_size", "must be at least 1")
        _check(self.linear_minibatch_epochs >= 1, "evaluate.linear_minibatch_epochs", "must be at least 1")
        _check(self.memory_budget_mb > 0, "evaluate.memory_budget_mb", "must be positive")
        _check(
            self.raw_pixels_size >= 0,
            "evaluate.raw_pixels_size",
            "must be 0 (the encoder's input size) or more",
        )
        _check(self.matrix_blocks >= 1, "evaluate.matrix_blocks", "must be at least 1")


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "validate": ValidateConfig,
    "augment": AugmentConfig,
    "pretrain": PretrainConfig,
    "evaluate": EvaluateConfig,
}


def check_sections(params: Mapping[str, Any]) -> None:
    """Parse every known section of ``params`` (Kedro's merged parameters).

    Raises:
        ConfigError: naming the first bad parameter.
    """
    for name, cls in SECTIONS.items():
        if name in params:
            parse(cls, params[name], name)
