"""Tests of the multiview recipe, the view cache, the pair datasets and the augment node."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from litdata import StreamingDataLoader
from sklearn.datasets import load_digits

from imsvd.augment import (
    CachedPairDataset,
    MultiViewTransform,
    OnTheFlyPairDataset,
    ShardedViews,
    ShardPairs,
    augment_images,
    build_view_cache,
    cache_paths,
    check_view_cache,
    multi_view_transform,
    open_view_cache,
    pair_dataset,
    pair_indices,
    reference_cifar_recipe,
    view_transform,
)
from imsvd.augment import cache as cache_module
from imsvd.augment.cache import ARRAY_NAME, FORMAT_VERSION, disk_bytes, shards_path
from imsvd.config import AugmentConfig
from imsvd.data import ImageData
from imsvd.errors import ConfigError, DataError
from imsvd.io import sha256_file
from imsvd.preprocess import channel_stats, model_input, normalize, random_hflip

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    """All 1,797 embedded digits as (N, 8, 8, 1) uint8."""
    return (load_digits().images * (255 / 16)).round().astype(np.uint8)[..., None]


@pytest.fixture(scope="module")
def digits_rgb(digits: np.ndarray) -> np.ndarray:
    """The digits tinted into three channels, (N, 8, 8, 3) uint8."""
    tint = np.array([1.0, 0.6, 0.3])
    return (digits.astype(np.float64) * tint).round().astype(np.uint8)


def config(tmp_path: Path, **kwargs: object) -> AugmentConfig:
    values = {"views": 4, "workers": 1, "cache_dir": str(tmp_path / "cache")} | kwargs
    return AugmentConfig(**values)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- recipe


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [16, 32])
def test_view_transform_shapes_on_blank_image(channels: int, size: int) -> None:
    cfg = AugmentConfig(size=size, blur_p=0.5, solarize_p=0.5)
    blank = torch.zeros(channels, 8, 8, dtype=torch.uint8)
    for seed in range(5):
        torch.manual_seed(seed)
        view = view_transform(cfg, channels)(blank)
        assert view.shape == (channels, size, size)
        assert view.dtype == torch.uint8


def test_view_transform_defaults_are_the_reference_cifar_recipe() -> None:
    steps = view_transform().transforms
    crop, flip, jitter, gray = steps
    assert crop.size == (16, 16) and crop.scale == (0.2, 1.0)
    assert flip.p == 0.5
    assert jitter.p == 0.8
    color = jitter.transforms[0]
    assert color.brightness == (0.6, 1.4) and color.contrast == (0.6, 1.4)
    assert color.saturation == (0.6, 1.4) and color.hue == (-0.1, 0.1)
    assert gray.p == 0.2


def test_single_channel_recipe_keeps_brightness_and_contrast_only() -> None:
    steps = view_transform(AugmentConfig(), channels=1).transforms
    assert len(steps) == 3  # no grayscale
    color = steps[2].transforms[0]
    assert color.brightness is not None and color.contrast is not None
    assert color.saturation is None and color.hue is None


def test_view_transform_rejects_two_channels() -> None:
    with pytest.raises(DataError, match="1 or 3 channels"):
        view_transform(AugmentConfig(), channels=2)


def test_multi_view_transform_gives_one_view_per_transform() -> None:
    views = multi_view_transform(AugmentConfig(views=5), 3)(torch.zeros(3, 8, 8, dtype=torch.uint8))
    assert len(views) == 5 and all(v.shape == (3, 16, 16) for v in views)
    # Without a config: the paper's recipe, 8 views of a 16x16 crop drawn independently.
    image = torch.arange(3 * 24 * 24).remainder(251).to(torch.uint8).view(3, 24, 24)
    torch.manual_seed(0)
    default = multi_view_transform()(image)
    assert len(default) == 8 and all(v.shape == (3, 16, 16) for v in default)
    assert len({v.numpy().tobytes() for v in default}) == 8
    with pytest.raises(ValueError):
        MultiViewTransform([])


def test_parameters_file_is_the_reference_recipe_but_for_the_crop_scale_and_flips() -> None:
    values = yaml.safe_load((ROOT / "conf/base/parameters_augment.yml").read_text())["augment"]
    from imsvd.config import parse

    parsed = parse(AugmentConfig, values, "augment")
    # The shipped file is the reference CIFAR recipe except for the crop scale, raised for
    # 8x8 digits, and the flips, off for digits (see the file's comments).
    reference = reference_cifar_recipe()
    assert dataclasses.replace(parsed, scale_min=reference.scale_min, hflip_p=reference.hflip_p) == reference
    assert (parsed.scale_min, reference.scale_min) == (0.5, 0.2)
    assert (parsed.hflip_p, reference.hflip_p) == (0.0, 0.5)


# --------------------------------------------------------------------------- cache


@pytest.mark.parametrize("rgb", [False, True])
def test_cache_shape_and_manifest_on_digits(
    tmp_path: Path, digits: np.ndarray, digits_rgb: np.ndarray, rgb: bool
) -> None:
    images = (digits_rgb if rgb else digits)[:200]
    cfg = config(tmp_path, size=16)
    result = build_view_cache(images, "fp", cfg, progress=False)
    channels = images.shape[-1]
    assert not result.reused
    manifest = result.manifest
    assert manifest["shape"] == [200, 4, channels, 16, 16]
    assert manifest["dtype"] == "uint8" and manifest["format_version"] == FORMAT_VERSION
    assert manifest["fingerprint"] == "fp" and manifest["seed"] == 0
    assert manifest["params"]["views"] == 4 and manifest["params"]["jitter"] == [0.4, 0.4, 0.4, 0.1]
    assert manifest["sha256"] == sha256_file(result.path)
    assert json.loads(cache_paths(cfg)[1].read_text()) == manifest
    views = open_view_cache(cfg, "fp")
    assert isinstance(views, np.memmap) and views.shape == (200, 4, channels, 16, 16)
    assert views.dtype == np.uint8
    # Views of one image differ, and they are not blank.
    assert not np.array_equal(views[0, 0], views[0, 1])
    assert views.max() > 0


def test_cache_matches_direct_augmentation(tmp_path: Path, digits_rgb: np.ndarray) -> None:
    cfg = config(tmp_path, seed=7)
    build_view_cache(digits_rgb[:20], "fp", cfg, progress=False)
    direct = augment_images(digits_rgb[:20], range(20), multi_view_transform(cfg, 3), 7)
    assert np.array_equal(np.asarray(open_view_cache(cfg, "fp")), direct)


@pytest.mark.parametrize("rgb", [False, True])
def test_deterministic_for_any_number_of_workers(
    tmp_path: Path, digits: np.ndarray, digits_rgb: np.ndarray, rgb: bool
) -> None:
    images = (digits_rgb if rgb else digits)[:120]
    one = build_view_cache(images, "fp", config(tmp_path / "one", workers=1), progress=False)
    two = build_view_cache(images, "fp", config(tmp_path / "two", workers=2), progress=False)
    assert one.path.read_bytes() == two.path.read_bytes()
    assert one.manifest == two.manifest


def test_build_leaves_the_global_rng_alone(tmp_path: Path, digits: np.ndarray) -> None:
    torch.manual_seed(123)
    state = torch.get_rng_state()
    threads = torch.get_num_threads()
    build_view_cache(digits[:10], "fp", config(tmp_path), progress=False)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.get_num_threads() == threads


def test_second_build_reuses_without_work(
    tmp_path: Path, digits: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = config(tmp_path)
    first = build_view_cache(digits[:50], "fp", cfg, progress=False)
    before = os.stat(first.path)

    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("augmentation ran on a valid cache")

    monkeypatch.setattr(cache_module, "_fill", no_work)
    # workers and progress do not change the stored bytes, so they do not force a rebuild.
    second = build_view_cache(digits[:50], "fp", config(tmp_path, workers=2), progress=False)
    after = os.stat(second.path)
    assert second.reused and second.reason == "valid"
    assert second.manifest == first.manifest
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"seed": 1}, "seed"),
        ({"views": 3}, "params"),
        ({"size": 12}, "params"),
        ({"hflip_p": 0.5}, "params"),
        ({"solarize_p": 0.2}, "params"),
    ],
)
def test_rebuilt_when_seed_or_params_change(
    tmp_path: Path, digits: np.ndarray, change: dict, key: str
) -> None:
    first = build_view_cache(digits[:30], "fp", config(tmp_path), progress=False)
    cfg = config(tmp_path, **change)
    assert open_view_cache(cfg, "fp") is None
    second = build_view_cache(digits[:30], "fp", cfg, progress=False)
    assert not second.reused and second.reason.startswith(f"{key} changed")
    assert second.manifest["sha256"] != first.manifest["sha256"]
    assert open_view_cache(cfg, "fp") is not None
    assert open_view_cache(config(tmp_path), "fp") is None  # one cache per folder


def test_rebuilt_when_data_changes(tmp_path: Path, digits: np.ndarray) -> None:
    cfg = config(tmp_path)
    build_view_cache(digits[:30], "fp-a", cfg, progress=False)
    assert open_view_cache(cfg, "fp-b") is None
    second = build_view_cache(digits[30:60], "fp-b", cfg, progress=False)
    assert not second.reused and second.reason.startswith("fingerprint changed")
    assert open_view_cache(cfg, "fp-b") is not None


def _flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size - 64)


def _rewrite_header(path: Path) -> None:
    # Same bytes, but the header claims a different shape (N and V swapped).
    views = np.load(path)
    np.save(path, views.reshape(views.shape[1], views.shape[0], *views.shape[2:]))


@pytest.mark.parametrize("damage", [_flip_bytes, _truncate, _rewrite_header, lambda p: p.unlink()])
def test_damaged_cache_is_detected_and_rebuilt(tmp_path: Path, digits: np.ndarray, damage) -> None:
    cfg = config(tmp_path)
    first = build_view_cache(digits[:40], "fp", cfg, progress=False)
    good = first.path.read_bytes()
    damage(first.path)
    manifest, reason = check_view_cache(cfg, "fp")
    assert manifest is None and reason
    assert open_view_cache(cfg, "fp") is None
    second = build_view_cache(digits[:40], "fp", cfg, progress=False)
    assert not second.reused
    assert second.path.read_bytes() == good


def test_bad_manifest_is_not_trusted(tmp_path: Path, digits: np.ndarray) -> None:
    cfg = config(tmp_path)
    build_view_cache(digits[:10], "fp", cfg, progress=False)
    cache_paths(cfg)[1].write_text("{not json")
    assert open_view_cache(cfg, "fp") is None
    assert not build_view_cache(digits[:10], "fp", cfg, progress=False).reused


def test_leftover_temporary_file_is_not_a_cache(tmp_path: Path, digits: np.ndarray) -> None:
    cfg = config(tmp_path)
    folder = Path(cfg.cache_dir)
    folder.mkdir(parents=True)
    # What a killed build leaves: a complete-looking array under its temporary name.
    leftover = folder / f".{ARRAY_NAME}.abc123.tmp"
    np.save(leftover.with_suffix(".npy"), np.zeros((10, 4, 1, 16, 16), np.uint8))
    leftover.with_suffix(".npy").rename(leftover)
    assert open_view_cache(cfg, "fp") is None
    result = build_view_cache(digits[:10], "fp", cfg, progress=False)
    assert not result.reused and not leftover.exists()
    assert [p.name for p in folder.iterdir() if p.suffix == ".tmp"] == []


def test_rejects_bad_images(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="uint8"):
        build_view_cache(np.zeros((4, 8, 8, 1), np.float32), "fp", config(tmp_path))
    with pytest.raises(DataError, match="C in"):
        build_view_cache(np.zeros((4, 8, 8, 2), np.uint8), "fp", config(tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("line", [2048.0, 0.0], ids=["array", "shards"])
def test_killed_build_leaves_no_valid_cache(tmp_path: Path, digits: np.ndarray, line: float) -> None:
    psutil = pytest.importorskip("psutil")
    images = digits[:600]
    images_path = tmp_path / "images.npy"
    np.save(images_path, images)
    cfg = config(tmp_path, views=8, size=32, workers=2, max_array_mb=line)
    folder = Path(cfg.cache_dir)
    # A real build in its own process; each chunk is slowed down (the patched function is
    # inherited by the forked workers) so the kill surely lands mid-way on a busy machine.
    script = (
        "import time\n"
        "import numpy as np\n"
        "from imsvd.augment import cache\n"
        "from imsvd.config import AugmentConfig\n"
        "draw = cache.augment_images\n"
        "cache.augment_images = lambda *a: (time.sleep(0.2), draw(*a))[1]\n"
        f"images = np.load({str(images_path)!r})\n"
        f"cfg = AugmentConfig(views=8, size=32, workers=2, cache_dir={cfg.cache_dir!r}, max_array_mb={line})\n"
        "cache.build_view_cache(images, 'fp', cfg, progress=False)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 60
        while not list(folder.glob("*.tmp")):
            assert process.poll() is None, "the build ended before it could be killed"
            assert time.monotonic() < deadline, "the build never started"
            time.sleep(0.05)
        # Mid-way: both workers started (on a busy machine the pool forks well after the
        # temporary file or folder appears) and writing views.
        while len(workers := psutil.Process(process.pid).children()) < 2:
            assert process.poll() is None, "the build finished before it could be killed: give it more work"
            assert time.monotonic() < deadline, "the build's two workers never started"
            time.sleep(0.05)
        time.sleep(0.5)
        assert process.poll() is None, "the build finished before it could be killed: give it more work"
        assert len(workers) == 2
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=10) == -signal.SIGKILL
        # The workers die with the build (PR_SET_PDEATHSIG) instead of lingering.
        _, alive = psutil.wait_procs(workers, timeout=10)
        assert alive == []
    finally:
        if process.poll() is None:
            process.kill()
    assert list(folder.glob("*.tmp")), "the killed build should have left its temporary file or folder"
    assert not cache_paths(cfg)[1].exists()
    assert open_view_cache(cfg, "fp") is None
    result = build_view_cache(images, "fp", cfg, progress=False)
    assert not result.reused and result.manifest["format"] == ("array" if line else "shards")
    assert open_view_cache(cfg, "fp") is not None
    assert list(folder.glob("*.tmp")) == []


# --------------------------------------------------------------------------- sharded cache


def sharded(tmp_path: Path, **kwargs: object) -> AugmentConfig:
    """A config whose cache is always shards (``max_array_mb=0``)."""
    return config(tmp_path, **({"max_array_mb": 0.0} | kwargs))


def _chunk_digests(manifest: dict) -> dict[str, str]:
    """The shard files' SHA-256 but litdata's index, which records when it was written."""
    return {name: digest for name, digest in manifest["files"].items() if name != "index.json"}


@pytest.mark.parametrize("encode_above", [64, 0], ids=["raw", "png"])
@pytest.mark.parametrize("rgb", [False, True])
def test_sharded_cache_holds_the_array_caches_views(tmp_path: Path, rgb: bool, encode_above: int) -> None:
    # Noise, so that every view is distinct and names its image (digits repeat some crops).
    images = np.random.default_rng(0).integers(0, 256, (150, 12, 12, 3 if rgb else 1), dtype=np.uint8)
    array_cfg = config(tmp_path / "array", size=16, seed=3)
    shards_cfg = sharded(tmp_path / "shards", size=16, seed=3, encode_above=encode_above)
    array = build_view_cache(images, "fp", array_cfg, progress=False)
    shards = build_view_cache(images, "fp", shards_cfg, progress=False)
    assert (array.manifest["format"], shards.manifest["format"]) == ("array", "shards")
    assert shards.manifest["encoded"] is (encode_above == 0)
    assert shards.path == shards_path(shards_cfg) and shards.path.is_dir()
    assert not cache_paths(shards_cfg)[0].exists()
    assert sorted(shards.manifest["files"]) == sorted(p.name for p in shards.path.iterdir())
    views = open_view_cache(shards_cfg, "fp")
    assert isinstance(views, ShardedViews)
    assert views.shape == tuple(array.manifest["shape"]) == (150, 4, images.shape[-1], 16, 16)
    memmap = open_view_cache(array_cfg, "fp")
    assert isinstance(memmap, np.memmap)
    # Lossless both ways: the same views, byte for byte, in the same order.
    assert np.array_equal(views.read(np.arange(150)), np.asarray(memmap))
    # Training streams the shards: an epoch is every image once, as two different stored views.
    dataset, source = pair_dataset(images, "fp", shards_cfg, use_cache=True, seed=0)
    assert source == "cache" and isinstance(dataset, ShardPairs)
    where = {memmap[i, v].tobytes(): (i, v) for i in range(150) for v in range(4)}
    assert len(where) == 600  # every stored view is distinct, so a view names its image
    epochs = []
    loader = StreamingDataLoader(dataset, batch_size=50)  # one loader: it counts the epochs
    for _ in range(2):
        seen = []
        for one, two in loader:
            for a, b in zip(one, two, strict=True):
                (image, first), (same, second) = where[a.numpy().tobytes()], where[b.numpy().tobytes()]
                assert image == same and first != second
                seen.append((image, first, second))
        assert sorted(image for image, _, _ in seen) == list(range(150))
        epochs.append(seen)
    assert epochs[0] != epochs[1]  # a fresh shuffle and fresh pairs each epoch


def test_png_shards_are_smaller_for_large_views(tmp_path: Path, digits_rgb: np.ndarray) -> None:
    images = digits_rgb[:60]
    raw = build_view_cache(images, "fp", sharded(tmp_path / "raw", size=64), progress=False)
    png = build_view_cache(images, "fp", sharded(tmp_path / "png", size=64, encode_above=32), progress=False)
    assert (raw.manifest["encoded"], png.manifest["encoded"]) == (False, True)
    assert disk_bytes(png.path) < 0.8 * disk_bytes(raw.path)


def test_sharded_cache_is_deterministic_for_any_number_of_workers(
    tmp_path: Path, digits_rgb: np.ndarray
) -> None:
    images = digits_rgb[:300]
    one = build_view_cache(images, "fp", sharded(tmp_path / "one", workers=1), progress=False)
    two = build_view_cache(images, "fp", sharded(tmp_path / "two", workers=2), progress=False)
    assert _chunk_digests(one.manifest) == _chunk_digests(two.manifest) != {}
    assert (
        json.loads((one.path / "index.json").read_text())["chunks"]
        == json.loads((two.path / "index.json").read_text())["chunks"]
    )


def test_sharded_cache_is_reused_and_switches_format_with_the_line(
    tmp_path: Path, digits: np.ndarray
) -> None:
    images = digits[:80]
    cfg = sharded(tmp_path)
    first = build_view_cache(images, "fp", cfg, progress=False)
    second = build_view_cache(images, "fp", sharded(tmp_path, workers=2), progress=False)
    assert second.reused and second.manifest == first.manifest
    # 80 images x 4 views x 16 x 16 is 0.08 MiB: above a line of 0.05, below one of 1.
    as_array = config(tmp_path, max_array_mb=1.0)
    assert open_view_cache(as_array, "fp") is None
    array = build_view_cache(images, "fp", as_array, progress=False)
    assert not array.reused and array.reason.startswith("format changed")
    assert array.manifest["format"] == "array" and not shards_path(cfg).exists()
    back = build_view_cache(images, "fp", config(tmp_path, max_array_mb=0.05), progress=False)
    assert not back.reused and back.manifest["format"] == "shards"
    assert not cache_paths(cfg)[0].exists()
    assert _chunk_digests(back.manifest) == _chunk_digests(first.manifest)  # the same views, written again
    encoded = sharded(tmp_path, encode_above=8)
    rebuilt = build_view_cache(images, "fp", encoded, progress=False)
    assert rebuilt.reason.startswith("encoding changed") and rebuilt.manifest["encoded"]


def _first_chunk(folder: Path) -> Path:
    return sorted(folder.glob("*.bin"))[0]


@pytest.mark.parametrize(
    "damage",
    [
        lambda folder: _flip_bytes(_first_chunk(folder)),
        lambda folder: _truncate(_first_chunk(folder)),
        lambda folder: _first_chunk(folder).unlink(),
        lambda folder: (folder / "index.json").write_text("{}"),
    ],
    ids=["flipped", "truncated", "chunk-removed", "index-rewritten"],
)
def test_damaged_shards_are_detected_and_rebuilt(tmp_path: Path, digits: np.ndarray, damage) -> None:
    cfg = sharded(tmp_path)
    first = build_view_cache(digits[:40], "fp", cfg, progress=False)
    damage(first.path)
    manifest, reason = check_view_cache(cfg, "fp")
    assert manifest is None and ("checksum" in reason or "cannot be read" in reason)
    assert open_view_cache(cfg, "fp") is None
    second = build_view_cache(digits[:40], "fp", cfg, progress=False)
    assert not second.reused and _chunk_digests(second.manifest) == _chunk_digests(first.manifest)
    assert check_view_cache(cfg, "fp")[1] == "valid"


@pytest.mark.slow
def test_sharded_cache_reads_keep_mapped_memory_flat(tmp_path: Path) -> None:
    """Reading every view of a 126 MiB cache: the array's pages stay mapped (RSS grows by
    the whole cache), the shards' chunks are read a few at a time (litdata maps at most 4
    chunks of CHUNK_BYTES)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5400, 16, 16, 3), dtype=np.uint8)
    size = 5400 * 2 * 3 * 64 * 64
    script = (
        "import sys, numpy as np\n"
        "from litdata import StreamingDataLoader\n"
        "from imsvd.augment import CachedPairDataset, ShardPairs, open_view_cache\n"
        "from imsvd.config import AugmentConfig\n"
        "def rss_file():\n"
        "    line = next(l for l in open('/proc/self/status') if l.startswith('RssFile'))\n"
        "    return int(line.split()[1]) * 1024\n"
        "cfg = AugmentConfig(views=2, size=64, cache_dir=sys.argv[1], max_array_mb=float(sys.argv[2]))\n"
        "views = open_view_cache(cfg, 'fp')\n"
        "before = rss_file()\n"
        "if isinstance(views, np.ndarray):\n"
        "    dataset = CachedPairDataset(views, 0)\n"
        "    for start in range(0, len(dataset), 256):\n"
        "        dataset.__getitems__(list(range(start, min(len(dataset), start + 256))))\n"
        "else:\n"
        "    for batch in StreamingDataLoader(ShardPairs(views, 0), batch_size=256):\n"
        "        pass\n"
        "print(rss_file() - before)\n"
    )
    growth = {}
    for name, line in (("array", 2048.0), ("shards", 0.0)):
        cfg = AugmentConfig(views=2, size=64, workers=2, cache_dir=str(tmp_path / name), max_array_mb=line)
        assert build_view_cache(images, "fp", cfg, progress=False).manifest["format"] == name
        out = subprocess.run(
            [sys.executable, "-c", script, cfg.cache_dir, str(line)],
            capture_output=True,
            text=True,
            check=True,
        )
        growth[name] = int(out.stdout.split()[-1])
    assert growth["array"] > 0.9 * size, growth
    assert growth["shards"] < 4 * 16 * 2**20 + 8 * 2**20, growth
    assert growth["shards"] < 0.6 * growth["array"], growth


