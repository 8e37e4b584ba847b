"""Project CLI: Kedro's own ``kedro run``, with the project's errors shown plainly.

Bad input and bad configuration raise :class:`imsvd.errors.ImsvdError` with a message
that names the file or parameter; a user should read that message, not a traceback from
deep inside a library. Everything else (unexpected bugs) keeps its full traceback.
"""

from __future__ import annotations

import sys
from typing import Any

import click
from kedro.framework.cli.project import run as kedro_run

from imsvd.errors import ImsvdError


def project_error(exc: BaseException | None) -> ImsvdError | None:
    """The project error behind ``exc`` (itself, or anywhere in its cause chain)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, ImsvdError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _run(**kwargs: Any) -> None:
    try:
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
