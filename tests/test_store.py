"""The image store (litdata shards of encoded images at their own size), and pretraining
that streams it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import TINY_STEPS_PER_EPOCH, copy_project, kedro, tiny_params, tiny_tree, write_image
from imsvd.augment import StorePairs
from imsvd.checkpoints import load_weights
from imsvd.config import AugmentConfig, DataConfig
from imsvd.data import ImageData, pixel_sha256
from imsvd.errors import DataError
from imsvd.sources import load_source, to_canonical_array
from imsvd.store import Unchanged, decode_stored, path_key, read_split, split_directory, write_image_store


def noise_images(n: int, side: int = 8, channels: int = 1, seed: int = 0) -> ImageData:
    rng = np.random.default_rng(seed)
    return ImageData(
        images=rng.integers(0, 256, (n, side, side, channels), dtype=np.uint8),
        labels=np.arange(n) % 3,
        splits=np.where(np.arange(n) < n * 2 // 3, "train", "test"),
        ids=np.asarray([f"noise/{i}" for i in range(n)]),
        class_names=("a", "b", "c"),
    )


def test_an_array_store_holds_every_image_in_order_with_its_shard(tmp_path):
    data = noise_images(300)
    index = write_image_store(data, tmp_path / "store", chunk_bytes="16KB")
    shards = index.pop("shards")
    assert index["splits"]["train"]["images"] == 200 and index["splits"]["test"]["images"] == 100
    assert index["splits"]["train"]["chunks"] > 1  # small chunks: the shard column is not trivial
    assert index["png_files"] == 300 and index["fingerprint"] == data.fingerprint
    position = 0
    for split in ("train", "test"):
        items = read_split(tmp_path / "store" / split)
        chunks = json.loads((tmp_path / "store" / split / "index.json").read_text())["chunks"]
        expected = [f"{split}/{c['filename']}" for c in chunks for _ in range(c["chunk_size"])]
        for item, shard in zip(items, expected, strict=True):
            assert item["id"] == data.ids[position] and item["label"] == data.labels[position]
            np.testing.assert_array_equal(decode_stored(item["image"]), data.images[position])
            assert shards[position] == shard
            position += 1
        assert index["splits"][split]["bytes"] == sum(
            (tmp_path / "store" / split / c["filename"]).stat().st_size for c in chunks
        )
    assert position == 300


def test_channel_stats_of_a_large_store_come_from_evenly_spaced_rows(tmp_path):
    """From the store (decoded row by row) the normalisation's statistics read at most
    ``sample`` rows, spread over the whole set; in memory every pixel counts."""
    from imsvd.preprocess import channel_stats
    from imsvd.store import StoredImages

    data = noise_images(300, side=8, channels=3)
    write_image_store(data, tmp_path / "store", chunk_bytes="16KB")
    rows = np.arange(200)
    stored = StoredImages(
        tmp_path / "store", np.full(200, "train"), rows, (200, 8, 8, 3), np.full(200, ""), np.zeros(200)
    )
    train = data.images[:200]

    def stats(images, sample):
        return np.asarray(channel_stats(images, sample=sample))

    np.testing.assert_allclose(stats(stored, None), stats(train, None))
    picked = np.unique(np.linspace(0, 199, 20).round().astype(int))
    np.testing.assert_allclose(stats(stored, 20), stats(train[picked], None))
    assert np.abs(stats(stored, 20) - stats(train, None)).max() > 1e-4
    assert channel_stats(train, sample=20) == channel_stats(train)  # in memory: exact


@pytest.mark.parametrize("cwd", ["elsewhere", "the folder"])
def test_a_folder_store_keeps_jpeg_and_png_bytes_and_converts_the_rest_at_their_own_size(
    tmp_path, monkeypatch, cwd
):
    rng = np.random.default_rng(1)
    root = tmp_path / "photos"
    if cwd == "the folder":  # data.path=".": every id is also a path that exists from here
        root.mkdir()
        monkeypatch.chdir(root)
    files = {
        "train/cat/a.jpg": ((30, 20), None, True),
        "train/cat/b.png": ((12, 9), None, True),
        "train/dog/c.png": ((16, 24), "P", False),  # palette: expanded to RGB
        "train/dog/d.png": ((10, 10), "RGBA", False),  # alpha dropped
        "test/cat/e.bmp": ((14, 18), None, False),  # another format
        "test/dog/f.png": ((9, 13), None, True),
    }
    for name, ((h, w), mode, _) in files.items():
        write_image(root / name, rng.integers(0, 256, (h, w, 3), dtype=np.uint8), mode)
    source = load_source(DataConfig(source="image_folder", path=str(root)))
    index = write_image_store(source.data, tmp_path / "store", folder=root)
    assert (index["kept_files"], index["png_files"]) == (3, 3)
    stored = {
        item["id"]: item["image"]
        for split in ("train", "test")
        for item in read_split(tmp_path / "store" / split)
    }
    assert set(stored) == set(files)
    for name, ((h, w), _, kept) in files.items():
        if kept:
            assert stored[name] == (root / name).read_bytes()
        with Image.open(root / name) as img:
            expected = to_canonical_array(img)
        decoded = decode_stored(stored[name])
        assert decoded.shape == (h, w, 3)  # its own size, not the folder's common one
        if name.endswith(".jpg"):
            np.testing.assert_array_equal(decoded, np.asarray(Image.open(root / name).convert("RGB")))
        else:
            np.testing.assert_array_equal(decoded, expected)


def test_writing_a_folder_of_many_sizes_does_not_log_litdatas_chunk_estimates(tmp_path):
    root = mixed_folder(tmp_path / "photos")
    source = load_source(DataConfig(source="image_folder", path=str(root)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        index = write_image_store(source.data, tmp_path / "store", folder=root, chunk_bytes="8KB")
    assert index["splits"]["train"]["chunks"] > 3
    assert not [w for w in caught if "target chunk size" in str(w.message)]


def test_a_file_changed_into_garbage_after_validation_is_named(tmp_path):
    rng = np.random.default_rng(2)
    root = tmp_path / "photos"
    for name in ("train/cat/a.gif", "train/cat/b.gif", "test/cat/c.gif"):
        write_image(root / name, rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), "P")
    source = load_source(DataConfig(source="image_folder", path=str(root)))
    (root / "train/cat/b.gif").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"train/cat/b\.gif"):
        write_image_store(source.data, tmp_path / "store", folder=root)
    assert not (tmp_path / "store").exists()
    assert not list(tmp_path.glob(".store.*"))  # no staging folder left behind


WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import numpy as np
    from imsvd.data import ImageData
    from imsvd.store import write_image_store

    n, seed = int(sys.argv[2]), int(sys.argv[3])
    rng = np.random.default_rng(seed)
    data = ImageData(
        rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8), np.zeros(n, np.int64),
        np.where(np.arange(n) % 4, "train", "test"), np.asarray([f"x/{i}" for i in range(n)]), ("a",),
    )
    print("writing", flush=True)
    write_image_store(data, Path(sys.argv[1]), chunk_bytes="256KB")
    """
)