# --------------------------------------------------------------------------- datasets


def _labelled_views(n: int, v: int) -> np.ndarray:
    """(n, v, 1, 2, 2) views whose pixels encode (image, view) as ``image * v + view``."""
    codes = np.arange(n * v, dtype=np.int64).reshape(n, v) % 256
    return np.broadcast_to(codes[:, :, None, None, None], (n, v, 1, 2, 2)).astype(np.uint8)


def test_pair_indices_are_two_different_views() -> None:
    first, second = pair_indices(0, 0, np.arange(10_000), 3)
    assert np.all(first != second)
    assert set(first.tolist()) == {0, 1, 2} and set(second.tolist()) == {0, 1, 2}
    # Every ordered pair of two different views turns up about equally often.
    pairs, counts = np.unique(first * 3 + second, return_counts=True)
    assert len(pairs) == 6 and counts.min() > 0.8 * counts.max()


def test_cached_pairs_are_two_views_of_the_same_image() -> None:
    views = _labelled_views(40, 4)
    dataset = CachedPairDataset(views, seed=3)
    assert len(dataset) == 40
    for index in range(40):
        a, b = dataset[index]
        assert a.shape == (1, 2, 2) and a.dtype == torch.uint8
        code_a, code_b = int(a[0, 0, 0]), int(b[0, 0, 0])
        assert code_a // 4 == code_b // 4 == index
        assert code_a != code_b


