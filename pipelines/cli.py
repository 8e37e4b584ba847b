"""Project CLI: Kedro's own ``kedro run``, with the project's errors shown plainly, and
the same command under the launchers clusters use (``torchrun``, ``srun``).

Bad input and bad configuration raise :class:`imsvd.errors.ImsvdError` with a message
that names the file or parameter; a user should read that message, not a traceback from
deep inside a library. Everything else (unexpected bugs) keeps its full traceback.

Under a launcher every process runs this command. Rank 0 runs the Kedro session as
``kedro run`` would (project lock, MLflow run, catalog outputs, checkpoints); every other
rank only trains: it reads the same configuration and inputs through the catalog, runs
the pretrain node's function, and leaves without saving anything or opening MLflow.
Only the ``pretrain`` pipeline may be launched: ``validate`` and ``augment`` need no GPU
and run once before the launch (README, "Many GPUs, many machines").
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import click
from kedro.framework.cli.project import run as kedro_run

from imsvd.distributed import Launch, launched
from imsvd.errors import ConfigError, ImsvdError

log = logging.getLogger(__name__)

LAUNCHABLE = "pretrain"


def project_error(exc: BaseException | None) -> ImsvdError | None:
    """The project error behind ``exc`` (itself, or anywhere in its cause chain)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, ImsvdError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _pipelines(kwargs: dict[str, Any]) -> list[str]:
    if kwargs.get("pipeline"):
        return [kwargs["pipeline"]]
    return sorted(set(kwargs.get("pipelines") or [])) or ["__default__"]


def _check_launch(launch: Launch, kwargs: dict[str, Any]) -> None:
    names = _pipelines(kwargs)
    if names != [LAUNCHABLE]:
        raise ConfigError(
            f"--pipeline={','.join(names)} under {launch.launcher} ({launch.world_size} processes): only "
            f"--pipeline={LAUNCHABLE} is launched on many processes; run `kedro run "
            "--pipelines=validate,augment` once before the launch and `kedro run --pipeline=evaluate` after it"
        )
    options = {
        "node_names": "--nodes",
        "from_nodes": "--from-nodes",
        "to_nodes": "--to-nodes",
        "from_inputs": "--from-inputs",
        "to_outputs": "--to-outputs",
        "tags": "--tags",
    }
    narrowing = [option for key, option in options.items() if kwargs.get(key)]
    if narrowing:
        raise ConfigError(
            f"{narrowing[0]} cannot be combined with a launch: every rank must run the same, whole pretrain pipeline"
        )


def console_only() -> None:
    """Drop the file handlers (``info.log``) of this process's logging: the launcher
    collects every rank's console, and N processes appending to (and rotating) rank 0's
    log file on shared storage would garble it."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
        root.removeHandler(handler)
        handler.close()


def train_only(kwargs: dict[str, Any]) -> None:
    """A non-zero rank: the pretrain node's function on the catalog's inputs, nothing saved.

    The node is the same one rank 0 runs inside its Kedro session, with the same
    parameters (``--env``, ``--conf-source``, ``--params``), so both build the same
    trainer and meet in the same collective calls; its outputs are dropped here.
    """
    from kedro.framework.project import pipelines
    from kedro.framework.session import KedroSession

    with KedroSession.create(
        env=kwargs.get("env"), conf_source=kwargs.get("conf_source"), runtime_params=kwargs.get("params")
    ) as session:
        assert isinstance(session, KedroSession)  # create() is typed as the abstract session
        catalog = session.load_context().catalog
        for node in pipelines[LAUNCHABLE].nodes:
            node.run({name: catalog.load(name) for name in node.inputs})


def _run(**kwargs: Any) -> None:
    try:
        launch = launched()
        if launch is not None and launch.world_size > 1:
            _check_launch(launch, kwargs)
            if launch.global_rank != 0:
                console_only()
                log.info(
                    "rank %d of %d: training only; rank 0 writes the outputs",
                    launch.global_rank,
                    launch.world_size,
                )
                train_only(kwargs)
                return
        kedro_run.callback(**kwargs)  # type: ignore[misc]
    except Exception as exc:
        error = project_error(exc)
        if error is None:
            raise
        click.secho(f"Error ({type(error).__name__}): {error}", fg="red", err=True)
        sys.exit(1)


@click.group(name="imsvd")
def cli() -> None:
    """Commands of the imsvd project."""


cli.add_command(
    click.Command(
        name="run",
        params=kedro_run.params,
        callback=_run,
        help=kedro_run.help,
        short_help=kedro_run.short_help,
    )
)