def test_a_store_write_killed_halfway_leaves_the_previous_store_and_a_rerun_finishes(tmp_path):
    target = tmp_path / "store"

    def writer(n: int, seed: int) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-c", WRITER, str(target), str(n), str(seed)],
            stdout=subprocess.PIPE,
            text=True,
        )

    assert writer(40, 0).wait(timeout=120) == 0
    before = {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()}

    big = writer(6000, 1)  # about 75 MB of noise PNGs: seconds of writing
    deadline = time.monotonic() + 120
    while not any(tmp_path.glob(".store.*.tmp/train/*.bin")):  # a chunk of the new store exists
        assert big.poll() is None and time.monotonic() < deadline, "the writer ended too soon"
        time.sleep(0.05)
    os.kill(big.pid, signal.SIGKILL)
    big.wait(timeout=30)
    after = {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    assert after == before

    assert writer(50, 2).wait(timeout=120) == 0
    assert len(read_split(target / "train")) == 37
    assert not list(tmp_path.glob(".store.*"))  # the killed run's staging folder is gone


def test_the_store_refuses_to_be_read_for_other_data(tmp_path):
    data = noise_images(30)
    index = write_image_store(data, tmp_path / "store")
    index.pop("shards")
    assert split_directory(index, "train", data.fingerprint) == tmp_path / "store" / "train"
    with pytest.raises(DataError, match=r"kedro run --pipeline=validate"):
        split_directory(None, "train", data.fingerprint)
    with pytest.raises(DataError, match=r"not the data the last validation"):
        split_directory(index, "train", noise_images(30, seed=1).fingerprint)
    # The folder replaced by other data while the index stayed (a kill between the two).
    other = noise_images(30, seed=2)
    write_image_store(other, tmp_path / "store")
    with pytest.raises(DataError, match=r"holds other data than its index says"):
        split_directory(index, "train", data.fingerprint)


def test_store_pairs_crop_each_image_at_its_own_size_and_repeat_under_a_seed(tmp_path):
    rng = np.random.default_rng(3)
    root = tmp_path / "photos"
    for i, (h, w) in enumerate([(40, 25), (17, 33), (64, 64), (20, 20)]):
        write_image(root / f"train/c/{i}.png", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    write_image(root / "test/c/t.png", rng.integers(0, 256, (20, 20, 3), dtype=np.uint8))
    source = load_source(DataConfig(source="image_folder", path=str(root)))
    write_image_store(source.data, tmp_path / "store", folder=root)
    cfg = AugmentConfig(size=12)
    first = StorePairs(tmp_path / "store" / "train", cfg, 3, seed=5)
    again = StorePairs(tmp_path / "store" / "train", cfg, 3, seed=5)
    for i in range(len(first)):
        a, b = first[i]
        assert a.shape == b.shape == (3, 12, 12) and a.dtype == torch.uint8
        assert not torch.equal(a, b)  # two draws
        a2, b2 = again[i]
        assert torch.equal(a, a2) and torch.equal(b, b2)


@pytest.mark.parametrize(
    ("first", "then"), [("workers", "workers"), ("device", "device"), ("workers", "device")]
)
def test_pretraining_streams_the_store_of_a_folder_of_mixed_sizes_and_resumes(
    tmp_path, in_process, first, then
):
    """Views cropped in the DataLoader workers or on the device (here the CPU), and a run
    resumed with the other place (a run started on a CPU, finished on a GPU)."""
    rng = np.random.default_rng(4)
    root = tmp_path / "photos"
    for split, count in (("train", 24), ("test", 6)):
        for cls in ("cat", "dog"):
            for i in range(count):
                h, w = rng.integers(12, 40, size=2)
                level = rng.integers(30, 220)
                pixels = np.clip(level + rng.integers(-30, 30, (h, w, 3)), 0, 255).astype(np.uint8)
                write_image(root / split / cls / f"{i}.{'jpg' if i % 2 else 'png'}", pixels)
    project = copy_project(tmp_path / "project")
    params = tiny_tree(
        pretrain__stream_store="true",
        pretrain__num_workers="2",
        pretrain__batch_size="8",
        pretrain__crop_on=first,
    )
    params["data"] = {"source": "image_folder", "path": str(root)}
    in_process(project, "validate", params)
    in_process(project, "pretrain", params)
    encoder = load_weights(project / "data/06_models/encoder.pt")
    where = {"workers": "image store", "device": "image store, views drawn on the device"}
    assert encoder["view_source"] == where[first]
    last = load_weights(project / "data/06_models/checkpoints/last.ckpt")
    # Lightning keeps litdata's loader state in the checkpoint: where the stream stopped.
    loader_state = last["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert loader_state["dataset"]["input_dir_path"].endswith("image_store/train")
    assert last["epoch"] == 1 and last["global_step"] == 2 * TINY_STEPS_PER_EPOCH

    params["pretrain"]["epochs"] = 3
    params["pretrain"]["crop_on"] = then
    in_process(project, "pretrain", params)
    assert load_weights(project / "data/06_models/encoder.pt")["view_source"] == where[then]
    resumed = load_weights(project / "data/06_models/checkpoints/last.ckpt")
    assert resumed["global_step"] == 3 * TINY_STEPS_PER_EPOCH
    history = (project / "data/07_model_output/pretrain_history.csv").read_text().splitlines()
    assert len(history) == 1 + 3 * TINY_STEPS_PER_EPOCH


@pytest.mark.parametrize("views", ["store", "store, views drawn on the device", "sharded cache"])
def test_a_sigkill_mid_epoch_resumes_the_store_where_the_loader_stopped(tmp_path, in_process, views):
    """Streaming the image store's originals (views drawn in the workers or on the device),
    or the augment stage's sharded view cache."""
    from test_faults import KedroProcess

    rng = np.random.default_rng(5)
    root = tmp_path / "photos"
    for split, count in (("train", 40), ("test", 5)):
        for cls in ("cat", "dog"):
            for i in range(count):
                h, w = rng.integers(12, 40, size=2)
                level = rng.integers(30, 220)
                pixels = np.clip(level + rng.integers(-30, 30, (h, w, 3)), 0, 255).astype(np.uint8)
                write_image(root / split / cls / f"{i}.png", pixels)
    project = copy_project(tmp_path / "project")
    in_process(project, "validate", {"data": {"source": "image_folder", "path": str(root)}})
    steps = 10  # 80 training images in batches of 8
    overrides = dict(
        data__source="image_folder",
        data__path=str(root),
        augment__max_array_mb="0",
        pretrain__stream_store="false" if views == "sharded cache" else "true",
        pretrain__crop_on="device" if views.endswith("device") else "workers",
        pretrain__num_workers="2",
        pretrain__batch_size="8",
        pretrain__epochs="1",
        pretrain__max_steps_per_epoch=str(steps),
        pretrain__checkpoint_every_n_steps="3",
    )
    if views == "sharded cache":
        in_process(project, "augment", tiny_tree(**overrides))
        assert json.loads((project / "data/05_model_input/view_cache.json").read_text())["format"] == "shards"
    args = ("run", "--pipeline=pretrain", "--params", tiny_params(**overrides))
    run = KedroProcess(project, *args)
    run.wait_for("epoch 1/1 step 7 ")  # the step-6 checkpoint is written
    run.signal(signal.SIGKILL)
    assert run.wait() == -signal.SIGKILL
    killed = load_weights(project / "data/06_models/checkpoints/last.ckpt")
    assert killed["global_step"] == 6
    assert killed["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["num_samples_yielded"] >= 48

    rerun = kedro(project, *args)
    assert "in the middle of epoch 1, after step 6" in rerun.stdout + rerun.stderr
    done = load_weights(project / "data/06_models/checkpoints/last.ckpt")
    assert done["global_step"] == steps
    # The loader went on from the 48 samples it had yielded, not from the epoch's start.
    assert done["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["num_samples_yielded"] == 80
    history = (project / "data/07_model_output/pretrain_history.csv").read_text().splitlines()
    assert len(history) == 1 + steps
    source = {"store": "image store", "sharded cache": "cache"}.get(views, "image " + views)
    assert load_weights(project / "data/06_models/encoder.pt")["view_source"] == source


@pytest.mark.slow
def test_two_ddp_processes_each_stream_their_own_half_of_the_store(tmp_path):
    from conftest import tiny_pretrain
    from imsvd.training import RunIdentity, pretrain

    data = noise_images(96, side=10)  # 64 training images
    write_image_store(data, tmp_path / "store", chunk_bytes="4KB")  # several chunks to share out
    aug = AugmentConfig(size=8)
    dataset = StorePairs(tmp_path / "store" / "train", aug, 1, seed=0)
    cfg = tiny_pretrain(tmp_path / "ckpt", stream_store=True, devices="2")
    identity = RunIdentity.of(cfg, aug, data.fingerprint)
    result = pretrain(dataset, "image store", 1, [0.5], [0.25], cfg, identity)
    assert result.history["step"].tolist() == [1.0, 2.0, 3.0, 4.0]  # 64 pairs in global batches of 16
    state = load_weights(tmp_path / "ckpt" / "last.ckpt")["loops"]["fit_loop"]["state_dict"]
    loader = state["combined_loader"][0]
    # Rank 0 (the one that checkpoints) saw half of the epoch, in batches of 8.
    assert loader["dataset"]["world_size"] == 2
    assert loader["num_samples_yielded"] == 32 and loader["dataset"]["batch_size"] == 8


def mixed_folder(root, per_class: tuple[int, int] = (16, 5), seed: int = 6):
    """A labelled folder of JPEG, PNG, palette and RGBA files of many sizes."""
    rng = np.random.default_rng(seed)
    for split, count in zip(("train", "test"), per_class, strict=True):
        for cls in ("cat", "dog"):
            for i in range(count):
                h, w = rng.integers(12, 40, size=2)
                level = rng.integers(30, 220) if cls == "cat" else rng.integers(0, 90)
                pixels = np.clip(level + rng.integers(-30, 30, (h, w, 3)), 0, 255).astype(np.uint8)
                mode, ext = [(None, "png"), (None, "jpg"), ("P", "png"), ("RGBA", "png")][i % 4]
                write_image(root / split / cls / f"{i}.{ext}", pixels, mode)
    return root


def test_a_folder_above_the_memory_limit_is_streamed_through_every_stage(tmp_path, in_process):
    root = mixed_folder(tmp_path / "photos")
    runs = {}
    for name, limit in (("memory", 2048), ("streamed", 0)):
        project = copy_project(tmp_path / name)
        params = tiny_tree(pretrain__num_workers="2", pretrain__batch_size="8")
        params["data"] = {"source": "image_folder", "path": str(root), "max_in_memory_mb": limit}
        # The streamed run's view cache is shards too, and pretrain streams them.
        params.setdefault("augment", {})["max_array_mb"] = limit
        for pipeline in ("validate", "augment", "pretrain", "evaluate"):
            in_process(project, pipeline, params)
        runs[name] = project

    memory, streamed = runs["memory"], runs["streamed"]
    report = json.loads((streamed / "data/08_reporting/validation.json").read_text())
    assert report["streamed"] is True and report["success"] is True
    assert json.loads((memory / "data/08_reporting/validation.json").read_text())["streamed"] is False
    # The streamed images.npz holds no pixels, only where each image is in the store.
    with np.load(streamed / "data/03_primary/images.npz") as arrays:
        assert "images" not in arrays.files and len(arrays["store_position"]) == 42
    # Same pixels, same digests, same fingerprint, same chunks, either way.
    a = (memory / "data/03_primary/manifest.csv").read_text()
    b = (streamed / "data/03_primary/manifest.csv").read_text()
    assert a == b
    # Either way, a file's digest and mean are of its image at its own size: not resized.
    manifest = pd.read_csv(memory / "data/03_primary/manifest.csv")
    common = manifest.groupby(["height", "width"]).size().idxmax()
    others = manifest[[(h, w) != common for h, w in zip(manifest["height"], manifest["width"], strict=True)]]
    assert len(others) > 30
    for row in others.itertuples():
        with Image.open(root / row.id) as img:
            own = to_canonical_array(img)
        assert own.shape[:2] == (row.height, row.width)
        assert row.sha256 == pixel_sha256(own) and row.mean_intensity == pytest.approx(own.mean(), abs=1e-9)
    index = json.loads((streamed / "data/03_primary/image_store.json").read_text())
    assert index["streamed"] is True and index["directory"] == "data/03_primary/image_store"
    in_memory = json.loads((memory / "data/03_primary/image_store.json").read_text())
    # JPEG and L/RGB PNG kept (8 + 3 per class), palette and RGBA converted, as in memory.
    assert (
        (index["kept_files"], index["png_files"])
        == (22, 20)
        == (in_memory["kept_files"], in_memory["png_files"])
    )
    assert index["splits"] == in_memory["splits"]
    assert not list((streamed / "data/03_primary").glob(".image_store.*"))  # the staging folder was published
    caches = {n: json.loads((p / "data/05_model_input/view_cache.json").read_text()) for n, p in runs.items()}
    assert (caches["memory"]["format"], caches["streamed"]["format"]) == ("array", "shards")
    assert (streamed / "data/05_model_input/view_cache/shards/index.json").is_file()
    assert not (streamed / "data/05_model_input/view_cache/views.npy").exists()
    for project in runs.values():
        assert load_weights(project / "data/06_models/encoder.pt")["view_source"] == "cache"
    # Every stage read the store: the raw-pixel baseline sees the same pixels.
    metrics = {n: json.loads((p / "data/08_reporting/metrics.json").read_text()) for n, p in runs.items()}
    for key in ("knn_top1_raw_pixels", "linear_top1_raw_pixels"):
        assert metrics["streamed"][key] == metrics["memory"][key]
    assert (streamed / "data/08_reporting/variable_attribution.png").stat().st_size > 0


CAPPED_KEDRO = textwrap.dedent(
    """
    import resource, runpy, sys
    cap = int(sys.argv[1])
    if cap:
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))  # inherited by the decoding workers
    sys.argv = ["kedro", "run", "--pipeline=validate", "--params", sys.argv[2]]
    try:
        runpy.run_module("kedro", run_name="__main__")
    except SystemExit as exc:
        code = exc.code
    else:
        code = 0
    peak = [line.split()[1] for line in open("/proc/self/status") if line.startswith("VmPeak")][0]
    print("VMPEAK", int(peak) * 1024, flush=True)
    sys.exit(code)
    """
)


def capped_validate(project, folder, cap: int, limit_mb: float) -> tuple[int, int, str]:
    """``kedro run --pipeline=validate`` on ``folder`` with its address space capped at
    ``cap`` bytes (0: no cap); its exit code, its peak address space, its output."""
    from conftest import kedro_env

    params = f"data.source=image_folder,data.path={folder},data.workers=2,data.max_in_memory_mb={limit_mb}"
    run = subprocess.run(
        [sys.executable, "-c", CAPPED_KEDRO, str(cap), params],
        cwd=project,
        env=kedro_env(project),
        capture_output=True,
        text=True,
        timeout=600,
    )
    peaks = [int(line.split()[1]) for line in run.stdout.splitlines() if line.startswith("VMPEAK")]
    return run.returncode, peaks[0] if peaks else 0, run.stdout + run.stderr


@pytest.mark.slow
def test_validation_streams_a_folder_larger_than_its_memory_cap(tmp_path):
    # 160 JPEGs of 2048 x 2048 RGB: 1.9 GiB once decoded, a few MB on disk.
    root = tmp_path / "big"
    yy, xx = np.mgrid[0:2048, 0:2048]
    for i in range(160):
        split, cls = ("test" if i % 8 == 0 else "train"), ("a" if (i // 8) % 2 else "b")
        wave = (np.sin(xx / (40 + i) + i) * np.cos(yy / (55 + i)) * 60 + 40 + i).astype(np.uint8)
        pixels = np.stack([wave, wave // 2 + i % 50, 255 - wave], axis=-1)
        (root / split / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / split / cls / f"{i}.jpg", quality=85)
    decoded = 160 * 2048 * 2048 * 3
    small = mixed_folder(tmp_path / "small", per_class=(6, 2))
    project = copy_project(tmp_path / "project")

    code, baseline, output = capped_validate(project, small, 0, 2048)
    assert code == 0, output[-3000:]
    cap = baseline + 2**30  # what validating a tiny folder takes, plus 1 GiB: about half the decoded folder
    assert decoded > cap - baseline + 2**29

    # Held in memory, the folder does not fit under the cap: the test can fail.
    before = (project / "data/03_primary/image_store.json").read_text()
    code, _, output = capped_validate(project, root, cap, 1e9)
    assert code != 0, (
        "the in-memory validation fitted under the cap: the folder is too small to show anything"
    )
    assert (
        project / "data/03_primary/image_store.json"
    ).read_text() == before  # the small folder's, untouched

    # Killed while streaming into the staging store: the small folder's store stays.
    from conftest import kedro_env

    params = f"data.source=image_folder,data.path={root},data.workers=2,data.max_in_memory_mb=0"
    killed = subprocess.Popen(
        [sys.executable, "-m", "kedro", "run", "--pipeline=validate", "--params", params],
        cwd=project,
        env=kedro_env(project),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not list((project / "data/03_primary").glob(".image_store.*.tmp")):
        assert killed.poll() is None and time.monotonic() < deadline, "validation ended before streaming"
        time.sleep(0.05)
    time.sleep(1.0)  # some files decoded and written
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    assert (project / "data/03_primary/image_store.json").read_text() == before
    assert len(read_split(project / "data/03_primary/image_store/train")) == 12

    code, _, output = capped_validate(project, root, cap, 0)
    assert code == 0, output[-3000:]
    assert "streamed into the image store" in output
    assert not list((project / "data/03_primary").glob(".image_store.*"))  # the killed run's staging is gone
    report = json.loads((project / "data/08_reporting/validation.json").read_text())
    assert report["success"] and report["streamed"] and report["images"] == 160
    index = json.loads((project / "data/03_primary/image_store.json").read_text())
    assert index["kept_files"] == 160 and index["splits"]["test"]["images"] == 20


def test_workers_writing_their_own_segments_keep_every_file_in_order_with_its_shard(tmp_path, in_process):
    """Streamed by two workers, each writing the segments it takes as shards of its own,
    every split holds its files in the manifest's order, each with its file's own bytes
    and the shard the index names; one worker writes the same shards."""
    from imsvd import decoding

    root = tmp_path / "photos"
    rng = np.random.default_rng(3)
    # Eleven segments, so that segment 10's shards would come before segment 2's in any
    # order of the indexes but litdata's numeric one.
    for i in range(10 * decoding.CHUNK + 10):
        split, cls = ("test" if i % 5 == 0 else "train"), ("cat", "dog")[i % 2]
        pixels = rng.integers(0, 256, tuple(int(v) for v in rng.integers(8, 24, 2)) + (3,), dtype=np.uint8)
        write_image(root / split / cls / f"{i:03d}.{('png', 'jpg')[i % 3 == 0]}", pixels)
    layouts = {}
    for workers in (2, 1):
        project = copy_project(tmp_path / f"project-{workers}")
        params = {
            "data": {"source": "image_folder", "path": str(root), "max_in_memory_mb": 0, "workers": workers}
        }
        in_process(project, "validate", params)
        manifest = pd.read_csv(project / "data/03_primary/manifest.csv", dtype={"id": str})
        shards = manifest["shard"].tolist()
        store = project / "data/03_primary/image_store"
        layouts[workers] = {}
        for split in ("train", "test"):
            rows = np.flatnonzero(manifest["split"].to_numpy() == split)
            items = read_split(store / split)
            chunks = json.loads((store / split / "index.json").read_text())["chunks"]
            assert [item["id"] for item in items] == manifest["id"].iloc[rows].tolist()
            for item, row in zip(items, rows, strict=True):
                assert bytes(item["image"]) == (root / manifest["id"].iloc[row]).read_bytes()
            in_chunks = [f"{split}/{c['filename']}" for c in chunks for _ in range(c["chunk_size"])]
            assert [shards[row] for row in rows] == in_chunks
            layouts[workers][split] = [(c["filename"], c["chunk_size"]) for c in chunks]
        # Each segment wrote its own chunks (litdata names them after the writer's rank),
        # and one segment wrote into both splits.
        ranks = {
            split: {name.split("-")[1] for name, _ in chunks} for split, chunks in layouts[workers].items()
        }
        assert (
            ranks["train"] | ranks["test"] == {str(r) for r in range(11)} and ranks["train"] & ranks["test"]
        )
    assert layouts[1] == layouts[2]


def test_a_bad_file_in_a_streamed_folder_is_named_and_the_previous_store_stays(tmp_path, in_process):
    root = mixed_folder(tmp_path / "photos", per_class=(6, 2))
    project = copy_project(tmp_path / "project")
    params = {"data": {"source": "image_folder", "path": str(root), "max_in_memory_mb": 0}}
    in_process(project, "validate", params)
    primary = project / "data/03_primary"
    before = {p.relative_to(primary): p.read_bytes() for p in primary.rglob("*") if p.is_file()}

    # A file whose header reads but whose pixels do not: found only while streaming.
    good = (root / "train/cat/1.jpg").read_bytes()
    (root / "train/cat/1.jpg").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match=r"unreadable image file.*train/cat/1\.jpg"):
        in_process(project, "validate", params)
    after = {p.relative_to(primary): p.read_bytes() for p in primary.rglob("*") if p.is_file()}
    assert after == before
    assert not list(primary.glob(".image_store.*"))  # the staging folder went with the error

    # A folder that decodes but fails the suite (one image per test class is too few).
    (root / "train/cat/1.jpg").write_bytes(good)
    for extra in (root / "test/dog").iterdir():
        if extra.name != "0.png":
            extra.unlink()
    with pytest.raises(Exception, match=r"image validation failed"):
        in_process(project, "validate", params)
    after = {p.relative_to(primary): p.read_bytes() for p in primary.rglob("*") if p.is_file()}
    assert after == before and not list(primary.glob(".image_store.*"))


def test_a_record_is_reused_only_for_the_same_bytes_among_paths_that_share_a_key(tmp_path):
    # Two records under one path key (as two paths whose keys collide would be): the one
    # with the file's SHA-256 is reused, and none when neither has it.
    path = tmp_path / "a.png"
    key = path_key(str(path))
    record = Unchanged(
        tmp_path,
        keys=np.array([key, key], dtype=np.uint64),
        file_sha256=np.array([b"1" * 64, b"2" * 64], dtype="S64"),
        digests=np.array([b"d" * 64, b"e" * 64], dtype="S64"),
        means=np.array([1.0, 2.0]),
        kept=np.array([True, True]),
        splits=np.array(["train", "train"]),
        positions=np.array([0, 1]),
    )
    second = record.reuse(path, b"raw", "2" * 64)
    assert second is not None and second.reused
    assert (second.digest, second.mean, second.payload) == ("e" * 64, 2.0, b"raw")
    assert record.reuse(path, b"raw", "3" * 64) is None
    assert record.reuse(tmp_path / "b.png", b"raw", "1" * 64) is None  # another path, another key


def test_a_rerun_on_a_grown_folder_decodes_only_the_new_and_changed_files(tmp_path, in_process, caplog):
    rng = np.random.default_rng(7)
    root = tmp_path / "photos"

    def picture(h: int, w: int) -> np.ndarray:
        return np.clip(rng.integers(30, 220) + rng.integers(-30, 30, (h, w, 3)), 0, 255).astype(np.uint8)

    for split, count in (("train", 12), ("test", 3)):
        for cls in ("cat", "dog"):
            for i in range(count):  # most files 24 x 24 (the common size stays), the rest of other sizes
                h, w = (24, 24) if i % 3 else tuple(int(v) for v in rng.integers(12, 40, 2))
                mode, ext = [(None, "png"), (None, "jpg"), ("P", "png")][i % 3]
                write_image(root / split / cls / f"{i}.{ext}", picture(h, w), mode)
    params = {"data": {"source": "image_folder", "path": str(root), "max_in_memory_mb": 0}}
    project = copy_project(tmp_path / "project")
    in_process(project, "validate", params)

    def revalidate() -> str:
        """Validate the project again; what the store logged."""
        caplog.clear()
        with caplog.at_level("INFO", logger="imsvd.store"):
            in_process(project, "validate", params)
        return caplog.text

    for name in ("train/cat/new1.png", "train/dog/new2.jpg", "test/cat/new3.png"):
        write_image(root / name, picture(24, 24))
    write_image(root / "train/dog/4.jpg", picture(24, 24))  # changed in place
    log = revalidate()
    assert "29 of 33 files unchanged since the last validation" in log
    assert "; 4 decoded" in log
    index = json.loads((project / "data/03_primary/image_store.json").read_text())
    assert index["reused_files"] == 29

    # The same store, manifest and pixels as validating the grown folder from scratch.
    fresh = copy_project(tmp_path / "fresh")
    in_process(fresh, "validate", params)
    for name in ("data/03_primary/manifest.csv", "data/03_primary/image_store/store.json"):
        assert (project / name).read_text() == (fresh / name).read_text()
    for split in ("train", "test"):
        a = read_split(project / "data/03_primary/image_store" / split)
        b = read_split(fresh / "data/03_primary/image_store" / split)
        assert [x["image"] for x in a] == [y["image"] for y in b] and len(a) == len(b)

    # 30 files of 20 x 20 make that the common size: a file's record does not depend on it.
    for i in range(30):
        write_image(root / "train" / ("cat", "dog")[i % 2] / f"small{i}.png", picture(20, 20))
    log = revalidate()
    assert "33 of 63 files unchanged since the last validation" in log
    assert "; 30 decoded" in log
    stamp = json.loads((project / "data/03_primary/image_store/store.json").read_text())
    assert stamp["shape"][:2] == [20, 20]
    again = copy_project(tmp_path / "again")
    in_process(again, "validate", params)
    for name in ("data/03_primary/manifest.csv", "data/03_primary/image_store/store.json"):
        assert (project / name).read_text() == (again / name).read_text()