def test_cached_pairs_change_across_epochs_and_are_reproducible() -> None:
    views = _labelled_views(60, 8)
    dataset = CachedPairDataset(views, seed=0)

    def epoch_pairs(epoch: int) -> list[tuple[int, int]]:
        dataset.set_epoch(epoch)
        return [(int(a[0, 0, 0]), int(b[0, 0, 0])) for a, b in (dataset[i] for i in range(60))]

    first, second = epoch_pairs(0), epoch_pairs(1)
    assert first != second
    assert sum(p != q for p, q in zip(first, second, strict=True)) > 30
    assert epoch_pairs(0) == first
    assert [(int(a[0, 0, 0]), int(b[0, 0, 0])) for a, b in CachedPairDataset(views, seed=1)] != first


def test_cached_pairs_through_a_dataloader_with_workers() -> None:
    views = _labelled_views(50, 4)
    dataset = CachedPairDataset(views, seed=5)
    dataset.set_epoch(2)
    expected = [dataset[i] for i in range(50)]
    loader = torch.utils.data.DataLoader(dataset, batch_size=16, num_workers=2)
    a, b = (torch.cat(parts) for parts in zip(*loader, strict=True))
    assert a.shape == (50, 1, 2, 2)
    assert torch.equal(a, torch.stack([e[0] for e in expected]))
    assert torch.equal(b, torch.stack([e[1] for e in expected]))


