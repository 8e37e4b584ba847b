"""The DVC pipeline (dvc.yaml) and its MLflow trail, with the real ``dvc`` in a copy of the project.

Every test works in a temporary copy (tracked and untracked-but-not-ignored files, a fresh
``git init`` and commit) with the tiny parameters of every pipeline test (conftest.TINY),
so a whole ``dvc repro`` takes about a minute on two cores. One reproduction is shared by the module; tests that change the
project work in their own copy of that reproduced project, with its own DVC remote
(``../../imsvd-dvc-storage`` from ``.dvc/``, i.e. next to the copy) and MLflow database.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import TINY, TINY_STEPS_PER_EPOCH, copy_project, fresh_mlflow_store, tiny_tree

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
STAGES = ["validate", "augment", "pretrain", "evaluate"]
METRICS = "data/08_reporting/metrics.json"
STEPS = int(TINY["pretrain.epochs"]) * TINY_STEPS_PER_EPOCH  # optimiser steps of one tiny run
FILES = {
    "pretrain": "pretrain",
    "augment": "augment",
    "evaluate": "evaluate",
    "data": "validate",
    "validate": "validate",
}


def _dvc() -> str:
    found = shutil.which("dvc", path=str(BIN)) or shutil.which("dvc")
    if found is None:
        pytest.skip("dvc is not installed in this environment")
    return found


def _merge(base: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    return {
        **base,
        **{k: _merge(base.get(k, {}), v) if isinstance(v, dict) else v for k, v in values.items()},
    }


def set_parameters(project: Path, section: str, values: dict[str, Any]) -> None:
    """Update section ``section`` of the copy's ``conf/base/parameters_<pipeline>.yml``
    (nested values are merged, so ``{"imsvd": {"bin_size": 16}}`` keeps the other fields)."""
    path = project / "conf" / "base" / f"parameters_{FILES[section]}.yml"
    tree = yaml.safe_load(path.read_text())
    tree[section] = _merge(tree[section], values)
    path.write_text(yaml.safe_dump(tree, sort_keys=False))


def environment(mlflow_db: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MLFLOW_"))}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # stage commands call `kedro`
        DVC_NO_ANALYTICS="1",
        COLUMNS="1000",  # dvc cuts long lines (a remote's path) to the terminal's width
        KEDRO_DISABLE_TELEMETRY="true",
        DO_NOT_TRACK="1",
        MLFLOW_TRACKING_URI=f"sqlite:///{mlflow_db}",
        GIT_AUTHOR_NAME="test",
        GIT_AUTHOR_EMAIL="test@example.com",
        GIT_COMMITTER_NAME="test",
        GIT_COMMITTER_EMAIL="test@example.com",
    )
    return env


@dataclass
class Project:
    """A temporary copy of the project, with the environment its commands run in."""

    path: Path
    env: dict[str, str]
    mlflow_db: Path

    def run(self, *command: str, timeout: float = 600) -> str:
        """Run a command in the copy; fail the test with its output when it fails."""
        done = subprocess.run(
            command, cwd=self.path, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        output = done.stdout + done.stderr
        assert done.returncode == 0, f"{' '.join(command)} exited {done.returncode}:\n{output[-6000:]}"
        return output

    def dvc(self, *args: str) -> str:
        return self.run(_dvc(), *args)

    def git(self, *args: str) -> str:
        return self.run("git", *args)

    def commit(self, message: str) -> None:
        self.git("add", "-A")
        self.git("commit", "-q", "-m", message)


def stages_run(output: str) -> list[str]:
    """Stage names in the order ``dvc repro``/``dvc exp run`` ran them."""
    return re.findall(r"Running stage '([\w-]+)'", output)


def new_project(root: Path) -> Project:
    """A fresh copy with tiny parameters, committed in a new git repository.

    metrics.json is git-tracked (a ``cache: false`` metric) but a result, not a source:
    a fresh clone made before any results were committed has none.
    """
    path = copy_project(root / "project", skip=(METRICS,))
    for section, values in tiny_tree().items():
        set_parameters(path, section, values)
    (path / "mlflow.db").unlink()  # the stages log to the store beside the copy
    project = Project(path, environment(root / "mlflow.db"), fresh_mlflow_store(root / "mlflow.db"))
    project.git("init", "-q")
    project.git("config", "user.name", "test")  # dvc exp commits through its own git client
    project.git("config", "user.email", "test@example.com")
    project.commit("project at test start")
    return project


def clone_project(source: Project, root: Path) -> Project:
    """An independent copy of a (reproduced) project: own remote and MLflow database."""
    path = root / "project"
    shutil.copytree(source.path, path, symlinks=True)
    return Project(path, environment(root / "mlflow.db"), fresh_mlflow_store(root / "mlflow.db"))


def digest(path: Path) -> str:
    """Content hash of a file, or of a folder's files by relative name."""
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    sha = hashlib.sha256()
    for item in sorted(p for p in path.rglob("*") if p.is_file()):
        sha.update(str(item.relative_to(path)).encode() + b"\0" + item.read_bytes())
    return sha.hexdigest()


