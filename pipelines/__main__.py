"""``python -m imsvd_pipelines run ...``: the project's ``kedro run`` as a module, for
launchers that start a Python module on every rank (``torchrun -m``, ``srun python -m``).

It is the ``kedro`` command's own start-up (find the project from the working folder,
configure its settings and logging), then the project's ``run`` (:mod:`imsvd_pipelines.cli`).
The ranks that do not write log to the console only (``conf/logging_console.yml``), so
that they never append to rank 0's ``info.log``.
"""

from __future__ import annotations

import os
from pathlib import Path

from imsvd.distributed import is_writer

CONSOLE_LOGGING = Path("conf/logging_console.yml")


def main() -> None:
    project = Path.cwd()
    if not is_writer() and "KEDRO_LOGGING_CONFIG" not in os.environ and (project / CONSOLE_LOGGING).is_file():
        os.environ["KEDRO_LOGGING_CONFIG"] = str(project / CONSOLE_LOGGING)
    # Imported only now: importing Kedro's project module configures logging.
    from kedro.framework.startup import bootstrap_project

    bootstrap_project(project)
    from imsvd_pipelines.cli import cli

    cli(prog_name="python -m imsvd_pipelines")


if __name__ == "__main__":
    main()
