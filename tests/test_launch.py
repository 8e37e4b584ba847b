"""``kedro run --pipeline=pretrain`` under ``torchrun``: two "nodes" on this machine (two
launcher invocations, one CPU process each, gloo, a c10d rendezvous on a loopback port)
and one node with two processes (``--standalone``).

Each node runs in its own copy of the project, as two machines would, with the
checkpoint folder on storage both see (an absolute path), as a cluster's shared file
system would be. What is checked: the weights equal those of one plain ``kedro run`` on
the whole batch; exactly one MLflow run and one set of outputs exist, and the other
node's copy is untouched; a killed node ends the job on the other node with a non-zero
exit in bounded time, and the job then resumes from the last complete checkpoint.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import FinishedRun, copy_of, kedro, kedro_env, tiny_params

pytestmark = pytest.mark.slow

STEPS = 3
# float32: bf16 autocast (auto on a CPU with native bf16) rounds each rank's half batch
# differently from the whole batch, and the equality below is to float rounding.
PARAMS = {
    "pretrain__precision": "32-true",
    "pretrain__epochs": "1",
    "pretrain__max_steps_per_epoch": str(STEPS),
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch(project: Path, params: str, *launcher: str) -> subprocess.Popen[str]:
    """``torchrun LAUNCHER -m imsvd_pipelines run --pipeline=pretrain --params PARAMS`` in
    ``project``."""
    env = kedro_env(project)
    env["OMP_NUM_THREADS"] = "1"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *launcher,
        "-m",
        "imsvd_pipelines",
        "run",
        "--pipeline=pretrain",
        "--params",
        params,
    ]
    return subprocess.Popen(
        command, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def two_nodes(
    projects: tuple[Path, Path], params: str
) -> tuple[subprocess.Popen[str], subprocess.Popen[str]]:
    endpoint = f"127.0.0.1:{free_port()}"
    common = (
        "--nnodes=2",
        "--nproc-per-node=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={endpoint}",
        "--rdzv-id=test",
    )
    return tuple(launch(p, params, *common) for p in projects)  # type: ignore[return-value]


def kill_node(launcher: subprocess.Popen[str]) -> None:
    """SIGKILL a whole "node": the launcher and its workers (which torchrun starts in
    sessions of their own, out of reach of the launcher's process group)."""
    import psutil

    parent = psutil.Process(launcher.pid)
    for process in [*parent.children(recursive=True), parent]:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signal.SIGKILL)


def finish(process: subprocess.Popen[str], timeout: float = 600) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-5000:]
    return output


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and modification time."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file()
    }


def log_file(project: Path) -> bytes | None:
    path = project / "info.log"
    return path.read_bytes() if path.is_file() else None


def mlflow_runs(project: Path) -> list[tuple[str, str]]:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    return [(r.info.run_name, r.info.status) for r in client.search_runs(experiments)]


def encoder_state(project: Path) -> dict[str, torch.Tensor]:
    from imsvd.checkpoints import load_weights

    return load_weights(project / "data/06_models/encoder.pt")["state_dict"]


def writer_and_other(projects: tuple[Path, Path]) -> tuple[Path, Path]:
    """Which copy held rank 0: the c10d rendezvous, not the command line, assigns ranks."""
    written = [p for p in projects if mlflow_runs(p)]
    assert len(written) == 1, f"MLflow runs in {len(written)} copies, expected exactly one"
    return written[0], next(p for p in projects if p != written[0])


