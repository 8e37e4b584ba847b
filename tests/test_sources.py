"""Data sources: digits, Fashion-MNIST IDX files and image folders, good and bad."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import write_image
from imsvd.config import DataConfig
from imsvd.data import MEAN_BLOCK, pixel_mean
from imsvd.errors import DataError
from imsvd.sources import (
    FASHION_MNIST_CLASSES,
    load_digits,
    load_fashion_mnist,
    load_image_folder,
    load_source,
    most_common_size,
    parse_idx,
    scale_digits,
)

SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


# --- pixel statistics ---------------------------------------------------------------


@pytest.mark.parametrize(
    "shape",
    [(7, 5, 1), (288, 288, 3), (MEAN_BLOCK // 2, 1, 3)],  # the last: 1.5 blocks, 25 MB
    ids=["small", "photo", "over-a-block"],
)
def test_pixel_mean_is_numpys_float64_mean_exactly(shape):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=shape, dtype=np.uint8)
    assert pixel_mean(image) == image.mean(dtype=np.float64)
    # All 255: one uint32 sum over more than MEAN_BLOCK bytes would wrap round.
    white = np.full(shape, 255, dtype=np.uint8)
    assert pixel_mean(white) == 255.0
    assert np.isnan(pixel_mean(np.zeros((0, 4, 3), dtype=np.uint8)))


# --- digits -------------------------------------------------------------------------


def test_scale_digits_maps_0_16_onto_0_255():
    assert scale_digits(np.array([0.0, 8.0, 16.0])).tolist() == [0, 128, 255]


def test_digits_are_the_bundled_set_split_stratified_and_seeded():
    data = load_digits(test_size=0.25, seed=0)
    assert data.images.shape == (1797, 8, 8, 1) and data.images.dtype == np.uint8
    assert data.images.max() == 255
    assert data.ids[0] == "digits/0" and data.ids[-1] == "digits/1796"
    assert data.class_names == tuple(str(i) for i in range(10))
    test = data.labels[data.splits == "test"]
    assert len(test) == 450
    assert np.bincount(test, minlength=10).min() >= 40  # stratified: every digit in test
    again = load_digits(test_size=0.25, seed=0)
    assert np.array_equal(again.splits, data.splits)
    assert not np.array_equal(load_digits(test_size=0.25, seed=1).splits, data.splits)


def test_load_source_digits_originals_are_the_images():
    source = load_source(DataConfig())
    assert len(source.originals) == 1797
    assert source.originals[0].height == 8 and source.originals[0].mode == "L"


# --- Fashion-MNIST ------------------------------------------------------------------


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """A valid IDX file of unsigned bytes (magic 0x0000 08 <ndim>)."""
    header = (magic if magic is not None else 0x0800 + array.ndim).to_bytes(4, "big")
    dims = b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + dims + array.astype(np.uint8).tobytes()


def write_fashion(folder: Path, compressed: bool = True, n_train: int = 6, n_test: int = 3) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": np.arange(n_test) % 10,
    }
    for stem, array in arrays.items():
        raw = idx_bytes(array)
        if compressed:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / stem).write_bytes(raw)
    return folder


@pytest.mark.parametrize("compressed", [True, False])
def test_fashion_mnist_reads_idx_files(tmp_path, compressed):
    folder = write_fashion(tmp_path / "fm", compressed=compressed)
    data = load_fashion_mnist(folder)
    assert data.images.shape == (9, 28, 28, 1)
    assert data.splits.tolist() == ["train"] * 6 + ["test"] * 3
    assert data.labels.tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2]
    assert data.ids[0] == "fashion_mnist/train/0" and data.ids[-1] == "fashion_mnist/test/2"
    assert data.class_names[0] == "T-shirt/top" and data.class_names[-1] == "Ankle boot"


def test_fashion_mnist_wrong_magic_names_the_file(tmp_path):
    folder = write_fashion(tmp_path / "fm")
    bad = folder / "train-labels-idx1-ubyte.gz"
    bad.write_bytes(gzip.compress(idx_bytes(np.arange(6), magic=2051)))
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz.*magic number 2051, expected 2049"):
        load_fashion_mnist(folder)


def test_fashion_mnist_truncated_payload_names_the_file(tmp_path):
    folder = write_fashion(tmp_path / "fm", compressed=False)
    path = folder / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte: truncated IDX"):
        load_fashion_mnist(folder)


def test_fashion_mnist_truncated_gzip_names_the_file(tmp_path):
    folder = write_fashion(tmp_path / "fm")
    path = folder / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz"):
        load_fashion_mnist(folder)


def test_fashion_mnist_missing_file_and_folder(tmp_path):
    folder = write_fashion(tmp_path / "fm")
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        load_fashion_mnist(folder)
    with pytest.raises(DataError, match="data.path"):
        load_fashion_mnist(tmp_path / "nowhere")


def test_parse_idx_refuses_trailing_bytes_and_tiny_files():
    with pytest.raises(DataError, match="oversized"):
        parse_idx(idx_bytes(np.arange(3)) + b"x", 2049, "labels")
    with pytest.raises(DataError, match="truncated"):
        parse_idx(b"\x00\x00", 2049, "labels")


@pytest.mark.skipif(not SYSTEM_FASHION_MNIST.is_dir(), reason="Debian's dataset-fashion-mnist not installed")
def test_system_fashion_mnist():  # pragma: no cover - depends on the machine
    data = load_fashion_mnist(SYSTEM_FASHION_MNIST)
    assert data.images.shape == (70000, 28, 28, 1)
    assert data.class_names == FASHION_MNIST_CLASSES


# --- image folders: good ------------------------------------------------------------


def test_image_folder_reads_classes_splits_and_ids(make_image_folder):
    root = make_image_folder(classes=("cat", "dog"), train_per_class=3, test_per_class=2)
    source = load_image_folder(root, max_image_pixels=10_000)
    data = source.data
    assert data.images.shape == (10, 8, 8, 1)
    assert data.class_names == ("cat", "dog")
    assert data.ids[0] == "train/cat/000.png" and data.ids[-1] == "test/dog/001.png"
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1, 0, 0, 1, 1]
    assert (data.splits == "train").sum() == 6
    original = np.asarray(Image.open(root / "train/cat/000.png"))
    assert np.array_equal(data.images[0, ..., 0], original)


def test_image_folder_unlabelled_train(tmp_path, make_image_folder):
    root = make_image_folder(train_per_class=0, test_per_class=2)
    for i in range(3):
        write_image(root / "train" / f"{i}.png", np.full((8, 8), 10 * i, np.uint8))
    for class_dir in (root / "train").iterdir():
        if class_dir.is_dir():
            class_dir.rmdir()
    data = load_image_folder(root, 10_000).data
    assert data.labels[data.splits == "train"].tolist() == [-1, -1, -1]
    assert data.class_names == ("cat", "dog")
    assert data.ids[0] == "train/0.png"


def test_image_folder_resizes_to_the_most_common_size_and_keeps_originals(make_image_folder):
    root = make_image_folder(train_per_class=3, test_per_class=2)
    write_image(root / "train/cat/big.png", np.full((16, 12), 77, np.uint8))
    source = load_image_folder(root, 10_000)
    index = list(source.data.ids).index("train/cat/big.png")
    assert source.data.images.shape[1:] == (8, 8, 1)
    assert (source.data.images[index] == 77).all()
    assert (source.originals[index].height, source.originals[index].width) == (16, 12)
    assert most_common_size([(2, 2), (3, 3), (3, 3), (2, 2)]) == (2, 2)


def test_sixteen_bit_images_keep_the_high_byte(make_image_folder):
    root = make_image_folder()
    values = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)
    path = root / "train/cat/deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    source = load_image_folder(root, 10_000)
    index = list(source.data.ids).index("train/cat/deep.png")
    assert np.array_equal(source.data.images[index, ..., 0], (values >> 8).astype(np.uint8))
    assert source.originals[index].mode.startswith("I")


def test_palette_and_rgba_images_become_rgb(tmp_path, make_image_folder):
    root = make_image_folder()
    # Replace every image by an RGB-ish one so the channel count agrees.
    rng = np.random.default_rng(1)
    for path in sorted(root.rglob("*.png")):
        write_image(path, rng.integers(0, 256, (8, 8, 3)).astype(np.uint8))
    palette = Image.new("P", (8, 8))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((0, 0), 1)
    palette.save(root / "train/cat/palette.png")
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 1] = 200
    rgba[..., 3] = 10
    Image.fromarray(rgba, "RGBA").save(root / "train/dog/alpha.png")
    source = load_image_folder(root, 10_000)
    ids = list(source.data.ids)
    pal = source.data.images[ids.index("train/cat/palette.png")]
    assert pal.shape == (8, 8, 3)
    assert pal[0, 0].tolist() == [0, 0, 255] and pal[1, 1].tolist() == [255, 0, 0]
    alpha = source.data.images[ids.index("train/dog/alpha.png")]
    assert alpha[0, 0].tolist() == [0, 200, 0]
    assert source.originals[ids.index("train/dog/alpha.png")].mode == "RGBA"


# --- image folders: bad -------------------------------------------------------------


def _png_bytes(tmp_path: Path) -> bytes:
    path = write_image(tmp_path / "scratch.png", np.arange(64, dtype=np.uint8).reshape(8, 8))
    data = path.read_bytes()
    path.unlink()
    return data


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("zero.png", lambda png: b""),
        ("truncated.png", lambda png: png[: len(png) // 2]),
        ("corrupt.png", lambda png: png[:40] + b"\x00" * 40 + png[80:]),
        ("text.png", lambda png: b"this is not an image\n"),
    ],
)
def test_unreadable_files_are_named(tmp_path, make_image_folder, name, content):
    root = make_image_folder()
    bad = root / "train" / "cat" / name
    bad.write_bytes(content(_png_bytes(tmp_path)))
    with pytest.raises(DataError, match="unreadable") as info:
        load_image_folder(root, 10_000)
    assert str(bad) in str(info.value)


def test_all_unreadable_files_are_reported_together(tmp_path, make_image_folder):
    root = make_image_folder()
    for i in range(8):
        (root / "test" / "dog" / f"bad{i}.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"8 unreadable image file\(s\).*bad0\.png.*and 3 more"):
        load_image_folder(root, 10_000)


@pytest.mark.parametrize("limit", [1000, 3000])  # Pillow's error (> 2x limit), then its warning
def test_decompression_bomb_is_refused(make_image_folder, limit):
    root = make_image_folder()
    write_image(root / "train/dog/huge.png", np.zeros((64, 64), np.uint8))
    previous = Image.MAX_IMAGE_PIXELS
    with pytest.raises(DataError, match=r"huge\.png.*data\.max_image_pixels"):
        load_image_folder(root, max_image_pixels=limit)
    assert previous == Image.MAX_IMAGE_PIXELS  # the global limit is restored


def test_empty_class_folder_is_named(make_image_folder):
    root = make_image_folder()
    (root / "train" / "bird").mkdir()
    with pytest.raises(DataError, match=r"train/bird holds no image files"):
        load_image_folder(root, 10_000)


def test_no_images_at_all(tmp_path):
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "test" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match=r"empty/train holds no image files"):
        load_image_folder(tmp_path / "empty", 10_000)


def test_missing_split_folder_is_named(make_image_folder):
    root = make_image_folder()
    for path in (root / "test").rglob("*.png"):
        path.unlink()
    for folder in (root / "test").iterdir():
        folder.rmdir()
    (root / "test").rmdir()
    with pytest.raises(DataError, match=r"missing split folder .*images/test"):
        load_image_folder(root, 10_000)


def test_missing_data_path_is_named(tmp_path):
    with pytest.raises(DataError, match="data.path"):
        load_image_folder(tmp_path / "absent", 10_000)


def test_unlabelled_test_is_refused(make_image_folder):
    root = make_image_folder()
    write_image(root / "test" / "loose.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(DataError, match=r"images/test mixes class folders and loose files"):
        load_image_folder(root, 10_000)


def test_test_without_class_folders_is_refused(make_image_folder):
    root = make_image_folder()
    for path in (root / "test").rglob("*.png"):
        path.rename(root / "test" / f"{path.parent.name}-{path.name}")
    for folder in [p for p in (root / "test").iterdir() if p.is_dir()]:
        folder.rmdir()
    with pytest.raises(DataError, match=r"images/test has no class folders"):
        load_image_folder(root, 10_000)


def test_floating_point_images_are_refused(make_image_folder):
    root = make_image_folder()
    Image.fromarray(np.zeros((8, 8), np.float32)).save(root / "train/cat/float.tif")
    with pytest.raises(DataError, match=r"float\.tif: floating-point mode F"):
        load_image_folder(root, 10_000)


def test_test_classes_unknown_to_train_are_named(make_image_folder):
    root = make_image_folder()
    write_image(root / "test" / "horse" / "0.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(DataError, match=r"test classes unknown to train: .*test/horse"):
        load_image_folder(root, 10_000)


def test_symlink_outside_data_path_is_refused(tmp_path, make_image_folder):
    root = make_image_folder()
    outside = write_image(tmp_path / "elsewhere" / "secret.png", np.zeros((8, 8), np.uint8))
    link = root / "train" / "cat" / "link.png"
    os.symlink(outside, link)
    with pytest.raises(DataError, match=r"symlinks resolving outside data\.path") as info:
        load_image_folder(root, 10_000)
    assert str(link) in str(info.value)


def test_symlink_inside_data_path_is_followed(make_image_folder):
    root = make_image_folder()
    os.symlink(root / "train/cat/000.png", root / "train/cat/link.png")
    data = load_image_folder(root, 10_000).data
    assert "train/cat/link.png" in data.ids.tolist()


def test_mixed_channel_counts_are_refused(make_image_folder):
    root = make_image_folder()
    write_image(root / "train/cat/colour.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(DataError, match=r"mix 1 and 3 channels.*train/cat/colour\.png"):
        load_image_folder(root, 10_000)


def test_non_image_extensions_are_skipped(make_image_folder):
    root = make_image_folder()
    (root / "train/cat/notes.txt").write_text("hello")
    (root / "train/cat/.DS_Store").write_bytes(b"\x00")
    assert len(load_image_folder(root, 10_000).data.ids) == 16


def test_load_source_image_folder_needs_a_path():
    with pytest.raises(Exception, match=r"data\.path"):
        DataConfig(source="image_folder")


def test_subsample_keeps_a_stratified_seeded_subset():
    from imsvd.config import DataConfig
    from imsvd.sources import load_source

    full = load_source(DataConfig()).data
    small = load_source(DataConfig(max_train=200, max_test=50)).data
    again = load_source(DataConfig(max_train=200, max_test=50)).data
    assert (small.splits == "train").sum() == 200 and (small.splits == "test").sum() == 50
    assert np.array_equal(small.ids, again.ids)
    assert set(small.ids) <= set(full.ids)
    counts = np.bincount(small.labels[small.splits == "train"], minlength=10)
    assert counts.min() >= 18 and counts.max() <= 22  # about 20 of each digit


def test_validation_holdout_takes_a_stratified_share_of_training_and_drops_the_test_images():
    from imsvd.config import DataConfig
    from imsvd.sources import load_source

    plain = load_source(DataConfig())
    held = load_source(DataConfig(holdout="validation", validation_size=0.2))
    train_ids = set(plain.data.ids[plain.data.splits == "train"])
    assert set(held.data.ids) == train_ids  # no test image is left
    validation = held.data.splits == "test"
    assert int(validation.sum()) == round(0.2 * len(train_ids))
    counts = np.bincount(held.data.labels[validation], minlength=10)
    assert counts.min() >= 25 and counts.max() <= 29  # stratified: about 27 of each digit
    again = load_source(DataConfig(holdout="validation", validation_size=0.2))
    assert (again.data.ids[again.data.splits == "test"] == held.data.ids[validation]).all()
    assert len(held.originals) == len(held.data.ids)


def _many_images(root: Path, n: int, seed: int = 0) -> None:
    """``n`` train and ``n // 4`` test images of two classes, PNG and JPEG, three sizes."""
    rng = np.random.default_rng(seed)
    sizes = [(12, 12), (12, 12), (10, 14)]
    for split, count in (("train", n), ("test", n // 4)):
        for i in range(count):
            h, w = sizes[i % len(sizes)]
            pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            folder = root / split / ("cat" if i % 2 else "dog")
            folder.mkdir(parents=True, exist_ok=True)
            suffix = "png" if i % 3 else "jpg"
            Image.fromarray(pixels).save(folder / f"{i:04d}.{suffix}")


def test_parallel_decoding_gives_the_same_images_as_one_process(tmp_path):
    from imsvd import decoding

    root = tmp_path / "many"
    _many_images(root, 4 * decoding.MIN_PARALLEL_FILES)
    one = load_image_folder(root, 10_000_000, workers=1)
    two = load_image_folder(root, 10_000_000, workers=2)
    assert one.data.images.shape == (5 * decoding.MIN_PARALLEL_FILES, 12, 12, 3)
    np.testing.assert_array_equal(two.data.images, one.data.images)
    np.testing.assert_array_equal(two.data.ids, one.data.ids)
    assert two.originals == one.originals
    assert {o.width for o in two.originals} == {12, 14}  # the originals keep their own size


def test_parallel_decoding_names_every_unreadable_file(tmp_path):
    from imsvd import decoding

    root = tmp_path / "many"
    _many_images(root, 2 * decoding.MIN_PARALLEL_FILES)
    good = sorted((root / "train" / "cat").glob("*.png"))
    good[0].write_bytes(good[0].read_bytes()[:60])  # a header that reads, pixels that do not
    (root / "train" / "dog" / "text.png").write_bytes(b"not an image")  # no header at all
    with pytest.raises(DataError, match=r"2 unreadable image file\(s\)") as info:
        load_image_folder(root, 10_000_000, workers=2)
    assert str(good[0]) in str(info.value) and "text.png" in str(info.value)


def test_mixed_channels_and_unreadable_files_are_reported_together(make_image_folder):
    root = make_image_folder()
    write_image(root / "train/cat/colour.png", np.zeros((8, 8, 3), np.uint8))
    (root / "train" / "dog" / "text.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"1 unreadable image file.*text\.png.*mix 1 and 3 channels"):
        load_image_folder(root, 10_000)


def _frozen_objects(segment: int, start: int, stop: int) -> list[tuple[int, None]]:
    import gc

    return [(gc.get_freeze_count(), None)] * (stop - start)


def test_decoding_workers_leave_the_parents_objects_to_the_collector_frozen(tmp_path):
    """The forked workers inherit the parent's per-file tables with the collector kept off
    them (gc.freeze, so a child's collection does not copy their pages), and the parent
    gets them back to its collector once the pool has ended."""
    import gc

    from imsvd import decoding

    tables = [{"path": f"file-{i}"} for i in range(50_000)]  # like the parent's per-file records
    files = decoding.MIN_PARALLEL_FILES
    assert gc.get_freeze_count() == 0
    bounds = decoding.segments(files)
    counts = [n for n, reason in decoding.map_segments(_frozen_objects, bounds, 10**8, workers=2)]
    assert len(counts) == files
    assert min(counts) > len(tables)  # every worker saw at least the tables frozen
    assert gc.get_freeze_count() == 0
