"""The manifest and the Great Expectations suite on it."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from conftest import write_image
from imsvd.config import ValidateConfig
from imsvd.data import ImageData, pixel_sha256
from imsvd.sources import OriginalImage, load_digits, load_image_folder
from imsvd.validation import (
    MANIFEST_COLUMNS,
    build_manifest,
    check_images,
    class_counts,
    run_suites,
    staged_folder,
)


def tiny_data(n_train: int = 12, n_test: int = 4, identical: bool = False) -> ImageData:
    rng = np.random.default_rng(0)
    n = n_train + n_test
    if identical:
        images = np.full((n, 8, 8, 1), 90, np.uint8)
    else:
        images = (rng.integers(0, 40, (n, 8, 8, 1)) + rng.integers(0, 200, (n, 1, 1, 1))).astype(np.uint8)
    return ImageData(
        images=images,
        labels=np.arange(n, dtype=np.int64) % 2,
        splits=np.asarray(["train"] * n_train + ["test"] * n_test),
        ids=np.asarray([f"img/{i}" for i in range(n)]),
        class_names=("a", "b"),
    )


@pytest.fixture
def config(tmp_path) -> ValidateConfig:
    return ValidateConfig(min_train_images=4, data_docs_dir=str(tmp_path / "docs"))


def failed(report) -> set[tuple[str, str, str | None]]:
    return {(f["table"], f["expectation"], f["column"]) for f in report["failures"]}


def test_manifest_has_one_row_per_image_with_originals():
    data = tiny_data(2, 1)
    originals = [OriginalImage(10, 12, "RGBA"), OriginalImage(8, 8, "L"), OriginalImage(1, 1, "P")]
    manifest = build_manifest(data, originals)
    assert tuple(manifest.columns) == MANIFEST_COLUMNS
    assert manifest["height"].tolist() == [10, 8, 1] and manifest["mode"].tolist() == ["RGBA", "L", "P"]
    assert manifest["channels"].tolist() == [1, 1, 1]
    assert manifest["sha256"][0] == pixel_sha256(data.images[0])
    assert manifest["mean_intensity"][2] == pytest.approx(data.images[2].mean())
    default = build_manifest(data)
    assert default["height"].tolist() == [8, 8, 8] and default["mode"].tolist() == ["L"] * 3


def test_great_expectations_checks_a_table_without_hashing_it_whole(tmp_path):
    # GX's pandas engine would hash every column of each table for a batch marker (the
    # largest part of the check's memory at 200,000 rows); run_suites turns that off for
    # the check only, and still catches what the expectation is about.
    import great_expectations.expectations as gxe
    from great_expectations.execution_engine import pandas_execution_engine

    threshold = pandas_execution_engine.HASH_THRESHOLD
    table = pd.DataFrame({"id": ["a", "b", "b"], "x": [1, 2, 3]})
    results = run_suites({"t": table}, {"t": [gxe.ExpectColumnValuesToBeUnique(column="id")]}, tmp_path, 3)
    assert "pandas_data_fingerprint" not in json.dumps(results)
    assert results["t"]["success"] is False  # the duplicate "b" is still found
    assert threshold == pandas_execution_engine.HASH_THRESHOLD  # put back after the check


def test_class_counts_include_absent_classes():
    manifest = build_manifest(tiny_data(4, 1))
    counts = class_counts(manifest, ("a", "b"))
    assert counts.set_index("id")["count"].to_dict() == {"train/a": 2, "train/b": 2, "test/a": 1, "test/b": 0}


def test_digits_pass_and_write_data_docs(tmp_path):
    config = ValidateConfig(data_docs_dir=str(tmp_path / "reporting" / "docs"))
    manifest, report = check_images(load_digits(0.25, 0), None, config)
    assert report["success"], report["message"]
    assert len(manifest) == 1797 and report["images"] == 1797
    assert report["statistics"]["unsuccessful_expectations"] == 0
    assert set(report["results"]) == {"manifest", "train", "test", "class_counts"}
    json.dumps(report)  # JSON-able as it is
    assert (tmp_path / "reporting" / "docs" / "index.html").is_file()
    assert [p.name for p in (tmp_path / "reporting").iterdir()] == ["docs"]  # no staging left


def test_one_pixel_images_fail_naming_the_file(tmp_path, make_image_folder):
    root = make_image_folder()
    write_image(root / "train/cat/dot.png", np.full((1, 1), 9, np.uint8))
    source = load_image_folder(root, 10_000)
    config = ValidateConfig(data_docs_dir=str(tmp_path / "docs"))
    _, report = check_images(source.data, source.originals, config)
    assert not report["success"]
    assert ("manifest", "expect_column_values_to_be_between", "height") in failed(report)
    assert "train/cat/dot.png" in report["message"]
    assert "expect_column_values_to_be_between on width" in report["message"]


def test_all_identical_images_fail(config):
    _, report = check_images(tiny_data(identical=True), None, config)
    assert not report["success"]
    assert ("manifest", "expect_column_stdev_to_be_between", "mean_intensity") in failed(report)
    assert ("manifest", "expect_column_proportion_of_unique_values_to_be_between", "sha256") in failed(report)
    assert "img/1" in report["message"]  # a duplicate is named


def test_row_counts_and_per_class_minimum(tmp_path):
    config = ValidateConfig(min_train_images=20, min_test_images=5, data_docs_dir=str(tmp_path / "d"))
    _, report = check_images(tiny_data(12, 3), None, config)
    got = failed(report)
    assert ("train", "expect_table_row_count_to_be_between", None) in got
    assert ("test", "expect_table_row_count_to_be_between", None) in got
    assert ("class_counts", "expect_column_values_to_be_between", "count") in got
    assert "test/b" in report["message"]
    over = ValidateConfig(min_train_images=4, max_images=10, data_docs_dir=str(tmp_path / "d"))
    assert ("manifest", "expect_table_row_count_to_be_between", None) in failed(
        check_images(tiny_data(), None, over)[1]
    )


def test_test_labels_must_be_train_labels(config):
    data = tiny_data()
    labels = data.labels.copy()
    labels[:12] = 0  # class "b" only in test
    labels[-1] = 1
    bad = ImageData(data.images, labels, data.splits, data.ids, data.class_names)
    _, report = check_images(bad, None, config)
    assert ("test", "expect_column_values_to_be_in_set", "label") in failed(report)
    assert "img/15" in report["message"]


def test_channels_and_sides_follow_the_config(tmp_path):
    config = ValidateConfig(
        min_train_images=4, allowed_channels=(3,), max_side=6, data_docs_dir=str(tmp_path / "d")
    )
    _, report = check_images(tiny_data(), None, config)
    assert {
        ("manifest", "expect_column_values_to_be_in_set", "channels"),
        ("manifest", "expect_column_values_to_be_between", "height"),
    } <= failed(report)


def test_example_count_follows_report_examples(tmp_path):
    config = ValidateConfig(
        min_train_images=4, min_side=9, report_examples=2, data_docs_dir=str(tmp_path / "d")
    )
    _, report = check_images(tiny_data(), None, config)
    heights = [f for f in report["failures"] if f["column"] == "height"]
    assert heights[0]["examples"] == ["img/0", "img/1"]
    assert heights[0]["unexpected_count"] == 16


def test_staged_folder_replaces_whole_and_keeps_old_on_failure(tmp_path):
    target = tmp_path / "site"
    with staged_folder(target) as staging:
        (staging / "a.html").write_text("one")
    with pytest.raises(RuntimeError), staged_folder(target) as staging:
        (staging / "a.html").write_text("half")
        raise RuntimeError("killed")
    assert (target / "a.html").read_text() == "one"
    with staged_folder(target) as staging:
        (staging / "b.html").write_text("two")
    assert sorted(p.name for p in target.iterdir()) == ["b.html"]
    assert [p.name for p in tmp_path.iterdir()] == ["site"]


def test_staged_folder_removes_what_a_killed_run_left(tmp_path):
    target = tmp_path / "site"
    killed = tmp_path / ".site.k1ll3d.tmp"  # a SIGKILL mid-write leaves its staging folder
    (killed / "static").mkdir(parents=True)
    (killed / "static" / "logo.gif").write_bytes(b"GIF89a")
    other = tmp_path / ".other.k1ll3d.tmp"  # another folder's leftovers are not this one's
    other.mkdir()
    with staged_folder(target) as staging:
        (staging / "a.html").write_text("one")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.k1ll3d.tmp", "site"]