@pytest.fixture(scope="module")
def single(finished: FinishedRun, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One plain ``kedro run --pipeline=pretrain`` on the whole batch: the reference."""
    project = copy_of(finished, tmp_path_factory.mktemp("single") / "project")
    shared = tmp_path_factory.mktemp("single-ckpt")
    kedro(
        project,
        "run",
        "--pipeline=pretrain",
        "--params",
        tiny_params(**PARAMS, pretrain__checkpoint_dir=str(shared)),
    )
    return project


def assert_same_training(launched: Path, single: Path) -> None:
    """Same per-step losses and the same weights (to float rounding) as the single process,
    and the weights moved: equality of two untrained encoders would prove nothing."""
    import pandas as pd

    one = pd.read_csv(single / "data/07_model_output/pretrain_history.csv")
    many = pd.read_csv(launched / "data/07_model_output/pretrain_history.csv")
    assert one["step"].tolist() == many["step"].tolist() == [float(s) for s in range(1, STEPS + 1)]
    np.testing.assert_allclose(many["total"], one["total"], rtol=1e-5)

    reference, state = encoder_state(single), encoder_state(launched)
    assert reference.keys() == state.keys()
    initial = _initial_encoder(single)
    moved = max(
        float((reference[k] - initial[k]).abs().max()) for k in initial if initial[k].is_floating_point()
    )
    assert moved > 1e-3
    for name, value in reference.items():
        if value.is_floating_point():
            torch.testing.assert_close(state[name], value, rtol=1e-4, atol=1e-4 * moved, msg=name)


def _initial_encoder(project: Path) -> dict[str, torch.Tensor]:
    """The encoder as pretraining built it before the first step (same seed)."""
    import lightning as L

    from imsvd.checkpoints import load_weights
    from imsvd.models import build_encoder

    payload = load_weights(project / "data/06_models/encoder.pt")
    cfg = payload["config"]
    L.seed_everything(cfg["seed"], workers=True, verbose=False)
    dims = tuple(int(d) for d in cfg["projector"].split("-"))
    encoder = build_encoder(cfg["backbone"], cfg["width"], dims, payload["in_channels"])
    return {k: v for k, v in encoder.state_dict().items()}


def test_two_nodes_train_as_one_process_and_one_node_writes(finished, single, tmp_path):
    projects = (copy_of(finished, tmp_path / "node-a"), copy_of(finished, tmp_path / "node-b"))
    before = {p: snapshot(p / "data") for p in projects}
    store = {p: (p / "mlflow.db").read_bytes() for p in projects}
    logs = {p: log_file(p) for p in projects}
    params = tiny_params(**PARAMS, pretrain__checkpoint_dir=str(tmp_path / "shared-ckpt"))
    outputs = [finish(node) for node in two_nodes(projects, params)]

    writer, other = writer_and_other(projects)
    assert mlflow_runs(writer) == [("kedro-pretrain", "FINISHED")]
    assert any("training only; rank 0 writes the outputs" in text for text in outputs)
    # The other node read the views and the validated images, and wrote nothing.
    assert snapshot(other / "data") == before[other]
    assert (other / "mlflow.db").read_bytes() == store[other]
    assert log_file(other) == logs[other]  # its log went to its console
    # The writer wrote the pretrain outputs, and the checkpoints went to the shared folder.
    changed = {k for k, v in snapshot(writer / "data").items() if before[writer].get(k) != v}
    assert {
        "06_models/encoder.pt",
        "07_model_output/pretrain_history.csv",
        "08_reporting/loss_curve.png",
    } <= changed, changed
    assert (tmp_path / "shared-ckpt" / "last.ckpt").is_file()
    assert_same_training(writer, single)


def test_one_node_two_processes_train_as_one_process(finished, single, tmp_path):
    project = copy_of(finished, tmp_path / "project")
    params = tiny_params(**PARAMS, pretrain__checkpoint_dir=str(tmp_path / "ckpt"))
    output = finish(launch(project, params, "--standalone", "--nproc-per-node=2"))
    assert "training only; rank 0 writes the outputs" in output
    assert mlflow_runs(project) == [("kedro-pretrain", "FINISHED")]
    assert_same_training(project, single)


def test_a_killed_node_ends_the_job_and_the_job_resumes(finished, tmp_path):
    projects = (copy_of(finished, tmp_path / "node-a"), copy_of(finished, tmp_path / "node-b"))
    checkpoints = tmp_path / "shared-ckpt"
    # Many short epochs: a checkpoint after each, and time to kill the job mid-run.
    params = tiny_params(
        pretrain__precision="32-true",
        pretrain__epochs="60",
        pretrain__max_steps_per_epoch="2",
        pretrain__checkpoint_dir=str(checkpoints),
    )
    first, second = two_nodes(projects, params)
    deadline = time.monotonic() + 300
    while not (checkpoints / "last.ckpt").is_file():
        assert first.poll() is None and second.poll() is None, "the job ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint after 300 s"
        time.sleep(0.2)
    kill_node(second)
    second.wait()
    killed_at = time.monotonic()
    output, _ = first.communicate(timeout=180)
    assert first.returncode != 0, output[-3000:]
    assert time.monotonic() - killed_at < 120, "the surviving node took too long to stop"

    # Both nodes start again: the job resumes from the last complete epoch and finishes.
    outputs = [finish(node) for node in two_nodes(projects, params)]
    assert any("resuming from" in text and "last.ckpt" in text for text in outputs), outputs[0][-3000:]
    writer = next(
        p for p in projects if (p / "data/07_model_output/pretrain_history.csv").stat().st_mtime > killed_at
    )
    import pandas as pd

    history = pd.read_csv(writer / "data/07_model_output/pretrain_history.csv")
    assert history["step"].max() == 60 * 2


def test_only_pretrain_is_launched(finished, tmp_path):
    """validate, augment and evaluate run once, outside the launch: asking a launch for
    them fails at once on every rank, naming the option, before any Kedro session."""
    project = copy_of(finished, tmp_path / "project")
    before = snapshot(project / "data")
    env = kedro_env(project)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    for args, message in (
        (["--pipeline=evaluate"], "--pipeline=evaluate under torchrun (2 processes)"),
        (["--pipeline=pretrain", "--tags=x"], "--tags cannot be combined with a launch"),
    ):
        command = [*launcher, "-m", "imsvd_pipelines", "run", *args]
        result = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode != 0
        assert message in result.stdout + result.stderr
    assert snapshot(project / "data") == before
    assert mlflow_runs(project) == []


def test_the_module_entry_point_is_the_project_run(finished, tmp_path):
    """``python -m imsvd_pipelines run`` outside a launcher is ``kedro run``: same errors."""
    project = copy_of(finished, tmp_path / "project")
    command = [
        sys.executable,
        "-m",
        "imsvd_pipelines",
        "run",
        "--pipeline=pretrain",
        "--params",
        "pretrain.epochs=0",
    ]
    result = subprocess.run(
        command, cwd=project, env=kedro_env(project), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 1
    assert "pretrain.epochs" in result.stderr


# A stand-in for SLURM's srun, which this machine does not have: it starts SLURM_NTASKS
# copies of the command with the variables srun gives each task on one node, and fails
# when any task fails. Lightning's SLURM environment reads exactly these variables.
FAKE_SRUN = """#!/bin/bash
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
exit $status
"""


def test_the_sbatch_script_trains_under_srun(finished, tmp_path):
    """conf/slurm/pretrain.sbatch, run as SLURM would run it on one node with two tasks:
    Lightning's SLURM environment joins the tasks, task 0 writes, the other only trains."""
    project = copy_of(finished, tmp_path / "project")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "srun").chmod(0o755)
    env = kedro_env(project)
    env.update(
        PATH=f"{bin_dir}:{Path(sys.executable).parent}:{env['PATH']}",
        OMP_NUM_THREADS="1",
        SLURM_SUBMIT_DIR=str(project),
        SLURM_JOB_ID=str(20000 + free_port() % 5000),  # Lightning derives the port from it
        SLURM_JOB_NAME="imsvd-pretrain",
        SLURM_NTASKS="2",
        SLURM_NTASKS_PER_NODE="2",
        SLURM_NNODES="1",
        SLURM_NODEID="0",
        SLURM_NODELIST="127.0.0.1",
    )
    before = (project / "data/06_models/encoder.pt").stat().st_mtime_ns
    params = tiny_params(**PARAMS, pretrain__checkpoint_dir=str(tmp_path / "ckpt"))
    done = subprocess.run(
        ["bash", str(project / "conf/slurm/pretrain.sbatch"), "--params", params],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]
    assert "rank 1 of 2: training only" in output
    assert mlflow_runs(project) == [("kedro-pretrain", "FINISHED")]
    assert (project / "data/06_models/encoder.pt").stat().st_mtime_ns > before


