"""Faults, bad input and untrusted files: the pipeline keeps working and loses nothing.

Nothing is mocked: real files, a real MLflow store, Kedro's own session, runner and
catalog. Cases about processes (signals, kills, two runs at once) run the real
``python -m kedro run`` in a copy of the project; the others run the same session in this
process (``in_process``) and check the error the CLI would print (its plain printing is
tested once, in test_kedro_run). One complete tiny run is shared by the whole session
(``finished``) and copied for each test that needs earlier results.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from imsvd_pipelines.cli import project_error
from PIL import Image

from conftest import REPO, copy_of, kedro, kedro_env, tiny_params, tiny_tree
from imsvd.errors import ImsvdError, TrainingError, UntrustedFileError

pytestmark = pytest.mark.slow

PNG = b"\x89PNG\r\n\x1a\n"
CHECKPOINTS = Path("data/06_models/checkpoints")
ENCODER = Path("data/06_models/encoder.pt")
IMAGES = Path("data/03_primary/images.npz")
# The catalog's file datasets (the in-memory ones hold no output on disk).
CATALOG = {
    name: entry
    for name, entry in yaml.safe_load((REPO / "conf/base/catalog.yml").read_text()).items()
    if "filepath" in entry.get("dataset", entry)
}


def file_entry(entry: dict) -> dict:
    """The dataset that owns the file (a CachedDataset wraps it)."""
    return entry.get("dataset", entry)


LOCK_MESSAGE = "another kedro run is using this project"


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class KedroProcess:
    """A ``kedro`` subprocess in its own session whose merged output is read as it comes."""

    def __init__(self, project: Path, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "kedro", *args],
            cwd=project,
            env=kedro_env(project),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group: a signal reaches any children too
            # A shell without job control starts background jobs with SIGINT ignored, and Python
            # then installs no Ctrl-C handler: restore the default so SIGINT acts as Ctrl-C does.
            preexec_fn=_default_sigint,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in line for line in list(self.lines)):
                return
            if self.process.poll() is not None and not self._reader.is_alive():
                raise AssertionError(
                    f"exited ({self.process.returncode}) before {text!r}:\n{self.output[-3000:]}"
                )
            time.sleep(0.05)
        self.signal(signal.SIGKILL)
        raise AssertionError(f"no {text!r} within {timeout} s:\n{self.output[-3000:]}")

    def signal(self, sig: int) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, sig)

    def wait(self, timeout: float = 900) -> int:
        code = self.process.wait(timeout=timeout)
        self._reader.join(timeout=30)
        return code


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(project: Path) -> dict[str, str]:
    """Every file under ``data/`` and its SHA-256."""
    return {
        str(p.relative_to(project)): digest(p) for p in sorted((project / "data").rglob("*")) if p.is_file()
    }


def checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def load_every_output(project: Path) -> list[str]:
    """Load each catalog output that exists with its own dataset class, and every checkpoint.

    Raises (fails the test) on a truncated or half-written file.
    """
    import imsvd_pipelines.datasets as datasets

    from imsvd.checkpoints import load_weights

    loaded = []
    for name, entry in CATALOG.items():
        entry = file_entry(entry)
        path = project / entry["filepath"]
        if not path.is_file():
            continue
        dataset = getattr(datasets, entry["type"].rsplit(".", 1)[1])(filepath=str(path))
        value = dataset.load()
        if path.suffix == ".png":
            assert value.startswith(PNG), path
            with Image.open(io.BytesIO(value)) as image:
                image.verify()
        elif path.suffix == ".csv":
            assert isinstance(value, pd.DataFrame) and len(value.columns) > 0, path
        elif path.suffix == ".json":
            assert isinstance(value, dict), path
        loaded.append(name)
    store = project / "data/03_primary/image_store.json"
    if store.is_file():  # the store it indexes is whole: every split reads back in full
        from imsvd.store import read_split

        splits = json.loads(store.read_text())["splits"]
        for split, summary in splits.items():
            assert len(read_split(project / "data/03_primary/image_store" / split)) == summary["images"]
    for ckpt in sorted((project / CHECKPOINTS).glob("*.ckpt")):
        assert "global_step" in load_weights(ckpt), ckpt
        loaded.append(ckpt.name)
    return loaded


def stray_files(project: Path) -> list[Path]:
    """Files under ``data/`` that are neither outputs nor hidden temporaries.

    Temporaries are ``.<name>.<random>.tmp`` files or folders (hidden, never a catalog
    path), and everything inside such a folder: a file here would be something a reader
    could mistake for an output.
    """
    known = {project / file_entry(entry)["filepath"] for entry in CATALOG.values()}
    strays = []
    for path in (project / "data").rglob("*"):
        relative = path.relative_to(project / "data").parts
        if not path.is_file() or any(part.startswith(".") for part in relative) or path in known:
            continue
        if relative[:2] in {
            ("08_reporting", "data_docs"),
            ("05_model_input", "view_cache"),
            ("03_primary", "image_store"),
        }:
            continue
        if path.parent == project / CHECKPOINTS and path.suffix == ".ckpt":
            continue
        strays.append(path)
    return strays


def mlflow_runs(project: Path) -> list:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    return mlflow.search_runs(search_all_experiments=True, output_format="list")


# --------------------------------------------------------------------------- 1, 2: signals


def test_sigkill_mid_epoch_then_rerun_resumes_with_the_same_number_of_steps(finished, tmp_path):
    project = copy_of(finished, tmp_path / "project")
    shutil.rmtree(project / CHECKPOINTS)
    steps = 30  # long enough an epoch that the kill surely lands inside epoch 2
    args = ("run", "--pipeline=pretrain", "--params", tiny_params(pretrain__max_steps_per_epoch=str(steps)))

    run = KedroProcess(project, *args)
    run.wait_for(f"epoch 2/2 step {steps + 2}")  # epoch 1 checkpointed, epoch 2 two steps in
    assert (project / CHECKPOINTS / "last.ckpt").is_file()
    run.signal(signal.SIGKILL)
    assert run.wait() == -signal.SIGKILL
    assert f"for 2 epochs of {steps} steps" in run.output  # an uninterrupted run makes 2 x steps

    on_disk = sorted((project / CHECKPOINTS).glob("*.ckpt"))
    assert {p.name for p in on_disk} >= {"last.ckpt", "best.ckpt"}
    for path in on_disk:  # never half-written
        checkpoint(path)
    killed = checkpoint(project / CHECKPOINTS / "last.ckpt")
    assert (killed["epoch"], killed["global_step"]) == (0, steps)  # the kill landed mid-epoch 2

    rerun = kedro(project, *args)
    log = rerun.stdout + rerun.stderr
    assert re.search(r"resuming from \S*last\.ckpt at epoch 1", log), log[-3000:]
    assert checkpoint(project / CHECKPOINTS / "last.ckpt")["global_step"] == 2 * steps
    history = pd.read_csv(project / "data/07_model_output/pretrain_history.csv")
    assert history["step"].astype(int).tolist() == list(range(1, 2 * steps + 1))  # none lost or repeated
    load_every_output(project)


SIGINT_STEPS = 30  # steps per epoch in the SIGINT test


def test_sigint_saves_interrupted_checkpoint_and_rerun_resumes(finished, tmp_path):
    project = copy_of(finished, tmp_path / "project")
    shutil.rmtree(project / CHECKPOINTS)
    args = (
        "run",
        "--pipeline=pretrain",
        "--params",
        tiny_params(pretrain__max_steps_per_epoch=str(SIGINT_STEPS)),
    )

    run = KedroProcess(project, *args)
    # Signal early in epoch 2, leaving most of the epoch as margin on a loaded machine.
    run.wait_for(f"epoch 2/2 step {SIGINT_STEPS + 2}")
    before = digest(project / CHECKPOINTS / "last.ckpt")
    run.process.send_signal(signal.SIGINT)  # Ctrl-C reaches the kedro process itself
    code = run.wait()
    assert code != 0, run.output[-3000:]
    assert "stopping after this step" in run.output  # the first Ctrl-C lets the step finish
    assert "interrupted at step" in run.output

    interrupted = checkpoint(project / CHECKPOINTS / "interrupted.ckpt")
    assert interrupted["global_step"] >= SIGINT_STEPS + 2
    assert digest(project / CHECKPOINTS / "last.ckpt") == before  # intact, still epoch 1
    assert checkpoint(project / CHECKPOINTS / "last.ckpt")["global_step"] == SIGINT_STEPS
    assert not (project / ENCODER).exists() or digest(project / ENCODER) == digest(finished.path / ENCODER)
    assert [r.info.status for r in mlflow_runs(project)] == ["FAILED"]

    rerun = kedro(project, *args)
    assert "at epoch 1" in rerun.stdout + rerun.stderr and "resuming from" in rerun.stdout + rerun.stderr
    assert checkpoint(project / CHECKPOINTS / "last.ckpt")["global_step"] == 2 * SIGINT_STEPS


def test_ctrl_c_outside_training_ends_the_mlflow_run_killed(finished, tmp_path):
    """Kedro's error hooks see an Exception only; a Ctrl-C elsewhere than in training is a
    KeyboardInterrupt, and MLflow's exit handler alone would record the run as FINISHED."""
    project = copy_of(finished, tmp_path / "project")
    earlier = {r.info.run_id for r in mlflow_runs(project)}
    run = KedroProcess(project, "run", "--pipeline=evaluate", "--params", tiny_params())
    run.wait_for("extracting features of")
    run.process.send_signal(signal.SIGINT)
    assert run.wait() != 0, run.output[-3000:]
    assert "Aborted!" in run.output  # click's word for a KeyboardInterrupt
    new = [r for r in mlflow_runs(project) if r.info.run_id not in earlier]
    assert [r.info.status for r in new] == ["KILLED"], run.output[-3000:]
    load_every_output(project)