def test_cached_dataset_rejects_one_view() -> None:
    with pytest.raises(DataError):
        CachedPairDataset(np.zeros((4, 1, 1, 2, 2), np.uint8), seed=0)


@pytest.mark.parametrize("rgb", [False, True])
def test_on_the_fly_pairs(digits: np.ndarray, digits_rgb: np.ndarray, rgb: bool) -> None:
    images = (digits_rgb if rgb else digits)[:20]
    dataset = OnTheFlyPairDataset(images, AugmentConfig(size=16), seed=0)
    torch.manual_seed(1)
    state = torch.get_rng_state()
    a, b = dataset[3]
    assert torch.equal(torch.get_rng_state(), state)
    assert a.shape == b.shape == (images.shape[-1], 16, 16) and a.dtype == torch.uint8
    assert not torch.equal(a, b)
    again = dataset[3]
    assert torch.equal(again[0], a) and torch.equal(again[1], b)
    dataset.set_epoch(1)
    assert not torch.equal(dataset[3][0], a)


def test_pair_dataset_prefers_a_valid_cache(tmp_path: Path, digits: np.ndarray) -> None:
    cfg = config(tmp_path)
    images = digits[:30]
    dataset, kind = pair_dataset(images, "fp", cfg, use_cache=True, seed=0)
    assert kind == "on-the-fly" and isinstance(dataset, OnTheFlyPairDataset)
    build_view_cache(images, "fp", cfg, progress=False)
    dataset, kind = pair_dataset(images, "fp", cfg, use_cache=True, seed=0)
    assert kind == "cache" and isinstance(dataset, CachedPairDataset)
    a, b = dataset[0]
    assert a.shape == (1, 16, 16)
    assert pair_dataset(images, "fp", cfg, use_cache=False, seed=0)[1] == "on-the-fly"
    assert pair_dataset(images, "other", cfg, use_cache=True, seed=0)[1] == "on-the-fly"


