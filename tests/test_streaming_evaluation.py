"""Evaluation on features larger than memory: memory-mapped features, kNN over chunks of
the training set, and the mini-batch linear probe against the full-batch one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from imsvd import metrics as ev
from imsvd.inference import extract_features
from imsvd.models import build_encoder


def _memmap(array: np.ndarray, path: Path) -> np.memmap:
    mapped = np.lib.format.open_memmap(path, mode="w+", dtype=array.dtype, shape=array.shape)
    mapped[:] = array
    mapped.flush()
    return np.load(path, mmap_mode="r")


def test_knn_over_training_chunks_equals_one_pass(tmp_path):
    rng = np.random.default_rng(0)
    train = rng.normal(size=(3000, 24)).astype(np.float32)
    labels = rng.integers(0, 7, 3000)
    test = rng.normal(size=(500, 24)).astype(np.float32)
    whole = ev.knn_scores(train, labels, test, k=20)
    mapped = _memmap(train, tmp_path / "train.npy")
    for chunk, train_chunk in ((64, 999), (500, 7), (1, 3000)):
        chunked = ev.knn_scores(mapped, labels, test, k=20, chunk_size=chunk, train_chunk_size=train_chunk)
        torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)
    # k above a chunk's rows, and above the training set
    torch.testing.assert_close(
        ev.knn_scores(mapped, labels, test, k=200, train_chunk_size=33),
        ev.knn_scores(train, labels, test, k=200),
    )
    assert ev.knn_scores(train[:5], labels[:5], test, k=50, train_chunk_size=2).sum(1).gt(0).all()


def test_code_knn_over_training_chunks_equals_one_pass():
    rng = np.random.default_rng(1)
    bins = 8
    train = rng.integers(0, bins, size=(2000, 12))
    labels = rng.integers(0, 5, 2000)
    test = rng.integers(0, bins, size=(300, 12))
    whole = ev.code_knn_scores(train, labels, test, bins, k=20)
    chunked = ev.code_knn_scores(train, labels, test, bins, k=20, chunk_size=50, train_chunk_size=130)
    # Agreement counts tie often, and which tied neighbour is kept is arbitrary either way;
    # the k similarities kept, hence each row's total vote, are the same.
    torch.testing.assert_close(chunked.sum(1), whole.sum(1))
    # Codes that copy their class's prototype but for one block: the neighbours are the class.
    prototypes = rng.integers(0, bins, size=(5, 12))
    noisy = prototypes[labels].copy()
    noisy[np.arange(2000), rng.integers(0, 12, 2000)] = rng.integers(0, bins, 2000)
    clean = ev.code_knn_scores(noisy, labels, prototypes, bins, k=20, train_chunk_size=130)
    assert (clean.argmax(1).numpy() == np.arange(5)).all()


def test_features_beyond_the_budget_are_memory_maps_with_the_same_values(tmp_path):
    torch.manual_seed(0)
    encoder = build_encoder("resnet18_cifar", 0.125, (64, 64), 1)
    images = np.random.default_rng(2).integers(0, 256, size=(300, 16, 16, 1), dtype=np.uint8)
    args = (encoder, images, 16, [0.5], [0.25], 128)
    in_memory = extract_features(*args)
    scratch = tmp_path / "scratch"
    mapped = extract_features(*args, max_in_memory_mb=0.01, scratch=scratch)
    assert not isinstance(in_memory.backbone, np.memmap)
    assert isinstance(mapped.backbone, np.memmap) and isinstance(mapped.projector, np.memmap)
    np.testing.assert_allclose(mapped.backbone, in_memory.backbone, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mapped.projector, in_memory.projector, rtol=1e-5, atol=1e-6)
    assert list(scratch.iterdir()) == []  # unlinked once mapped: nothing left behind
    within = extract_features(*args, max_in_memory_mb=100, scratch=scratch)
    assert not isinstance(within.backbone, np.memmap)


def test_the_mini_batch_probe_matches_the_full_batch_one_on_digits(tmp_path):
    """Where both run, within the issue's 0.5 points; and it reads memory maps."""
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    order = np.random.default_rng(3).permutation(len(y))
    x, y = x[order], y[order]
    train, test = slice(0, 1200), slice(1200, None)
    full = ev.linear_probe(x[train], y[train], x[test], y[test])
    mapped = _memmap(x[train], tmp_path / "x.npy")
    budget = 0.5 * mapped.nbytes * ev.FULL_BATCH_BYTES / 4 / 2**20  # half of what full batch needs
    mini = ev.linear_probe(
        mapped, y[train], x[test], y[test], memory_budget_mb=budget, batch_size=128, minibatch_epochs=30
    )
    assert full[1] > 0.9
    assert abs(mini[1] - full[1]) <= 0.005 + 1e-9, (mini, full)
    again = ev.linear_probe(
        mapped, y[train], x[test], y[test], memory_budget_mb=budget, batch_size=128, minibatch_epochs=30
    )
    assert again == mini  # seeded