# --------------------------------------------------------------------------- 3: kill at any time


def test_killed_full_runs_leave_only_complete_outputs(finished, tmp_path):
    project = copy_of(finished, tmp_path / "project")
    complete = load_every_output(project)
    # A new pretraining seed: every stage after validate writes its outputs again.
    args = ("run", "--params", tiny_params(pretrain__seed="1"))
    duration = finished.seconds
    rng = random.Random(20240611)
    for delay in sorted(rng.uniform(0.1, 0.9) * duration for _ in range(3)):
        run = KedroProcess(project, *args)
        time.sleep(delay)
        run.signal(signal.SIGKILL)
        run.wait()
        loaded = load_every_output(project)
        assert set(loaded) == set(complete), f"killed after {delay:.1f} s: {set(complete) ^ set(loaded)}"
        assert stray_files(project) == [], f"killed after {delay:.1f} s"
    kedro(project, *args)  # leftover temporaries never stop a later run
    assert set(load_every_output(project)) == set(complete)


# --------------------------------------------------------------------------- 4, 5: training faults


def raised(error: pytest.ExceptionInfo, kind: type = ImsvdError) -> str:
    """The project error behind what the run raised (what the CLI prints plainly), as text."""
    found = project_error(error.value)
    assert isinstance(found, kind), repr(error.value)
    return str(found)


