"""bench/gpu_budget.py: the GPU budget's bench runs (here on the CPU, for seconds) with only
torch and torchvision importable beside the library, and its batched views are views."""

from __future__ import annotations

import gzip
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_budget.py"


def _bench():
    spec = importlib.util.spec_from_file_location("gpu_budget", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_idx(path: Path, array: np.ndarray) -> None:
    magic = bytes([0, 0, 8, array.ndim])
    dims = b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(magic + dims + array.astype(np.uint8).tobytes()))


@pytest.fixture
def idx_folder(tmp_path: Path) -> Path:
    """The digits at 28x28 (each pixel 3x3, padded) as Fashion-MNIST's four IDX files."""
    digits = load_digits()
    images = np.pad(np.kron(digits.images * (255 / 16), np.ones((3, 3))), ((0, 0), (2, 2), (2, 2)))
    images, labels = images.round().astype(np.uint8), digits.target.astype(np.uint8)
    for stem, rows in (("train", slice(0, 1400)), ("t10k", slice(1400, None))):
        _write_idx(tmp_path / f"{stem}-images-idx3-ubyte.gz", images[rows])
        _write_idx(tmp_path / f"{stem}-labels-idx1-ubyte.gz", labels[rows])
    return tmp_path


def test_idx_reader_reads_what_was_written(idx_folder: Path) -> None:
    images, labels = _bench().load_split(idx_folder, "train")
    assert images.shape == (1400, 28, 28) and labels.shape == (1400,)
    assert labels.tolist() == load_digits().target[:1400].tolist()


def test_gpu_views_are_per_image_crops_flips_and_jitter() -> None:
    bench = _bench()
    generator = torch.Generator().manual_seed(0)
    ramp = torch.linspace(0, 1, 28).repeat(28, 1)  # left dark, right bright
    images = ramp.expand(64, 1, 28, 28).contiguous()
    views = bench.gpu_views(images, generator)
    assert views.shape == (64, 1, 32, 32)
    assert float(views.min()) >= 0 and float(views.max()) <= 1
    # Each image has its own crop and flip: some views run bright-to-dark, some the other way.
    slope = views[:, 0, :, -4:].mean(dim=(1, 2)) - views[:, 0, :, :4].mean(dim=(1, 2))
    assert (slope > 0).sum() > 10 and (slope < 0).sum() > 10
    assert len({round(float(s), 4) for s in slope}) > 50
    # A flat image stays flat (jitter rescales it as a whole).
    flat = bench.gpu_views(torch.full((8, 1, 28, 28), 0.5), generator)
    assert torch.allclose(flat, flat[:, :, :1, :1].expand_as(flat), atol=1e-5)


@pytest.mark.slow
def test_bench_runs_with_only_torch_and_torchvision(idx_folder: Path, tmp_path: Path) -> None:
    """Kedro, MLflow, Great Expectations, litdata and scikit-learn are made unimportable,
    as on the GPU machine; two methods train for 3 s each and are evaluated."""
    out = tmp_path / "gpu_budget.json"
    blocked = ("kedro", "mlflow", "great_expectations", "litdata", "sklearn", "lightning")
    wrapper = (
        "import runpy, sys\n"
        # None in sys.modules: import raises ModuleNotFoundError, find_spec answers None.
        f"sys.modules.update(dict.fromkeys({blocked!r}))\n"
        f"sys.argv = [{str(SCRIPT)!r}] + sys.argv[1:]\n"
        f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n"
    )
    args = ["--data", str(idx_folder), "--seconds", "3", "--width", "0.125", "--projector", "128-128"]
    args += ["--batch-size", "64", "--methods", "imsvd", "vicreg", "--device", "cpu", "--out", str(out)]
    result = subprocess.run(
        [sys.executable, "-c", wrapper, *args], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["method"], r["seed"]) for r in rows] == [("imsvd", 0), ("vicreg", 0)]
    for row in rows:
        assert row["steps"] >= 1 and np.isfinite(row["final_loss"])
        assert 2.5 <= row["train_seconds"] < 60  # the budget, and the step under way when it ran out
        # Digits are easy: even a barely trained network's features classify them.
        assert row["linear_top1"] > 50 and row["knn_top1"] > 50
    assert "| imsvd | 1 |" in result.stdout and "| vicreg | 1 |" in result.stdout