def test_column_statistics_in_chunks_match_numpy():
    x = np.random.default_rng(4).normal(loc=1e4, scale=3.0, size=(1001, 5))
    mean, std = ev._column_stats(x, batch_size=97)
    np.testing.assert_allclose(mean.numpy(), x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(std.numpy(), x.std(0), rtol=1e-9)


@pytest.mark.parametrize("name", ["linear_batch_size", "linear_minibatch_epochs", "memory_budget_mb"])
def test_the_streaming_settings_are_checked(name):
    from imsvd.config import EvaluateConfig, parse
    from imsvd.errors import ConfigError

    with pytest.raises(ConfigError, match=f"evaluate.{name}"):
        parse(EvaluateConfig, {name: 0}, "evaluate")


def _pixels(images, side, **kwargs):
    from imsvd.inference import embed_split

    return embed_split([], images, side, (), (), pixels=True, **kwargs)[1]


def test_raw_pixels_keep_small_images_and_shrink_large_ones_to_the_encoder_input(tmp_path):
    from imsvd.preprocess import model_input

    rng = np.random.default_rng(2)
    small = rng.integers(0, 256, (50, 8, 8, 1), dtype=np.uint8)
    kept = _pixels(small, 16)
    assert kept.dtype == np.uint8
    np.testing.assert_array_equal(kept, small.reshape(50, -1))
    large = rng.integers(0, 256, (40, 48, 40, 3), dtype=np.uint8)
    shrunk = _pixels(large, 16, batch_size=7, max_in_memory_mb=0.01, scratch=tmp_path)
    assert isinstance(shrunk, np.memmap) and shrunk.shape == (40, 16 * 16 * 3)  # over the budget: on disk
    # the encoder's input, scaled back to pixel units: the baseline sees what the encoder sees
    expected = model_input(large, 16, (0.0,) * 3, (1.0,) * 3).permute(0, 2, 3, 1).reshape(40, -1).numpy()
    np.testing.assert_allclose(shrunk / np.float32(255), expected, rtol=0, atol=1e-6)


def test_uint8_pixels_score_as_the_same_pixels_in_0_1():
    """Why raw pixels may stay uint8: cosine kNN and the standardised probe ignore the scale."""
    x, y = load_digits(return_X_y=True)
    pixels = (x * 255 / 16).round().astype(np.uint8)
    train, test = slice(0, 1200), slice(1200, None)
    scaled = pixels.astype(np.float32) / 255
    knn = [ev.knn_accuracy(f[train], y[train], f[test], y[test]) for f in (pixels, scaled)]
    assert knn[0] == knn[1] and knn[0][1] > 0.9
    probe = [ev.linear_probe(f[train], y[train], f[test], y[test], epochs=50) for f in (pixels, scaled)]
    assert probe[0] == probe[1] and probe[0][1] > 0.9
    budget = 0.5 * pixels[train].size * ev.FULL_BATCH_BYTES / 2**20  # mini-batches
    minis = [
        ev.linear_probe(f[train], y[train], f[test], y[test], memory_budget_mb=budget, batch_size=128)
        for f in (pixels, scaled)
    ]
    assert abs(minis[0][1] - minis[1][1]) <= 0.005, minis


def test_a_wide_mini_batch_in_pieces_is_the_same_step(monkeypatch):
    """Batches wider than PIECE_BYTES are split and their gradients summed: the same probe."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(600, 96)).astype(np.float32)
    y = (x[:, :3].sum(1) > 0).astype(np.int64) + 2 * (x[:, 3] > 0)
    args = (x[:500], y[:500], x[500:], y[500:])
    budget = 0.5 * x[:500].size * ev.FULL_BATCH_BYTES / 2**20
    kwargs = dict(memory_budget_mb=budget, batch_size=128, minibatch_epochs=5)
    whole = ev.linear_probe(*args, **kwargs)
    monkeypatch.setattr(ev, "PIECE_BYTES", 96 * 8 * 10)  # pieces of 10 rows
    pieces = ev.linear_probe(*args, **kwargs)
    assert whole[1] > 0.6
    assert pieces == whole


class _CountingImages:
    """Images that count the rows read, as the image store decodes them."""

    def __init__(self, images: np.ndarray) -> None:
        self.images, self.rows_read = images, 0
        self.shape, self.dtype, self.ndim = images.shape, images.dtype, images.ndim

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: slice) -> np.ndarray:
        rows = self.images[index]
        self.rows_read += len(rows)
        return rows


def test_one_pass_reads_each_image_once_and_matches_the_separate_passes(tmp_path):
    from imsvd.inference import embed_split
    from imsvd.preprocess import at_most

    torch.manual_seed(0)
    encoders = [build_encoder("resnet18_cifar", 0.125, (32, 32), 3) for _ in range(2)]
    images = np.random.default_rng(6).integers(0, 256, size=(70, 24, 20, 3), dtype=np.uint8)
    counting = _CountingImages(images)
    features, pixels = embed_split(
        encoders,
        counting,
        16,
        [0.5] * 3,
        [0.25] * 3,
        32,
        max_in_memory_mb=0.01,
        scratch=tmp_path,
        pixels=True,
    )
    assert counting.rows_read == len(images)  # both encoders and the pixels from one read
    for encoder, got in zip(encoders, features, strict=True):
        alone = extract_features(encoder, images, 16, [0.5] * 3, [0.25] * 3, 32)
        assert isinstance(got.backbone, np.memmap)  # over the budget: on disk
        np.testing.assert_allclose(got.backbone, alone.backbone, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got.projector, alone.projector, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(pixels, at_most(images, 16).reshape(len(images), -1))


def test_raw_pixels_are_capped_at_their_own_size_below_the_encoders():
    """``evaluate.raw_pixels_size``: photos the encoder sees at 16 x 16 give an 8 x 8 pixel
    baseline (a quarter of the kNN's cost per pair), and smaller images keep their size."""
    from imsvd.inference import embed_split
    from imsvd.preprocess import at_most

    torch.manual_seed(0)
    encoder = build_encoder("resnet18_cifar", 0.125, (32, 32), 3)
    images = np.random.default_rng(7).integers(0, 256, size=(40, 24, 20, 3), dtype=np.uint8)
    args = ([encoder], images, 16, [0.5] * 3, [0.25] * 3, 16)
    features, pixels = embed_split(*args, pixels=True, pixels_size=8)
    assert pixels is not None and pixels.shape == (40, 8 * 8 * 3)
    np.testing.assert_array_equal(pixels, at_most(at_most(images, 16), 8).reshape(40, -1))
    uncapped, wide = embed_split(*args, pixels=True, pixels_size=0)
    assert wide is not None and wide.shape == (40, 16 * 16 * 3)
    np.testing.assert_array_equal(features[0].backbone, uncapped[0].backbone)  # the encoder is untouched
    small = images[:, :6, :5]
    _, kept = embed_split([encoder], small, 16, [0.5] * 3, [0.25] * 3, 16, pixels=True, pixels_size=8)
    np.testing.assert_array_equal(kept, small.reshape(40, -1))


def test_the_full_batch_probe_holds_what_its_budget_counts():
    """The full-batch probe is chosen when ``FULL_BATCH_BYTES`` per training value fit the
    budget; it must then hold about that (out-of-place standardisation took
    1.5 times as much here). Measured as the growth of the peak RSS of a fresh process."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import resource, numpy as np
        from imsvd.metrics import FULL_BATCH_BYTES, linear_probe
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, (8000, 3072), dtype=np.uint8)
        y = rng.integers(0, 10, 8000)
        linear_probe(x[:50], y[:50], x[:50], y[:50], epochs=2)  # warm up torch's allocator
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        linear_probe(x, y, x[:500], y[:500], epochs=3, memory_budget_mb=1024)
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
        print(grown / (x.size * FULL_BATCH_BYTES))
        """
    )
    ratio = float(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    )
    assert ratio < 1.25, f"the full-batch probe held {ratio:.2f}x what FULL_BATCH_BYTES counts"


def _resident_file_mib() -> float:
    """This process's resident pages of files (memory maps included), from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no RssFile in /proc/self/status")


def test_released_map_pages_leave_the_process_and_keep_their_values(tmp_path):
    from imsvd.memmaps import allocate, mapping, read_rows, release

    mapped = allocate(32_768, 1024, tmp_path, "x")  # 128 MiB, unlinked
    assert mapping(mapped[10:20]) is mapping(mapped) is not None and mapping(np.ones(3)) is None
    before = _resident_file_mib()
    mapped[:] = np.arange(1024, dtype=np.float32)  # every page written, so resident
    assert _resident_file_mib() - before > 100
    release(mapped)
    assert _resident_file_mib() - before < 16
    # The written pages were not lost: they are read back from the page cache (or the file).
    np.testing.assert_array_equal(read_rows(mapped, slice(32_000, 32_003)), np.tile(np.arange(1024), (3, 1)))
    in_memory = np.ones((4, 3))
    assert read_rows(in_memory, slice(0, 2)).base is in_memory  # no copy outside maps


def test_reading_memory_mapped_features_holds_one_chunk_not_the_file(tmp_path):
    """kNN, probe (both paths), moments and discrete codes over a 128 MiB memory map: the map's
    pages do not stay resident once read (without the release they all would)."""
    rng = np.random.default_rng(8)
    n = 65_536
    written = np.lib.format.open_memmap(tmp_path / "train.npy", mode="w+", dtype=np.float32, shape=(n, 512))
    labels = rng.integers(0, 4, n)
    for i in range(0, n, 8192):
        written[i : i + 8192] = rng.normal(size=(8192, 512)).astype(np.float32) + labels[i : i + 8192, None]
    written.flush()
    del written
    train = np.load(tmp_path / "train.npy", mmap_mode="r")  # a fresh map: nothing of it resident yet
    test = np.array(train[:300])
    runs = {
        "kNN": lambda: ev.knn_scores(train, labels, test, k=20),
        "moments": lambda: ev.moments(train),
        "codes": lambda: ev.discrete_code(train, 8),
        "probe, full batch": lambda: ev.linear_probe(train, labels, test, labels[:300], epochs=2),
        "probe, mini-batches": lambda: ev.linear_probe(
            train, labels, test, labels[:300], memory_budget_mb=1, minibatch_epochs=1
        ),
    }
    for name, run in runs.items():
        before = _resident_file_mib()
        run()
        assert _resident_file_mib() - before < 32, f"{name} left the map's pages resident"


def _anonymous_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no RssAnon in /proc/self/status")


def test_the_code_knn_holds_blocks_capped_in_bytes_not_its_training_set():
    """65,536 training codes of 64 blocks of 16 bins (an evaluation of 80,000 photos): one
    one-hot block of them all was 268 MB (537 MB first, as F.one_hot's int64), and its
    similarities to 1,024 test rows 268 MB more. The blocks are capped in bytes as the
    feature kNN's are (the values: test_metrics)."""
    import threading
    import time

    rng = np.random.default_rng(9)
    train = rng.integers(0, 16, (65_536, 64)).astype(np.uint8)
    labels = rng.integers(0, 10, 65_536)
    test = rng.integers(0, 16, (1_024, 64)).astype(np.uint8)
    peak, done = [_anonymous_mib()], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak.append(_anonymous_mib())
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    before = peak[0]
    sampler.start()
    try:
        scores = ev.code_knn_scores(train, labels, test, 16, k=20)
    finally:
        done.set()
        sampler.join()
    assert max(peak) - before < 200, f"{max(peak) - before:.0f} MiB for the code kNN"
    assert scores.shape == (1_024, 10) and (scores > 0).any(1).all()  # every test row got votes