def test_non_finite_loss_stops_plainly_and_keeps_the_good_encoder(finished, tmp_path, in_process):
    project = copy_of(finished, tmp_path / "project")
    before = snapshot(project)
    with pytest.raises(Exception) as info:
        in_process(project, "pretrain", tiny_tree(pretrain__base_lr="1e30"))
    message = raised(info, TrainingError)
    for needle in ("non-finite loss at step", "total=nan", "pretrain.base_lr"):
        assert needle in message
    assert re.search(r"at step \d+", message)
    after = snapshot(project)
    for relative in (str(ENCODER), str(CHECKPOINTS / "last.ckpt"), str(CHECKPOINTS / "best.ckpt")):
        assert after[relative] == before[relative], relative
    assert [r.info.status for r in mlflow_runs(project)] == ["FAILED"]


def _evaluation_inputs():
    from imsvd.config import EvaluateConfig, IMSVDConfig, PretrainConfig
    from imsvd.data import TEST, TRAIN, ImageData
    from imsvd.models import build_encoder
    from imsvd.sources import load_digits

    data = load_digits(test_size=0.25, seed=0)
    keep = np.concatenate(
        [np.flatnonzero(data.splits == TRAIN)[:200], np.flatnonzero(data.splits == TEST)[:80]]
    )
    data = ImageData(
        data.images[keep], data.labels[keep], data.splits[keep], data.ids[keep], data.class_names
    )
    cfg = PretrainConfig(width=0.125, projector="128-128", imsvd=IMSVDConfig(bin_size=16))
    torch.manual_seed(0)
    encoder = build_encoder(cfg.backbone, cfg.width, cfg.projector_dims, 1)
    payload = {
        "state_dict": {k: v.clone() for k, v in encoder.state_dict().items()},
        "config": dataclasses.asdict(cfg),
        "in_channels": 1,
        "mean": [0.3],
        "std": [0.35],
        "image_size": 8,
    }
    last_linear = [name for name, m in encoder.named_modules() if isinstance(m, torch.nn.Linear)][-1]
    return data, payload, f"{last_linear}.weight", EvaluateConfig(linear_epochs=5)


