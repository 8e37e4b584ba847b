"""Kedro hooks: one MLflow run per ``kedro run``, and a project lock.

A small hook of our own rather than the kedro-mlflow plugin: the pretraining node must
hand the same run to Lightning's MLFlowLogger, the store must default to SQLite
(MLflow 3 refuses the file store), and the four runs of one ``dvc repro`` need a shared
tag; each is a few lines here, whereas the plugin adds its own configuration file,
pins narrower Kedro/MLflow ranges and opens its run in a way Lightning cannot reuse.
"""

from __future__ import annotations

import atexit
import fcntl
import logging
import math
import os
from pathlib import Path
from typing import Any

from kedro.framework.hooks import hook_impl

from imsvd.data import ImageData
from imsvd.distributed import is_writer
from imsvd.errors import ImsvdError
from imsvd.tracking import flatten, git_revision, resolve_tracking_uri

log = logging.getLogger(__name__)

ARTIFACT_SUFFIXES = {".png", ".json", ".csv"}


class ParameterCheckHook:
    """Parses every parameter section into its typed config before any dataset is read,
    so a typo or a bad value stops ``kedro run`` at once, naming the parameter.

    ``tryfirst``: pluggy calls the last registered hook first, and a bad parameter must
    stop the run before the project lock is taken or an MLflow run opened.
    """

    @hook_impl(tryfirst=True)
    def after_context_created(self, context: Any) -> None:
        from imsvd.config import check_sections

        check_sections(context.params)


