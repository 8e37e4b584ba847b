"""The `validate` pipeline through Kedro's SequentialRunner on the project's real catalog."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from imsvd_pipelines.validate import create_pipeline
from imsvd_pipelines.validate.nodes import accept_validated, load_and_check
from kedro.config import OmegaConfigLoader
from kedro.io import DataCatalog
from kedro.runner import SequentialRunner

from conftest import write_image
from imsvd.data import ImageData
from imsvd.errors import ConfigError, DataError, ValidationFailed

CONF = Path(__file__).resolve().parents[1] / "conf"


def project_config() -> OmegaConfigLoader:
    return OmegaConfigLoader(
        conf_source=str(CONF),
        base_env="base",
        default_run_env="local",
        config_patterns={"parameters": ["parameters*", "parameters*/**", "**/parameters*"]},
    )


def redirect(value: Any, root: Path) -> Any:
    """Rewrite every ``data/...`` path of a config tree into ``root/data/...``."""
    if isinstance(value, dict):
        return {k: redirect(v, root) for k, v in value.items()}
    if isinstance(value, str) and value.startswith("data/"):
        return str(root / value)
    return value


def run_validate(root: Path, data_overrides: dict[str, Any]) -> dict[str, Any]:
    loader = project_config()
    catalog = DataCatalog.from_config(redirect(dict(loader["catalog"]), root))
    params = redirect(dict(loader["parameters"]), root)
    catalog["params:data"] = {**params["data"], **data_overrides}
    catalog["params:validate"] = params["validate"]
    return SequentialRunner().run(create_pipeline(), catalog)


def outputs(root: Path) -> dict[str, Path]:
    primary = root / "data" / "03_primary"
    return {
        "images": primary / "images.npz",
        "manifest": primary / "manifest.csv",
        "store index": primary / "image_store.json",
        "train shards": primary / "image_store/train/index.json",
        "test shards": primary / "image_store/test/index.json",
    }


def test_digits_then_bad_folders_leave_the_validated_outputs(tmp_path, make_image_folder):
    run_validate(tmp_path, {})
    files = outputs(tmp_path)
    report_path = tmp_path / "data/08_reporting/validation.json"
    assert all(p.is_file() for p in files.values()) and report_path.is_file()
    manifest = pd.read_csv(files["manifest"])
    assert len(manifest) == 1797
    # Every image's shard is a chunk of the store, in the image's split.
    assert (manifest["shard"].str.split("/").str[0] == manifest["split"]).all()
    assert all((tmp_path / "data/03_primary/image_store" / s).is_file() for s in manifest["shard"].unique())
    assert json.loads(report_path.read_text())["success"] is True
    assert (tmp_path / "data/08_reporting/data_docs/index.html").is_file()
    before = {name: p.read_bytes() for name, p in files.items()}

    # Readable but invalid (a 1x1 image): the report is written, the outputs are not.
    root = make_image_folder(name="tiny")
    write_image(root / "train/cat/dot.png", np.full((1, 1), 3, np.uint8))
    with pytest.raises(ValidationFailed, match=r"train/cat/dot\.png"):
        run_validate(tmp_path, {"source": "image_folder", "path": str(root)})
    report = json.loads(report_path.read_text())
    assert report["success"] is False and "dot.png" in report["message"]
    assert {name: p.read_bytes() for name, p in files.items()} == before

    # Unreadable: stops before any output.
    broken = make_image_folder(name="broken")
    (broken / "test/dog/zero.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"zero\.png"):
        run_validate(tmp_path, {"source": "image_folder", "path": str(broken)})
    assert {name: p.read_bytes() for name, p in files.items()} == before


def test_nodes_parse_parameters_first(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.sourse"):
        load_and_check({"sourse": "digits"}, {})
    with pytest.raises(ConfigError, match=r"validate\.min_side"):
        load_and_check({}, {"min_side": "4"})


def test_nodes_on_a_tiny_folder(tmp_path, make_image_folder):
    root = make_image_folder()
    images, manifest, report = load_and_check(
        {"source": "image_folder", "path": str(root)},
        {"min_train_images": 4, "data_docs_dir": str(tmp_path / "docs")},
    )
    assert isinstance(images, ImageData) and len(manifest) == 16
    assert report["success"] and report["source"] == "image_folder"
    store = tmp_path / "store"
    accepted, with_shards, index = accept_validated(
        images, manifest, report, {"source": "image_folder", "path": str(root), "store_dir": str(store)}
    )
    assert accepted is images and with_shards.drop(columns="shard").equals(manifest)
    assert index["splits"]["train"]["images"] == 12 and index["kept_files"] == 16
    # The same folder against a threshold it misses: the suite's own report stops node 2.
    images, manifest, failed = load_and_check(
        {"source": "image_folder", "path": str(root)},
        {"min_train_images": 100, "data_docs_dir": str(tmp_path / "docs")},
    )
    assert failed["success"] is False
    with pytest.raises(ValidationFailed, match=r"expect_table_row_count_to_be_between.*12"):
        accept_validated(images, manifest, failed, {"store_dir": str(tmp_path / "other")})
    assert not (tmp_path / "other").exists()


def test_pipeline_wiring():
    pipeline = create_pipeline()
    assert {n.name for n in pipeline.nodes} == {"load_and_check_images", "accept_validated_images"}
    assert pipeline.inputs() == {"params:data", "params:validate"}
    assert pipeline.outputs() == {"validated_images", "manifest", "image_store"}
    assert "validation_report" in pipeline.all_outputs()  # persisted even when node 2 fails
