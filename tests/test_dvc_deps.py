"""dvc.yaml's code dependencies are exactly what each stage's nodes import.

Each stage lists its pipeline folder, the library modules its nodes import at module
level (directly or through other library modules), and the catalog's dataset module; a
stage that missed a module would not rerun when that module changed. The MLflow hook is
left out on purpose: it records runs but never changes an output.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"imsvd": ROOT / "src" / "imsvd", "imsvd_pipelines": ROOT / "pipelines"}
STAGES = ("validate", "augment", "pretrain", "evaluate")


def module_file(name: str) -> Path | None:
    """The source file of a project module (``imsvd.augment.cache``), or None."""
    top, *rest = name.split(".")
    if top not in PACKAGES:
        return None
    base = PACKAGES[top].joinpath(*rest)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def top_level_imports(path: Path) -> set[str]:
    """Project modules imported at module level of ``path`` (function-level imports are
    lazy on purpose and left out)."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {n for n in names if module_file(n) is not None}


def closure(start: set[str]) -> set[Path]:
    """Files of ``start`` and of everything they import, with each package's ``__init__``."""
    seen: set[Path] = set()
    todo = list(start)
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__
            path = module_file(".".join(parts[:i]))
            if path is None or path in seen:
                continue
            seen.add(path)
            todo.extend(top_level_imports(path))
    return seen


def expected_code_deps(stage: str) -> set[str]:
    nodes = f"imsvd_pipelines.{stage}.nodes"
    files = closure({nodes, "imsvd_pipelines.datasets"})
    stage_folder = PACKAGES["imsvd_pipelines"] / stage
    relative = {
        str(p.relative_to(ROOT))
        for p in files
        if stage_folder not in p.parents and p != PACKAGES["imsvd_pipelines"] / "__init__.py"
    }
    return relative | {f"pipelines/{stage}"}


@pytest.mark.parametrize("stage", STAGES)
def test_dvc_stage_lists_every_module_its_nodes_import(stage: str) -> None:
    deps = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]["deps"]
    code = {d for d in deps if d.startswith(("src/", "pipelines"))}
    assert code == expected_code_deps(stage)


if __name__ == "__main__":  # print the lists, to paste into dvc.yaml
    for name in STAGES:
        print(name, *sorted(expected_code_deps(name)), sep="\n  - ")