# --------------------------------------------------------------------------- device side


def test_channel_stats_match_numpy(digits_rgb: np.ndarray) -> None:
    mean, std = channel_stats(digits_rgb, chunk_mb=0.01)  # many chunks of about 50 images
    pixels = digits_rgb.reshape(-1, 3) / 255.0
    np.testing.assert_allclose(mean, pixels.mean(axis=0), rtol=1e-10)
    np.testing.assert_allclose(std, pixels.std(axis=0), rtol=1e-8)
    assert len(channel_stats(digits_rgb[..., :1])[0]) == 1


def test_channel_stats_hold_no_float_copy_of_a_chunk() -> None:
    """The statistics of photos read from the store must not cost 24x a chunk (a float64
    copy, its square and its scaled copy were the peak of pretraining on photos)."""
    import tracemalloc

    images = np.random.default_rng(0).integers(0, 256, size=(64, 128, 128, 3), dtype=np.uint8)  # 3 MiB
    tracemalloc.start()
    try:
        mean, _ = channel_stats(images, chunk_mb=1.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * 2**20, f"{peak / 2**20:.1f} MiB traced for 1 MiB chunks"
    np.testing.assert_allclose(mean, images.reshape(-1, 3).mean(0) / 255, rtol=1e-12)


def test_normalize() -> None:
    batch = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 1, 1, 3)
    out = normalize(batch, (0.2,), (0.5,))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.flatten(), torch.tensor([-0.4, 0.0, 1.6]))


