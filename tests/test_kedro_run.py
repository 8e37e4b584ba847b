"""The whole product through the real ``kedro run`` CLI, its catalog and its MLflow store."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from conftest import kedro

pytestmark = pytest.mark.slow

TINY = ",".join(
    [
        "pretrain.epochs=2",
        "pretrain.batch_size=64",
        "pretrain.base_lr=1.6",
        "pretrain.width=0.125",
        "pretrain.projector=128-128",
        "pretrain.bin_size=16",
        "augment.views=2",
        "augment.size=8",
        "evaluate.linear_epochs=20",
    ]
)
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """One default ``kedro run`` (all four pipelines) on the embedded digits."""
    from conftest import copy_project

    project = copy_project(tmp_path_factory.mktemp("run") / "project")
    kedro(project, "run", "--params", TINY)
    return project


def test_default_run_writes_every_output(finished):
    data = finished / "data"
    for relative in [
        "03_primary/images.npz",
        "03_primary/manifest.csv",
        "08_reporting/validation.json",
        "08_reporting/data_docs/index.html",
        "05_model_input/view_cache.json",
        "05_model_input/view_cache/views.npy",
        "06_models/encoder.pt",
        "06_models/checkpoints/last.ckpt",
        "06_models/checkpoints/best.ckpt",
        "07_model_output/pretrain_history.csv",
    ]:
        assert (data / relative).is_file(), relative
    for picture in ["loss_curve", "joint_matrix", "variable_attribution", "bin_occupancy", "embedding_map"]:
        assert (data / "08_reporting" / f"{picture}.png").read_bytes().startswith(PNG), picture
    metrics = json.loads((data / "08_reporting/metrics.json").read_text())
    for key in [
        "knn_top1",
        "knn_top5",
        "linear_top1",
        "knn_top1_raw_pixels",
        "knn_top1_random_encoder",
        "effective_rank",
        "code_knn_top1",
        "bin_entropy",
        "off_block_mutual_information",
        "inference_images_per_second",
    ]:
        assert key in metrics, key
    assert 10.0 < metrics["knn_top1_raw_pixels"] <= 100.0  # real digits, 10 classes


def test_one_mlflow_run_holds_params_curves_metrics_artifacts_and_model(finished):
    mlflow.set_tracking_uri(f"sqlite:///{finished / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["imsvd"], output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["pretrain.bin_size"] == "16"
    assert run.data.params["data.source"] == "digits"
    assert {"git.revision", "data.fingerprint", "imsvd.reproduction"} <= set(run.data.tags)
    client = mlflow.MlflowClient()
    steps = len((finished / "data/07_model_output/pretrain_history.csv").read_text().splitlines()) - 1
    curve = client.get_metric_history(run.info.run_id, "train/total_step")
    assert len(curve) == steps // 5  # pretrain.log_every_n_steps: 5
    assert len(client.get_metric_history(run.info.run_id, "train/total_epoch")) == 2
    assert len(client.get_metric_history(run.info.run_id, "train/images_per_second")) == steps // 5
    assert "knn_top1" in run.data.metrics and "lr-SGD" in run.data.metrics
    artifacts = {
        a.path
        for folder in ("08_reporting", "07_model_output")
        for a in client.list_artifacts(run.info.run_id, folder)
    }
    assert "08_reporting/loss_curve.png" in artifacts and "08_reporting/metrics.json" in artifacts
    models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    assert [m.name for m in models] == ["encoder"]


def test_rerun_resumes_and_says_from_which_epoch(finished):
    result = kedro(finished, "run", "--pipeline=pretrain", "--params", TINY.replace("epochs=2", "epochs=3"))
    log = result.stdout + result.stderr
    assert "resuming from" in log and "at epoch 2" in log


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ("pretrain.bin_size=30", "pretrain.bin_size"),
        ("pretrain.bin_sze=16", "did you mean pretrain.bin_size"),
        ("pretrain.base_lr=-1", "pretrain.base_lr"),
        ("data.source=image_folder,data.path=/no/such/folder", "/no/such/folder"),
    ],
)
def test_bad_configuration_stops_with_a_clear_message(project, params, needle):
    pipeline = "validate" if params.startswith("data.") else "pretrain"
    result = kedro(project, "run", f"--pipeline={pipeline}", "--params", params, check=False)
    assert result.returncode != 0
    assert needle in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
