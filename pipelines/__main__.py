"""``python -m imsvd_pipelines run ...``: the project's ``kedro run`` as a module, for
launchers that start a Python module on every rank (``torchrun -m``, ``srun python -m``).

It is the ``kedro`` command's own start-up (find the project from the working folder,
configure its settings), then the project's ``run`` (:mod:`imsvd_pipelines.cli`).
"""

from __future__ import annotations

from pathlib import Path

from kedro.framework.startup import bootstrap_project


def main() -> None:
    bootstrap_project(Path.cwd())
    from imsvd_pipelines.cli import cli

    cli(prog_name="python -m imsvd_pipelines")


if __name__ == "__main__":
    main()