def test_training_and_evaluation_inputs_are_normalised_alike(digits_rgb: np.ndarray) -> None:
    """What evaluation feeds the encoder equals what training feeds it for the same pixels."""
    from imsvd.config import PretrainConfig
    from imsvd.training.module import PretrainModule
    from imsvd.training.resume import RunIdentity

    images = digits_rgb[:5]
    mean, std = channel_stats(images)
    cfg = PretrainConfig(width=0.125, projector="64-64", device_flip=False)
    module = PretrainModule(cfg, 3, mean, std, 1, RunIdentity("x", "y"))
    batch = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    trained_on, _ = module.on_after_batch_transfer((batch, batch), 0)
    evaluated_on = model_input(images, 8, mean, std)  # 8x8 already: no resampling
    torch.testing.assert_close(trained_on, evaluated_on, rtol=0, atol=0)


def test_random_hflip_is_per_image_and_seeded() -> None:
    batch = torch.arange(64 * 3 * 2 * 4, dtype=torch.int64).view(64, 3, 2, 4).to(torch.uint8)
    out = random_hflip(batch, torch.Generator().manual_seed(0))
    flipped = torch.tensor([torch.equal(o, b.flip(-1)) for o, b in zip(out, batch, strict=True)])
    kept = torch.tensor([torch.equal(o, b) for o, b in zip(out, batch, strict=True)])
    assert torch.all(flipped ^ kept)
    assert 10 < int(flipped.sum()) < 54
    assert torch.equal(out, random_hflip(batch, torch.Generator().manual_seed(0)))