def test_collapse_is_flagged_with_a_reason_and_a_warning(caplog):
    from imsvd import evaluate

    data, healthy, last_weight, cfg = _evaluation_inputs()
    collapsed = {**healthy, "state_dict": dict(healthy["state_dict"])}
    collapsed["state_dict"][last_weight] = torch.zeros_like(healthy["state_dict"][last_weight])

    with caplog.at_level(logging.WARNING, logger="imsvd.evaluate"):
        bad = evaluate.compute_metrics(evaluate.embed(data, collapsed, cfg), cfg)
    assert bad["collapsed"] is True
    assert bad["collapse_reason"]
    assert any("representation collapse" in r.getMessage() for r in caplog.records)

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="imsvd.evaluate"):
        good = evaluate.compute_metrics(evaluate.embed(data, healthy, cfg), cfg)
    assert good["collapsed"] is False and "collapse_reason" not in good
    assert not any("representation collapse" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- 6: bad input, validate skipped


def _write_images(path: Path, images: np.ndarray, template: Path) -> None:
    with np.load(template, allow_pickle=False) as arrays:
        values = {k: arrays[k] for k in arrays.files}
    n = len(images)
    values.update(
        images=images, labels=values["labels"][:n], splits=values["splits"][:n], ids=values["ids"][:n]
    )
    np.savez(path, **values)


@pytest.mark.parametrize(
    ("pipeline", "damage", "needles"),
    [
        ("augment", "corrupt", [str(IMAGES), "not a readable image array file"]),
        ("pretrain", "one_pixel_images", ["pretrain:", "images.npz", "validation"]),
        ("evaluate", "edited_pixels", ["evaluate:", "images.npz", "validation"]),
        pytest.param(
            "augment",
            "no_report",
            ["validation.json"],
        ),
    ],
)
def test_later_stages_refuse_data_the_validation_did_not_accept(
    finished, tmp_path, in_process, pipeline, damage, needles
):
    project = copy_of(finished, tmp_path / "project")
    images = project / IMAGES
    if damage == "corrupt":
        images.write_bytes(b"PK\x03\x04" + os.urandom(300))
    elif damage == "one_pixel_images":
        _write_images(images, np.full((40, 1, 1, 1), 7, dtype=np.uint8), images)
    elif damage == "edited_pixels":  # same shapes and ids, one pixel changed: only the fingerprint tells
        with np.load(images, allow_pickle=False) as arrays:
            pixels = arrays["images"].copy()
        pixels[0, 0, 0, 0] ^= 0xFF
        _write_images(images, pixels, images)
    else:
        (project / "data/08_reporting/validation.json").unlink()
    before = snapshot(project)
    with pytest.raises(Exception) as info:
        in_process(project, pipeline, tiny_tree())
    message = raised(info)
    for needle in needles:
        assert needle in message
    assert snapshot(project) == before


# --------------------------------------------------------------------------- 7: misconfiguration


def _bad_idx_folder(folder: Path) -> Path:
    folder.mkdir()
    for stem in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        # Labels' magic (2049) where images' (2051) belongs, and vice versa.
        magic = 2049 if "images" in stem else 2051
        (folder / stem).write_bytes(magic.to_bytes(4, "big") + (3).to_bytes(4, "big") + bytes(3))
    return folder


@pytest.mark.parametrize("case", ["wrong_type", "nested_typo", "idx_magic", "other_architecture"])
def test_misconfiguration_stops_before_any_work(finished, tmp_path, in_process, case):
    project = copy_of(finished, tmp_path / "project")
    if case == "wrong_type":
        pipeline, extra, needles = "pretrain", {"pretrain__epochs": "abc"}, ["pretrain.epochs", "integer"]
    elif case == "nested_typo":
        pipeline, extra, needles = (
            "pretrain",
            {"pretrain__imsvd__bin_sise": "16"},
            ["pretrain.imsvd.bin_sise", "did you mean pretrain.imsvd.bin_size"],
        )
    elif case == "idx_magic":
        folder = _bad_idx_folder(tmp_path / "idx")
        pipeline, extra = "validate", {"data__source": "fashion_mnist", "data__path": str(folder)}
        needles = [str(folder / "train-images-idx3-ubyte"), "magic number"]
    else:
        from imsvd.checkpoints import load_weights

        payload = load_weights(project / ENCODER)
        payload["config"] = {**payload["config"], "width": 0.25}  # weights are width 0.125
        torch.save(payload, project / ENCODER)
        pipeline, extra, needles = "evaluate", {}, ["do not match the architecture", "width 0.25"]
    before = snapshot(project)
    with pytest.raises(Exception) as info:
        in_process(project, pipeline, tiny_tree(**extra))
    message = raised(info)
    for needle in needles:
        assert needle in message
    assert snapshot(project) == before


# --------------------------------------------------------------------------- 8: untrusted files, servers


class _CreatesMarker:
    """Unpickling this runs code: it creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def _crafted_encoder(path: Path, marker: Path, template: dict) -> None:
    torch.save({**template, "note": _CreatesMarker(marker)}, path)


def test_encoder_with_pickled_code_is_refused_and_never_run(finished, tmp_path, in_process):
    from imsvd.checkpoints import load_weights

    project = copy_of(finished, tmp_path / "project")
    template = load_weights(project / ENCODER)
    # The crafted file is live: a full unpickling does run its code.
    probe, probe_marker = tmp_path / "probe.pt", tmp_path / "probe-marker"
    _crafted_encoder(probe, probe_marker, template)
    torch.load(probe, weights_only=False)
    assert probe_marker.exists()

    marker = tmp_path / "marker"
    _crafted_encoder(project / ENCODER, marker, template)
    with pytest.raises(Exception) as info:
        in_process(project, "evaluate", tiny_tree())
    message = raised(info, UntrustedFileError)
    assert str(ENCODER) in message and "refusing to load" in message
    assert not marker.exists()


def _host_help(text: str) -> str:
    """The ``--host`` option's own help paragraph (not a usage example mentioning it)."""
    match = re.search(r"^ +(?:-h, )?--host [A-Z]+.*\n(?: {10,}.*\n){0,3}", text, re.MULTILINE)
    assert match, text
    return " ".join(match.group(0).split())


def test_servers_listen_on_localhost_by_default():
    viz = subprocess.run(
        [sys.executable, "-m", "kedro", "viz", "run", "--help"],
        cwd=REPO,
        env=kedro_env(REPO),
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    host = _host_help(viz)
    assert "localhost" in host or "127.0.0.1" in host, host
    assert "0.0.0.0" not in host
    from kedro_viz.launchers.cli.run import run as viz_run

    assert next(p.default for p in viz_run.params if p.name == "host") == "127.0.0.1"

    mlflow = str(Path(sys.executable).with_name("mlflow"))
    for command in ("ui", "server"):
        text = subprocess.run(
            [mlflow, command, "--help"], capture_output=True, text=True, timeout=300, check=True
        ).stdout
        assert "(default: 127.0.0.1)" in _host_help(text), (command, _host_help(text))


# --------------------------------------------------------------------------- 9: two runs at once


def test_two_runs_at_once_one_waits_its_turn_or_is_refused(finished, tmp_path):
    project = copy_of(finished, tmp_path / "project")
    # One more epoch than the finished run: the winner resumes and trains for a while.
    args = ("run", "--pipeline=pretrain", "--params", tiny_params(pretrain__epochs="3"))
    runs = [KedroProcess(project, *args), KedroProcess(project, *args)]
    codes = [run.wait() for run in runs]
    refused = [run for run, code in zip(runs, codes, strict=True) if code != 0]
    assert 0 in codes, "\n\n".join(run.output[-3000:] for run in runs)
    for run in refused:
        assert LOCK_MESSAGE in run.output, run.output[-3000:]
        assert "Traceback" not in run.output
    assert checkpoint(project / CHECKPOINTS / "last.ckpt")["global_step"] == 3 * 4
    load_every_output(project)
    statuses = [r.info.status for r in mlflow_runs(project)]
    assert statuses == ["FINISHED"] * (2 - len(refused)), statuses