def test_a_different_world_size_resumes_the_same_training(finished, tmp_path):
    """``pretrain.batch_size`` is the global batch, and the data order is that of one
    process whatever the world size: one epoch on one process, resumed for a second epoch
    on two, gives the weights of two epochs on one process. (A constant learning rate,
    so that the first run's schedule does not depend on its number of epochs.)"""
    flat = dict(PARAMS, pretrain__min_lr_ratio="1.0", pretrain__warmup_epochs="0")
    whole = copy_of(finished, tmp_path / "whole")
    kedro(
        whole,
        "run",
        "--pipeline=pretrain",
        "--params",
        tiny_params(
            **{**flat, "pretrain__epochs": "2"}, pretrain__checkpoint_dir=str(tmp_path / "ckpt-whole")
        ),
    )

    split = copy_of(finished, tmp_path / "split")
    resumed = str(tmp_path / "ckpt-split")
    kedro(
        split, "run", "--pipeline=pretrain", "--params", tiny_params(**flat, pretrain__checkpoint_dir=resumed)
    )
    params = tiny_params(**{**flat, "pretrain__epochs": "2"}, pretrain__checkpoint_dir=resumed)
    output = finish(launch(split, params, "--standalone", "--nproc-per-node=2"))
    assert "at epoch 1" in output and "resuming from" in output
    assert "epoch 2/2 step 4" in output and "epoch 1/2 step" not in output  # only the second epoch ran

    reference, state = encoder_state(whole), encoder_state(split)
    scale = max(float(v.abs().max()) for v in reference.values() if v.is_floating_point())
    for name, value in reference.items():
        if value.is_floating_point():
            torch.testing.assert_close(state[name], value, rtol=1e-4, atol=1e-5 * scale, msg=name)