# --------------------------------------------------------------------------- node and pipeline


def _image_data(images: np.ndarray, n_train: int) -> ImageData:
    n = len(images)
    splits = np.array(["train"] * n_train + ["test"] * (n - n_train))
    return ImageData(images, np.zeros(n, np.int64), splits, np.array([f"d/{i}" for i in range(n)]), ("x",))


def _passed(data: object) -> dict:
    """A successful validation report for ``data``."""
    return {"success": True, "fingerprint": getattr(data, "fingerprint", None)}


def test_node_builds_from_the_training_split(tmp_path: Path, digits: np.ndarray) -> None:
    from imsvd_pipelines.augment.nodes import build_view_cache as node

    data = _image_data(digits[:40], n_train=30)
    params = {"views": 3, "workers": 1, "cache_dir": str(tmp_path / "cache")}
    manifest = node(data, _passed(data), params)
    assert manifest["shape"] == [30, 3, 1, 16, 16]
    assert manifest["fingerprint"] == data.fingerprint
    assert node(data, _passed(data), params) == manifest


def test_node_refuses_bad_input(tmp_path: Path, digits: np.ndarray) -> None:
    from imsvd_pipelines.augment.nodes import build_view_cache as node

    params = {"cache_dir": str(tmp_path)}
    good = _image_data(digits[:4], 3)
    with pytest.raises(ConfigError, match="augment.view"):
        node(good, _passed(good), {"view": 2})
    with pytest.raises(DataError, match="image data"):
        node(digits[:4], _passed(None), params)  # type: ignore[arg-type]
    one_train = _image_data(digits[:4], 1)
    with pytest.raises(DataError, match="at least 2"):
        node(one_train, _passed(one_train), params)
    two_channels = _image_data(np.zeros((4, 8, 8, 2), np.uint8), 3)
    with pytest.raises(DataError, match="C 1 or 3"):
        node(two_channels, _passed(two_channels), params)
    with pytest.raises(DataError, match="last validation failed"):
        node(good, {"success": False, "message": "bad"}, params)
    with pytest.raises(DataError, match="fingerprints differ"):
        node(good, _passed(one_train), params)