class LockHook:
    """One ``kedro run`` at a time per project: a second one refuses with a clear message.

    ``flock`` is released by the kernel when the process dies, so a killed run never
    leaves a stale lock behind.
    """

    def __init__(self) -> None:
        self._handle: Any = None

    @hook_impl
    def after_context_created(self, context: Any) -> None:
        # The other ranks of a torchrun/srun launch neither lock nor log: they run no Kedro
        # pipeline (imsvd_pipelines.cli.train_only).
        if not is_writer() or self._handle is not None:
            return
        path = Path(context.project_path) / ".project.lock"
        handle = open(path, "a+")  # noqa: SIM115 - held open for the whole run
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise ImsvdError(
                f"another kedro run is using this project (lock {path}, held by pid {holder}); "
                "wait for it to finish and run again"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._handle = handle

    def _release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    @hook_impl
    def after_pipeline_run(self) -> None:
        self._release()

    @hook_impl
    def on_pipeline_error(self) -> None:
        self._release()


class MlflowTrackingHook:
    """Opens an MLflow run per ``kedro run`` and logs parameters, tags, metrics, artifacts."""

    def __init__(self) -> None:
        self._config: dict[str, Any] = {}
        self._params: dict[str, Any] = {}
        self._project_path = Path.cwd()
        self._catalog: Any = None
        self._active = False
        self._revision = "unknown"
        self._tagged: str | None = None  # the data fingerprint already tagged in this run
        self._guarded = False  # the exit handler is registered

    @hook_impl
    def after_context_created(self, context: Any) -> None:
        self._project_path = Path(context.project_path)
        try:
            self._config = dict(context.config_loader["mlflow"])
        except KeyError:
            self._config = {}
        self._params = dict(context.params)

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        if not is_writer():
            return
        import mlflow

        self._catalog = catalog
        uri = resolve_tracking_uri(self._config.get("tracking_uri"), self._project_path)
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(
            os.environ.get("MLFLOW_EXPERIMENT_NAME") or self._config.get("experiment_name", "imsvd")
        )
        # Kedro 1.x passes the selected pipelines as a list under "pipeline_names".
        names = run_params.get("pipeline_names") or [run_params.get("pipeline_name") or "__default__"]
        name = "+".join(names)
        if mlflow.active_run() is not None:
            mlflow.end_run()
        run = mlflow.start_run(run_name=f"kedro-{name}")
        self._active = True
        if not self._guarded:
            # Kedro calls on_pipeline_error for an Exception only: a Ctrl-C outside training
            # (KeyboardInterrupt) or a SystemExit skips it, and MLflow's own exit handler
            # would then end the run FINISHED. Registered after MLflow's, so it runs first.
            atexit.register(self._end, "KILLED")
            self._guarded = True
        self._tagged = None
        # Read once per run: `git` subprocesses on every dataset load would cost more than the load.
        self._revision = git_revision(self._project_path)
        mlflow.set_tags(
            {
                "kedro.pipeline": name,
                "kedro.session_id": str(run_params.get("run_id") or run_params.get("session_id")),
                "git.revision": self._revision,
                "imsvd.dvc_stage": os.environ.get("DVC_STAGE", ""),  # set by DVC for stage commands
            }
        )
        params = flatten(self._params)
        for chunk_start in range(0, len(params), 90):
            keys = list(params)[chunk_start : chunk_start + 90]
            mlflow.log_params({k: params[k] for k in keys})
        log.info("MLflow run %s in %s", run.info.run_id, uri)

    def _tag_data(self, data: Any) -> None:
        """Tag the run with the fingerprint of the image data it read or wrote (once:
        ``ImageData`` caches its fingerprint, and a tag already set is not set again)."""
        if not isinstance(data, ImageData):
            return
        fingerprint = data.fingerprint
        if fingerprint == self._tagged:
            return
        import mlflow

        mlflow.set_tags(
            {
                "data.fingerprint": fingerprint,
                # Shared by the four runs of one reproduction (same code, same data).
                "imsvd.reproduction": f"{self._revision}:{fingerprint[:12]}",
            }
        )
        self._tagged = fingerprint

    @hook_impl
    def after_dataset_loaded(self, dataset_name: str, data: Any) -> None:
        if self._active:
            self._tag_data(data)

    @hook_impl
    def after_dataset_saved(self, dataset_name: str, data: Any) -> None:
        if not self._active:
            return
        import mlflow

        self._tag_data(data)
        path = self._filepath(dataset_name)
        if dataset_name == "metrics" and isinstance(data, dict):
            numeric = {
                k: float(v)
                for k, v in flatten(data, leaf=lambda value: value).items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
            }
            mlflow.log_metrics(numeric)
        if dataset_name == "encoder" and isinstance(data, dict) and self._config.get("log_model", True):
            self._log_encoder(data)
        if path is not None and path.suffix in ARTIFACT_SUFFIXES and path.is_file():
            mlflow.log_artifact(str(path), artifact_path=path.parent.name)

    def _log_encoder(self, payload: dict[str, Any]) -> None:
        """The backbone (the feature extractor downstream tasks use) as an MLflow model.

        Saved in MLflow's ``pt2`` graph format, which loads without unpickling code;
        that format traces the model on an example input and needs one output tensor.
        """
        import mlflow
        import numpy as np

        from imsvd.checkpoints import load_encoder

        loaded = load_encoder(payload)
        size = loaded.image_size
        example = np.zeros((2, loaded.in_channels, size, size), dtype=np.float32)
        # Explicit requirements: inferring them would import and scan the environment.
        mlflow.pytorch.log_model(
            loaded.encoder.backbone,
            name="encoder",
            input_example=example,
            pip_requirements=["torch", "torchvision"],
        )

    def _filepath(self, dataset_name: str) -> Path | None:
        try:
            dataset = self._catalog.get(dataset_name)
        except Exception:  # noqa: BLE001 - a dataset the catalog cannot describe has no file
            return None
        raw = getattr(dataset, "_filepath", None)
        return Path(str(raw)) if raw is not None else None

    def _end(self, status: str) -> None:
        if not self._active:
            return
        import mlflow

        mlflow.end_run(status=status)
        self._active = False

    @hook_impl
    def after_pipeline_run(self) -> None:
        self._end("FINISHED")

    @hook_impl
    def on_pipeline_error(self, error: Exception) -> None:
        try:
            if self._active:
                import mlflow

                mlflow.set_tag("error", str(error)[:5000])
        except Exception:  # noqa: BLE001 - the run must still be ended FAILED, never left RUNNING
            log.warning("could not tag the MLflow run with the error", exc_info=True)
        finally:
            self._end("FAILED")
