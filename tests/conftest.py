"""Shared fixtures and helpers: tiny image folders, the tiny parameter set, project
copies, one finished ``kedro run`` shared by the whole session, and Kedro run in process."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
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

# Under pytest-xdist every worker runs real training and real subprocesses: give each its
# share of the cores (read by torch at import, inherited by kedro, dvc and DDP children),
# so two workers do not each spread over both cores and slow each other down.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    os.environ.setdefault(
        "OMP_NUM_THREADS", str(max(1, _cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    )


@functools.cache
def _migrated_mlflow_store() -> Path:
    """An empty MLflow SQLite store with its schema made, once per test process: a new
    store runs some forty schema migrations, which cost more than a tiny run's tracking."""
    store = Path(tempfile.mkdtemp(prefix="imsvd-mlflow-")) / "mlflow.db"
    code = "import sys, mlflow; mlflow.MlflowClient(sys.argv[1]).search_experiments()"
    subprocess.run([sys.executable, "-c", code, f"sqlite:///{store}"], check=True, capture_output=True)
    return store


def fresh_mlflow_store(path: Path) -> Path:
    """Put an empty, ready MLflow store at ``path`` (replacing any store there)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_migrated_mlflow_store(), path)
    return path


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
    fresh_mlflow_store(destination / "mlflow.db")
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


def params_tree(text: str) -> dict[str, Any]:
    """``--params`` text as the nested, typed parameters Kedro's CLI makes of it (OmegaConf)."""
    from omegaconf import OmegaConf

    tree: dict[str, Any] = OmegaConf.to_container(OmegaConf.from_dotlist(text.split(",")))  # type: ignore[assignment]
    return tree


def tiny_tree(**overrides: str) -> dict[str, Any]:
    """TINY (with ``overrides``) as the parameters ``kedro run --params`` would pass on."""
    return params_tree(tiny_params(**overrides))


def tiny_pretrain(checkpoint_dir: Path, **overrides: Any) -> Any:
    """A ``PretrainConfig`` for in-process training tests: a width-0.125 backbone, a 64-64
    projector, IMSVD at bin 16, one epoch of batch 16 on one CPU process, no resume."""
    from imsvd.config import IMSVDConfig, PretrainConfig

    values: dict[str, Any] = dict(
        width=0.125,
        projector="64-64",
        imsvd=IMSVDConfig(bin_size=16),
        epochs=1,
        batch_size=16,
        checkpoint_dir=str(checkpoint_dir),
        accelerator="cpu",
        devices="1",
        resume=False,
    )
    return PretrainConfig(**{**values, **overrides})


@dataclass(frozen=True)
class FinishedRun:
    """A project copy after one complete tiny ``kedro run``, and how long the run took."""

    path: Path
    seconds: float


@pytest.fixture(scope="session")
def finished(tmp_path_factory: pytest.TempPathFactory) -> FinishedRun:
    """One complete tiny ``kedro run`` (validate, augment, pretrain, evaluate) through the
    real CLI, shared by the session: tests read it, or work on a copy (:func:`copy_of`).

    Under pytest-xdist the first worker that needs it makes it and the others wait for it
    and reuse it (pytest-xdist's recipe: a file lock in the folder all workers share).
    """
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    project, timing = shared / "finished" / "project", shared / "finished" / "seconds"
    with FileLock(str(shared / "finished.lock")):
        if not timing.is_file():
            shutil.rmtree(project.parent, ignore_errors=True)
            copy_project(project)
            started = time.monotonic()
            kedro(project, "run", "--params", tiny_params())
            timing.write_text(str(time.monotonic() - started))
    return FinishedRun(project, float(timing.read_text()))


def copy_of(finished: FinishedRun, destination: Path) -> Path:
    """The finished project with a fresh MLflow store (a copied store would point its
    artifacts back into the original project)."""
    shutil.copytree(finished.path, destination, symlinks=True)
    fresh_mlflow_store(destination / "mlflow.db")
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
        with KedroSession.create(project_path=project, runtime_params=params) as session:
            return session.run(pipeline_names=[pipeline])

    yield run
