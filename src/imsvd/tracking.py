"""MLflow helpers shared by the Kedro hook and the pretraining node (no Kedro here)."""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_URI = "sqlite:///mlflow.db"


def resolve_tracking_uri(configured: str | None, project_path: Path) -> str:
    """``MLFLOW_TRACKING_URI`` wins; a relative ``sqlite:///file`` is anchored at the project."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or configured or DEFAULT_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        uri = prefix + str((project_path / uri[len(prefix) :]).resolve())
    return uri


def param_value(value: Any) -> str:
    """A parameter as MLflow stores it: a string of at most 6,000 characters."""
    return str(value)[:6000]


def flatten(
    tree: Mapping[str, Any], prefix: str = "", leaf: Callable[[Any], Any] = param_value
) -> dict[str, Any]:
    """Nested mappings as dotted keys (``pretrain.imsvd.bin_size``), each leaf through
    ``leaf`` (by default the parameter string MLflow stores; pass ``lambda v: v`` to keep
    values as they are, as for metrics)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + ".", leaf))
        else:
            flat[name] = leaf(value)
    return flat


def git_revision(path: Path) -> str:
    """The commit the code is at (``-dirty`` if uncommitted changes), or ``unknown``.

    Files that DVC rewrites while a reproduction runs (``dvc.lock``, outputs under
    ``data/``) do not count as changes, so the four stages of one ``dvc repro`` carry
    the same revision.
    """
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=path, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            [
                "git",
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                ".",
                ":(exclude)dvc.lock",
                ":(exclude)data",
            ],
            cwd=path,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("-dirty" if dirty else "")


def lightning_logger() -> Any:
    """An MLFlowLogger writing into the active MLflow run, or ``False`` when none is active.

    Lightning's logger defaults to the ``./mlruns`` file store that MLflow 3 refuses,
    so the tracking URI is passed explicitly.
    """
    import mlflow

    run = mlflow.active_run()
    if run is None:
        return False
    from lightning.pytorch.loggers import MLFlowLogger

    return MLFlowLogger(
        experiment_name=mlflow.get_experiment(run.info.experiment_id).name,
        tracking_uri=mlflow.get_tracking_uri(),
        run_id=run.info.run_id,
        log_model=False,
    )