def cached_outputs(project: Project) -> list[str]:
    """Every output DVC caches (metrics.json is ``cache: false``), read from dvc.yaml."""
    stages = yaml.safe_load((project.path / "dvc.yaml").read_text())["stages"]
    paths = []
    for stage in stages.values():
        for entry in stage.get("outs", []) + stage.get("plots", []):
            name, options = next(iter(entry.items())) if isinstance(entry, dict) else (entry, None)
            if (options or {}).get("cache", True):
                paths.append(name)
    return paths


@dataclass
class Reproduction:
    project: Project
    output: str


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory: pytest.TempPathFactory) -> Reproduction:
    """A fresh copy after one ``dvc repro``; then its results committed, as a user would."""
    project = new_project(tmp_path_factory.mktemp("reproduced"))
    output = project.dvc("repro")
    project.commit("reproduce")
    return Reproduction(project, output)


@pytest.fixture
def clone(reproduced: Reproduction, tmp_path: Path) -> Project:
    return clone_project(reproduced.project, tmp_path)


@pytest.fixture(scope="module")
def pretrain_changed(reproduced: Reproduction, tmp_path_factory: pytest.TempPathFactory) -> Reproduction:
    """A clone of the reproduction where a committed pretraining parameter changed, reproduced."""
    project = clone_project(reproduced.project, tmp_path_factory.mktemp("pretrain_changed"))
    set_parameters(project.path, "pretrain", {"base_lr": 0.3})
    project.commit("raise the learning rate")
    return Reproduction(project, project.dvc("repro"))


# --- dvc repro ---------------------------------------------------------------------


