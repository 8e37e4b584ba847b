"""Shared fixtures: tiny image folders written into ``tmp_path``."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def write_image(path: Path, pixels: np.ndarray, mode: str | None = None) -> Path:
    """Save ``pixels`` (H, W) or (H, W, 3) uint8 as an image file, creating folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(pixels[..., 0] if pixels.ndim == 3 and pixels.shape[2] == 1 else pixels)
    (image.convert(mode) if mode else image).save(path)
    return path


@pytest.fixture
def make_image_folder(tmp_path: Path) -> Callable[..., Path]:
    """Factory writing ``root/train/<class>/*.png`` and ``root/test/<class>/*.png``.

    Every image is a distinct seeded random grayscale picture with its own brightness,
    so the set passes the default validation thresholds.
    """

    def make(
        classes: Sequence[str] = ("cat", "dog"),
        train_per_class: int = 6,
        test_per_class: int = 2,
        size: tuple[int, int] = (8, 8),
        name: str = "images",
        seed: int = 0,
    ) -> Path:
        rng = np.random.default_rng(seed)
        root = tmp_path / name
        for split, count in (("train", train_per_class), ("test", test_per_class)):
            for class_name in classes:
                for i in range(count):
                    level = rng.integers(20, 200)
                    pixels = np.clip(level + rng.integers(-20, 20, size=size), 0, 255).astype(np.uint8)
                    write_image(root / split / class_name / f"{i:03d}.png", pixels)
        return root

    return make


REPO = Path(__file__).resolve().parents[1]


def copy_project(destination: Path, skip: Sequence[str] = ()) -> Path:
    """Copy the project's own files (tracked and untracked-not-ignored) to ``destination``.

    Generated data, the virtual environment and local stores stay behind, so the copy is
    what a fresh clone would hold plus the working tree's uncommitted edits. ``skip``
    names paths to leave out (e.g. a committed metric that a test wants absent).
    """
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for relative in filter(None, listed.split("\0")):
        source = REPO / relative
        if source.is_file() and relative not in skip:
            target = destination / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return destination


def kedro_env(project: Path) -> dict[str, str]:
    """Environment for a ``kedro run`` subprocess: no telemetry, wide plain logs, local MLflow."""
    import os

    env = dict(os.environ)
    env.update(
        KEDRO_DISABLE_TELEMETRY="true",
        DO_NOT_TRACK="1",
        COLUMNS="250",
        MLFLOW_TRACKING_URI=f"sqlite:///{project / 'mlflow.db'}",
        PYTHONUNBUFFERED="1",
    )
    return env


def kedro(project: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``python -m kedro ARGS`` in ``project``; with ``check``, fail with its output."""
    result = subprocess.run(
        [sys.executable, "-m", "kedro", *args],
        cwd=project,
        env=kedro_env(project),
        capture_output=True,
        text=True,
        timeout=900,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"kedro {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A fresh copy of the project to run ``kedro`` in."""
    return copy_project(tmp_path / "project")
