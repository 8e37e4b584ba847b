"""The whole product through the real ``kedro run`` CLI, its catalog and its MLflow store."""

from __future__ import annotations

import json
import logging

import mlflow
import pytest
from imsvd_pipelines.cli import project_error

from conftest import TINY, TINY_STEPS_PER_EPOCH, copy_of, kedro, params_tree, tiny_tree
from imsvd.errors import ImsvdError

pytestmark = pytest.mark.slow

PNG = b"\x89PNG\r\n\x1a\n"


def test_default_run_writes_every_output(finished):
    data = finished.path / "data"
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
    mlflow.set_tracking_uri(f"sqlite:///{finished.path / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["imsvd"], output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["pretrain.imsvd.bin_size"] == TINY["pretrain.imsvd.bin_size"]
    assert run.data.params["data.source"] == "digits"
    assert {"git.revision", "data.fingerprint", "imsvd.reproduction"} <= set(run.data.tags)
    client = mlflow.MlflowClient()
    steps = len((finished.path / "data/07_model_output/pretrain_history.csv").read_text().splitlines()) - 1
    epochs, every = int(TINY["pretrain.epochs"]), int(TINY["pretrain.log_every_n_steps"])
    assert steps == epochs * TINY_STEPS_PER_EPOCH
    curve = client.get_metric_history(run.info.run_id, "train/total_step")
    assert len(curve) == steps // every
    assert len(client.get_metric_history(run.info.run_id, "train/total_epoch")) == epochs
    assert len(client.get_metric_history(run.info.run_id, "train/images_per_second")) == steps // every
    assert "knn_top1" in run.data.metrics and "lr-SGD" in run.data.metrics
    # the online kNN monitor, at the last epoch of the tiny run (fewer steps than its interval)
    assert len(client.get_metric_history(run.info.run_id, "monitor/knn_top1")) == 1
    artifacts = {
        a.path
        for folder in ("08_reporting", "07_model_output")
        for a in client.list_artifacts(run.info.run_id, folder)
    }
    assert "08_reporting/loss_curve.png" in artifacts and "08_reporting/metrics.json" in artifacts
    models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    assert [m.name for m in models] == ["encoder"]


def test_rerun_resumes_and_says_from_which_epoch(finished, tmp_path, in_process, caplog):
    project = copy_of(finished, tmp_path / "project")
    # One more epoch, and more cache-building processes: augment.workers changes no view,
    # so the run still resumes where the finished one stopped.
    caplog.set_level(logging.INFO, logger="imsvd")
    in_process(project, "pretrain", tiny_tree(pretrain__epochs="3", augment__workers="1"))
    assert "resuming from" in caplog.text and "at epoch 2" in caplog.text
    caplog.clear()
    in_process(project, "pretrain", tiny_tree(pretrain__epochs="4", augment__scale_min="0.3"))
    assert "different parameters: starting fresh" in caplog.text  # other views: no resume


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ("pretrain.imsvd.bin_size=30", "pretrain.imsvd.bin_size"),
        ("pretrain.bin_size=16", "did you mean pretrain.imsvd.bin_size"),
        ("pretrain.base_lr=-1", "pretrain.base_lr"),
        ("data.source=image_folder,data.path=/no/such/folder", "/no/such/folder"),
    ],
)
def test_bad_configuration_stops_with_a_clear_message(project, in_process, params, needle):
    pipeline = "validate" if params.startswith("data.") else "pretrain"
    with pytest.raises(ImsvdError) as info:
        in_process(project, pipeline, params_tree(params))
    assert needle in str(project_error(info.value))
    assert not (project / "data/06_models/encoder.pt").exists()


def test_the_cli_shows_a_bad_parameter_plainly_and_exits_non_zero(project):
    # The process boundary itself: exit status and message, no traceback. Every other
    # configuration error goes through the same handler (imsvd_pipelines.cli).
    result = kedro(
        project, "run", "--pipeline=pretrain", "--params", "pretrain.imsvd.bin_sze=16", check=False
    )
    assert result.returncode == 1
    assert "did you mean pretrain.imsvd.bin_size" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_one_run_reads_the_images_once_hashes_them_once_and_asks_git_once(
    finished, tmp_path, in_process, monkeypatch
):
    """The evaluate pipeline's three nodes all take validated_images: one read of
    images.npz, one fingerprint of its pixels, one ``git`` look-up for the MLflow tags."""
    import functools

    from imsvd_pipelines import datasets, hooks

    from imsvd.data import ImageData

    project = copy_of(finished, tmp_path / "project")
    counts = {"load": 0, "fingerprint": 0, "git": 0}

    def counted(name, function):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return function(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(
        datasets.ImageArraysDataset, "load", counted("load", datasets.ImageArraysDataset.load)
    )
    monkeypatch.setattr(hooks, "git_revision", counted("git", hooks.git_revision))
    fingerprint = functools.cached_property(counted("fingerprint", ImageData.fingerprint.func))
    fingerprint.__set_name__(ImageData, "fingerprint")
    monkeypatch.setattr(ImageData, "fingerprint", fingerprint)

    in_process(project, "evaluate", tiny_tree())
    assert counts == {"load": 1, "fingerprint": 1, "git": 1}
