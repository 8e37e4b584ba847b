"""The method library (``src/imsvd``) never imports Kedro; the Kedro glue is ``pipelines/``."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "src" / "imsvd"


def library_modules() -> list[str]:
    """Dotted names of every module of the method library."""
    names = []
    for path in sorted(LIBRARY.rglob("*.py")):
        parts = path.relative_to(LIBRARY.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def kedro_imports(path: Path) -> list[str]:
    """``line: statement`` of every import of kedro (or kedro_*) in ``path``, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        if any(name.split(".")[0].startswith("kedro") for name in names):
            found.append(f"{path}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_library_source_imports_kedro() -> None:
    offending = [hit for path in sorted(LIBRARY.rglob("*.py")) for hit in kedro_imports(path)]
    assert offending == []


def test_the_scan_sees_an_import_of_kedro(tmp_path: Path) -> None:
    module = tmp_path / "glue.py"
    module.write_text("def f():\n    from kedro.io import DataCatalog\n    import kedro_datasets\n")
    assert len(kedro_imports(module)) == 2


def test_importing_every_library_module_loads_no_kedro() -> None:
    modules = library_modules()
    assert {"imsvd.training.loop", "imsvd.augment.cache", "imsvd.evaluate"} <= set(modules)
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0].startswith('kedro')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]"


def test_every_dataset_between_nodes_is_declared_and_never_copied() -> None:
    """A dataset missing from the catalog becomes a MemoryDataset that deep-copies what it
    passes on (a second copy of every decoded image once sat between validate's nodes):
    every dataset is declared, and the in-memory ones with ``copy_mode: assign``."""
    import yaml
    from imsvd_pipelines.pipeline_registry import register_pipelines

    catalog = yaml.safe_load((ROOT / "conf/base/catalog.yml").read_text())
    names = {d for d in register_pipelines()["__default__"].datasets() if not d.startswith("params:")}
    assert names - catalog.keys() == set()
    in_memory = {n: e for n, e in catalog.items() if e.get("type") == "MemoryDataset"}
    assert in_memory and all(e.get("copy_mode") == "assign" for e in in_memory.values()), in_memory