def test_pipeline_runs_on_a_real_catalog(tmp_path: Path, digits: np.ndarray) -> None:
    from imsvd_pipelines.augment import create_pipeline
    from imsvd_pipelines.datasets import AtomicJSONDataset, ImageArraysDataset
    from kedro.io import DataCatalog, MemoryDataset
    from kedro.runner import SequentialRunner

    pipeline = create_pipeline()
    assert [n.name for n in pipeline.nodes] == ["build_view_cache"]
    assert pipeline.inputs() == {"validated_images", "validation_report", "params:augment"}
    assert pipeline.outputs() == {"view_cache_manifest"}
    images = ImageArraysDataset(filepath=str(tmp_path / "images.npz"))
    data = _image_data(digits[:20], n_train=16)
    images.save(data)
    manifest_path = tmp_path / "view_cache.json"
    catalog = DataCatalog(
        {
            "validated_images": images,
            "validation_report": MemoryDataset(_passed(data)),
            "params:augment": MemoryDataset({"views": 2, "workers": 1, "cache_dir": str(tmp_path / "c")}),
            "view_cache_manifest": AtomicJSONDataset(filepath=str(manifest_path)),
        }
    )
    SequentialRunner().run(pipeline, catalog)
    manifest = json.loads(manifest_path.read_text())
    assert manifest["shape"] == [16, 2, 1, 16, 16] and manifest["fingerprint"] == data.fingerprint


def test_at_most_shrinks_only_large_images_and_model_input_then_sees_the_same_pixels() -> None:
    from imsvd.preprocess import at_most, model_input

    rng = np.random.default_rng(3)
    large = rng.integers(0, 256, (70, 40, 36, 3), dtype=np.uint8)
    kept = at_most(large, 16, batch_size=32)
    assert kept.shape == (70, 16, 16, 3) and kept.dtype == np.uint8
    mean, std = (0.5,) * 3, (0.25,) * 3
    assert torch.equal(model_input(kept, 16, mean, std), model_input(large, 16, mean, std))
    small = large[:, :8, :8]
    np.testing.assert_array_equal(at_most(small, 16), small)  # never upsampled to be kept
