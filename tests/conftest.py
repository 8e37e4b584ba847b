"""Shared fixtures and helpers: tiny image folders, the tiny parameter set, project
copies, one finished ``kedro run`` shared by the whole session, and Kedro run in process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


# --------------------------------------------------------------------------- tiny runs

#: The one tiny parameter set of every test that runs the pipelines: 1,347 real digit
#: training images, batch 16, 4 steps per epoch, a narrow network. Dotted keys, string values.
TINY: dict[str, str] = {
    "pretrain.epochs": "2",
    "pretrain.batch_size": "16",
    "pretrain.max_steps_per_epoch": "4",
    "pretrain.width": "0.125",
    "pretrain.projector": "128-128",
    "pretrain.imsvd.bin_size": "16",
    "pretrain.log_every_n_steps": "1",
    "augment.views": "2",
    "augment.size": "8",
    "evaluate.linear_epochs": "5",
}
TINY_STEPS_PER_EPOCH = 4


def tiny_params(**overrides: str) -> str:
    """``--params`` text: TINY with ``overrides`` (keys use ``__`` for the dot)."""
    values = {**TINY, **{k.replace("__", "."): v for k, v in overrides.items()}}
    return ",".join(f"{k}={v}" for k, v in values.items())


def tiny_tree(**overrides: str) -> dict[str, Any]:
    """TINY (with ``overrides``) as the nested, typed parameters Kedro hands its nodes."""
    import yaml

    tree: dict[str, Any] = {}
    for key, text in {**TINY, **{k.replace("__", "."): v for k, v in overrides.items()}}.items():
        *parents, leaf = key.split(".")
        node = tree
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = yaml.safe_load(text)
    return tree


@dataclass(frozen=True)
class FinishedRun:
    """A project copy after one complete tiny ``kedro run``, and how long the run took."""

    path: Path
    seconds: float


@pytest.fixture(scope="session")
def finished(tmp_path_factory: pytest.TempPathFactory) -> FinishedRun:
    """One complete tiny ``kedro run`` (validate, augment, pretrain, evaluate) through the
    real CLI, shared by the session: tests read it, or work on a copy (:func:`copy_of`)."""
    project = copy_project(tmp_path_factory.mktemp("finished") / "project")
    started = time.monotonic()
    kedro(project, "run", "--params", tiny_params())
    return FinishedRun(project, time.monotonic() - started)


def copy_of(finished: FinishedRun, destination: Path) -> Path:
    """The finished project with a fresh MLflow store (a copied store would point its
    artifacts back into the original project)."""
    shutil.copytree(finished.path, destination, symlinks=True)
    (destination / "mlflow.db").unlink(missing_ok=True)
    shutil.rmtree(destination / "mlruns", ignore_errors=True)
    return destination


@pytest.fixture
def in_process(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., dict[str, Any]]]:
    """Run a pipeline of a project copy in this process, through Kedro's own session,
    runner, catalog, hooks and MLflow store (no subprocess: for tests where no process
    boundary, exit code or signal is under test)."""
    from kedro.framework.project import configure_project
    from kedro.framework.session import KedroSession

    configure_project("imsvd_pipelines")

    def run(project: Path, pipeline: str, params: dict[str, Any]) -> dict[str, Any]:
        monkeypatch.chdir(project)  # catalog paths are relative to the project, as for `kedro run`
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
        with KedroSession.create(project_path=project, extra_params=params) as session:
            return session.run(pipeline_names=[pipeline])

    yield run