def test_fresh_repro_runs_the_four_stages_in_order_and_writes_the_lock(reproduced: Reproduction) -> None:
    project = reproduced.project
    assert stages_run(reproduced.output) == STAGES
    lock = yaml.safe_load((project.path / "dvc.lock").read_text())
    assert list(lock["stages"]) == STAGES
    for stage in lock["stages"].values():
        assert all("md5" in out for out in stage["outs"]), stage
    for name in cached_outputs(project):
        assert (project.path / name).exists(), f"{name} missing after dvc repro"
    # The plot definition of dvc.yaml (x: step, y: total) needs those columns.
    with open(project.path / "data/07_model_output/pretrain_history.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {"step", "total"} <= set(rows[0])
    assert len(rows) == STEPS


def test_second_repro_runs_nothing(reproduced: Reproduction) -> None:
    output = reproduced.project.dvc("repro")
    assert stages_run(output) == []
    assert "Data and pipelines are up to date" in output
    assert "up to date" in reproduced.project.dvc("status")


def test_a_pretraining_parameter_reruns_only_pretrain_and_evaluate(pretrain_changed: Reproduction) -> None:
    assert stages_run(pretrain_changed.output) == ["pretrain", "evaluate"]
    assert "Stage 'validate' didn't change" in pretrain_changed.output
    assert "Stage 'augment' didn't change" in pretrain_changed.output


@pytest.fixture(scope="module")
def augment_experiment(reproduced: Reproduction, tmp_path_factory: pytest.TempPathFactory) -> Reproduction:
    """A clone where ``dvc exp run -S`` changed an augmentation parameter: one run that
    shows both what an augment change reruns and how experiments are listed."""
    project = clone_project(reproduced.project, tmp_path_factory.mktemp("augment_experiment"))
    output = project.dvc(
        "exp", "run", "-n", "milder-crops", "-S", "conf/base/parameters_augment.yml:augment.scale_min=0.3"
    )
    return Reproduction(project, output)


def test_an_augmentation_parameter_reruns_from_augment(augment_experiment: Reproduction) -> None:
    assert stages_run(augment_experiment.output) == ["augment", "pretrain", "evaluate"]
    assert "Stage 'validate' didn't change" in augment_experiment.output


# --- metrics and plots -------------------------------------------------------------


def test_metrics_show_prints_the_evaluation_metrics(reproduced: Reproduction) -> None:
    project = reproduced.project
    metrics = json.loads((project.path / METRICS).read_text())
    text = project.dvc("metrics", "show")
    assert METRICS in text
    assert "knn_top1" in text
    shown = json.loads(project.dvc("metrics", "show", "--json"))
    values = shown[""]["data"][METRICS]["data"]
    assert values["knn_top1"] == pytest.approx(metrics["knn_top1"])


def test_metrics_diff_compares_the_workspace_with_the_last_commit(
    reproduced: Reproduction, pretrain_changed: Reproduction
) -> None:
    project = pretrain_changed.project
    before = json.loads((reproduced.project.path / METRICS).read_text())
    after = json.loads((project.path / METRICS).read_text())
    assert "knn_top1" in project.dvc("metrics", "diff", "--all")
    diff = json.loads(project.dvc("metrics", "diff", "--all", "--json"))
    knn = diff[METRICS]["knn_top1"]
    assert knn["old"] == pytest.approx(before["knn_top1"])
    assert knn["new"] == pytest.approx(after["knn_top1"])


def test_plots_show_draws_the_loss_curve(reproduced: Reproduction, tmp_path: Path) -> None:
    shown = json.loads(reproduced.project.dvc("plots", "show", "--json"))
    (plot,) = shown["data"]["data/07_model_output/pretrain_history.csv"]
    spec = plot["content"]
    assert spec["encoding"]["x"]["field"] == "step"
    assert spec["layer"][0]["encoding"]["y"]["field"] == "total"
    assert [float(row["step"]) for row in spec["data"]["values"]] == [float(s) for s in range(1, STEPS + 1)]
    reproduced.project.dvc("plots", "show", "-o", str(tmp_path / "plots"))
    assert (tmp_path / "plots" / "index.html").is_file()


# --- experiments -------------------------------------------------------------------


def test_exp_run_with_a_parameter_override_is_listed_by_exp_show(augment_experiment: Reproduction) -> None:
    project = augment_experiment.project
    listing = project.dvc("exp", "show", "--csv")
    assert "milder-crops" in listing
    rows = list(csv.DictReader(listing.splitlines()))
    experiment = next(row for row in rows if row["Experiment"] == "milder-crops")
    assert experiment["augment.scale_min"] == "0.3"
    assert float(experiment["knn_top1"]) > 0
    assert "milder-crops" in project.dvc("exp", "list")


# --- remote ------------------------------------------------------------------------


def test_push_then_pull_restores_deleted_outputs_from_the_local_remote(clone: Project) -> None:
    remote = clone.path.parent / "imsvd-dvc-storage"  # .dvc/config: url = ../../imsvd-dvc-storage
    listed = clone.dvc("remote", "list").split()
    assert listed[:2] == ["storage", str(remote.resolve())] and "(default)" in listed
    outputs = cached_outputs(clone)
    before = {name: digest(clone.path / name) for name in outputs}
    clone.dvc("push")
    assert any(p.is_file() for p in remote.rglob("*")), "dvc push wrote nothing to the remote"
    for name in outputs:
        target = clone.path / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    shutil.rmtree(clone.path / ".dvc" / "cache")  # so the pull has to come from the remote
    clone.dvc("pull")
    assert {name: digest(clone.path / name) for name in outputs} == before
    assert "up to date" in clone.dvc("status")


# --- MLflow ------------------------------------------------------------------------


def _reproduction_runs(project: Project) -> Any:
    """The MLflow runs tagged like the first run of the copy's database, oldest first."""
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{project.mlflow_db}")
    first = mlflow.search_runs(experiment_names=["imsvd"], order_by=["attributes.start_time ASC"])
    tag = first["tags.imsvd.reproduction"].iloc[0]
    return mlflow.search_runs(
        search_all_experiments=True,
        filter_string=f"tags.`imsvd.reproduction` = '{tag}'",
        order_by=["attributes.start_time ASC"],
    )


def test_mlflow_one_repro_gives_four_runs_sharing_experiment_and_tag(reproduced: Reproduction) -> None:
    runs = _reproduction_runs(reproduced.project)
    assert len(runs) == 4
    assert runs["experiment_id"].nunique() == 1
    assert set(runs["status"]) == {"FINISHED"}
    revision = reproduced.project.git("rev-parse", "--short=12", "HEAD~1").strip()  # the repro's commit
    assert runs["tags.imsvd.reproduction"].iloc[0].startswith(f"{revision}:")


def test_mlflow_evaluate_run_has_the_metrics_and_pretrain_run_the_curves_and_model(
    reproduced: Reproduction,
) -> None:
    import mlflow

    runs = _reproduction_runs(reproduced.project)
    validate_run, augment_run, pretrain_run, evaluate_run = runs.itertuples()
    metrics = json.loads((reproduced.project.path / METRICS).read_text())
    knn = runs["metrics.knn_top1"].tolist()
    assert [math.isnan(v) for v in knn] == [True, True, True, False]
    assert knn[3] == pytest.approx(metrics["knn_top1"])

    client = mlflow.MlflowClient()
    history = client.get_metric_history(pretrain_run.run_id, "train/total_step")
    assert len(history) == STEPS // int(TINY["pretrain.log_every_n_steps"])
    assert all(math.isfinite(point.value) for point in history)
    models = mlflow.search_logged_models(
        experiment_ids=[pretrain_run.experiment_id], filter_string="name = 'encoder'", output_format="list"
    )
    assert [model.source_run_id for model in models] == [pretrain_run.run_id]
    artifacts = {item.path for item in client.list_artifacts(pretrain_run.run_id, "07_model_output")}
    assert "07_model_output/pretrain_history.csv" in artifacts


def test_mlflow_runs_are_named_after_their_pipeline(reproduced: Reproduction) -> None:
    runs = _reproduction_runs(reproduced.project)
    assert runs["tags.mlflow.runName"].tolist() == [f"kedro-{stage}" for stage in STAGES]
    assert runs["tags.kedro.pipeline"].tolist() == STAGES


def test_mlflow_runs_record_their_dvc_stage(reproduced: Reproduction) -> None:
    runs = _reproduction_runs(reproduced.project)
    assert runs["tags.imsvd.dvc_stage"].tolist() == STAGES


def test_mlflow_runs_share_the_tag_when_dvc_lock_is_committed(pretrain_changed: Reproduction) -> None:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{pretrain_changed.project.mlflow_db}")
    runs = mlflow.search_runs(experiment_names=["imsvd"])
    assert len(runs) == 2  # pretrain and evaluate
    assert runs["tags.imsvd.reproduction"].nunique() == 1, runs["tags.imsvd.reproduction"].tolist()


# --- a cluster run -----------------------------------------------------------------


def test_a_launched_pretraining_is_recorded_with_dvc_commit(reproduced: Reproduction, tmp_path: Path) -> None:
    """README "Many GPUs, many machines": the launcher runs the pretrain stage's work
    (here ``torchrun --standalone``, two processes), ``dvc commit pretrain`` records its
    outputs in the lock, and ``dvc repro`` then runs only what follows (evaluate)."""
    project = clone_project(reproduced.project, tmp_path)
    set_parameters(project.path, "pretrain", {"seed": 1, "precision": "32-true"})
    before = digest(project.path / "data/06_models/encoder.pt")
    env = dict(project.env, OMP_NUM_THREADS="1")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    launch += ["-m", "imsvd_pipelines", "run", "--pipeline=pretrain"]
    done = subprocess.run(launch, cwd=project.path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    assert digest(project.path / "data/06_models/encoder.pt") != before
    assert "pretrain" in project.dvc("status")  # changed parameters and outputs, not recorded yet

    project.dvc("commit", "--force", "pretrain")
    lock = yaml.safe_load((project.path / "dvc.lock").read_text())
    recorded = {o["path"]: o["md5"] for o in lock["stages"]["pretrain"]["outs"]}
    assert (
        recorded["data/06_models/encoder.pt"]
        == hashlib.md5((project.path / "data/06_models/encoder.pt").read_bytes()).hexdigest()
    )
    assert stages_run(project.dvc("repro")) == ["evaluate"]
