"""The image manifest and its Great Expectations suite.

The manifest has one row per image (:data:`MANIFEST_COLUMNS`); ``height``, ``width`` and
``mode`` describe the original file, ``channels`` the canonical image (after
conversion to ``L``/``RGB``, so an RGBA file has mode ``RGBA`` and 3 channels),
``sha256`` and ``mean_intensity`` its pixels after conversion, at the file's own size (for a
folder: what the image store keeps, before any resize to the common size).

Four tables are validated, each against its own suite in one ephemeral GX context:
``manifest`` (all rows), ``train`` and ``test`` (the rows of each split) and
``class_counts`` (images per class, for each split that has labels, zero counts
included). Every check is a GX expectation; plain pandas only prepares the tables and
picks example ids for the failure message.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from imsvd.config import ValidateConfig
from imsvd.data import TEST, TRAIN, UNLABELLED, ImageData, LazyImages, row_digests
from imsvd.errors import DataError
from imsvd.io import json_default
from imsvd.sources import OriginalImage, Originals, canonical_originals

logger = logging.getLogger(__name__)

MANIFEST_COLUMNS = (
    "id",
    "split",
    "label",
    "height",
    "width",
    "channels",
    "mode",
    "sha256",
    "mean_intensity",
)
_SITE = "local_site"


def build_manifest(
    data: ImageData, originals: Originals | Sequence[OriginalImage] | None = None
) -> pd.DataFrame:
    """One row per image: id, split, label, height, width, channels, mode, sha256, mean_intensity.

    Args:
        data: the canonical images (N, H, W, C).
        originals: each image's original size and mode, in ``data`` order, and its digest
            and mean when it was decoded at its own size; ``None`` when the images are
            stored as they came (digits, Fashion-MNIST). Without a digest, the digest and
            mean are the store's record (streamed images) or those of ``data``'s rows.

    Returns:
        A DataFrame with :data:`MANIFEST_COLUMNS`.

    Raises:
        DataError: when ``originals`` does not have one entry per image.
    """
    if originals is None:
        originals = canonical_originals(data)
    elif not isinstance(originals, Originals):
        originals = Originals.of(originals)
    if len(originals) != len(data.images):
        raise DataError(f"{len(originals)} original descriptions for {len(data.images)} images")
    images = data.images
    digests: Sequence[str] | np.ndarray
    if originals.decoded:  # decoded at their own size
        digests, means = originals.digests, originals.means
    elif isinstance(images, LazyImages):  # the store's record: its pixels are not read again
        digests, means = images.row_digests(), images.row_means()
    else:
        digests = row_digests(images)
        means = images.reshape(len(images), -1).mean(axis=1, dtype=np.float64)
    return pd.DataFrame(
        {
            "id": np.asarray(data.ids, dtype=str),  # asarray: no copy of what has the type
            "split": np.asarray(data.splits, dtype=str),
            "label": np.asarray(data.labels, dtype=np.int64),
            "height": originals.heights,
            "width": originals.widths,
            "channels": np.full(len(images), images.shape[3], dtype=np.int64),
            "mode": originals.modes,
            "sha256": digests,
            "mean_intensity": means,
        },
        columns=list(MANIFEST_COLUMNS),
    )


def class_counts(manifest: pd.DataFrame, class_names: Sequence[str]) -> pd.DataFrame:
    """Images per class for each split that has labels (absent classes count 0).

    Args:
        manifest: a table with ``split`` and ``label`` columns.
        class_names: the label names, in index order.

    Returns:
        Columns ``id`` (``"<split>/<class name>"``), ``split``, ``label``, ``count``.
    """
    rows = []
    labelled = manifest[manifest["label"] != UNLABELLED]
    for split in (TRAIN, TEST):
        in_split = labelled[labelled["split"] == split]
        if in_split.empty:
            continue
        counts = in_split["label"].value_counts()
        for label, name in enumerate(class_names):
            rows.append((f"{split}/{name}", split, label, int(counts.get(label, 0))))
    return pd.DataFrame(rows, columns=["id", "split", "label", "count"]).astype(
        {"label": np.int64, "count": np.int64}
    )


def expected_test_labels(manifest: pd.DataFrame, n_classes: int) -> list[int]:
    """Labels a test image may carry: the train labels, or every class when train is unlabelled.

    Args:
        manifest: a table with ``split`` and ``label`` columns.
        n_classes: number of class names.
    """
    train = manifest.loc[(manifest["split"] == TRAIN) & (manifest["label"] != UNLABELLED), "label"]
    return sorted(int(v) for v in train.unique()) if len(train) else list(range(n_classes))


def build_expectations(
    manifest: pd.DataFrame, class_names: Sequence[str], config: ValidateConfig
) -> dict[str, list[Any]]:
    """The GX expectations of each table (``manifest``, ``train``, ``test``, ``class_counts``).

    Args:
        manifest: the manifest (only the train labels are read, for the test label set).
        class_names: the label names.
        config: thresholds.

    Returns:
        Table name to a list of GX expectation objects.
    """
    import great_expectations.expectations as gxe

    return {
        "manifest": [
            gxe.ExpectTableRowCountToBeBetween(min_value=1, max_value=config.max_images),
            gxe.ExpectColumnValuesToBeUnique(column="id"),
            gxe.ExpectColumnValuesToBeInSet(column="split", value_set=[TRAIN, TEST]),
            gxe.ExpectColumnValuesToBeInSet(column="label", value_set=[UNLABELLED, *range(len(class_names))]),
            gxe.ExpectColumnValuesToBeBetween(
                column="height", min_value=config.min_side, max_value=config.max_side
            ),
            gxe.ExpectColumnValuesToBeBetween(
                column="width", min_value=config.min_side, max_value=config.max_side
            ),
            gxe.ExpectColumnValuesToBeInSet(column="channels", value_set=list(config.allowed_channels)),
            gxe.ExpectColumnValuesToBeBetween(column="mean_intensity", min_value=0, max_value=255),
            gxe.ExpectColumnProportionOfUniqueValuesToBeBetween(
                column="sha256", min_value=1.0 - config.max_duplicate_share
            ),
            gxe.ExpectColumnStdevToBeBetween(column="mean_intensity", min_value=config.min_pixel_std),
        ],
        "train": [gxe.ExpectTableRowCountToBeBetween(min_value=config.min_train_images)],
        "test": [
            gxe.ExpectTableRowCountToBeBetween(min_value=config.min_test_images),
            gxe.ExpectColumnValuesToBeInSet(
                column="label", value_set=expected_test_labels(manifest, len(class_names))
            ),
        ],
        "class_counts": [gxe.ExpectColumnValuesToBeBetween(column="count", min_value=config.min_per_class)],
    }


def _ephemeral_context(docs_dir: Path) -> Any:
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    site = {
        "class_name": "SiteBuilder",
        "show_how_to_buttons": False,
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
    }
    project = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        data_docs_sites={_SITE: site},
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
    )
    return gx.get_context(project_config=project, mode="ephemeral")


@contextlib.contextmanager
def _no_batch_fingerprint() -> Iterator[None]:
    """Keep Great Expectations (1.x) from fingerprinting each table it checks.

    Its pandas engine hashes every table under ``HASH_THRESHOLD`` bytes (1 GB) whole, for a
    batch marker: each string column made into Python objects and hashed, the largest part
    of the memory the check takes (at 200,000 rows the `id` and `sha256` columns, about 50
    MB at once, by memray). This project records the data's fingerprint itself (the MLflow
    tag ``data.fingerprint``, DVC's hashes of the manifest). GX has no setting for it, so
    its module's threshold is set to 0 for the check and put back after.
    """
    from great_expectations.execution_engine import pandas_execution_engine as engine

    before = getattr(engine, "HASH_THRESHOLD", None)
    engine.HASH_THRESHOLD = 0  # type: ignore[attr-defined]
    try:
        yield
    finally:
        if before is None:
            del engine.HASH_THRESHOLD  # type: ignore[attr-defined]
        else:
            engine.HASH_THRESHOLD = before  # type: ignore[attr-defined]


def run_suites(
    tables: Mapping[str, pd.DataFrame],
    expectations: Mapping[str, list[Any]],
    docs_dir: Path,
    examples: int,
) -> dict[str, dict[str, Any]]:
    """Validate each table against its expectations and build Data Docs into ``docs_dir``.

    Args:
        tables: table name to DataFrame (each has an ``id`` column naming its rows).
        expectations: table name to GX expectations.
        docs_dir: an empty folder that receives the Data Docs site.
        examples: offending ids kept per failed column expectation.

    Returns:
        Table name to the GX suite validation result as a JSON-able dict.
    """
    import great_expectations as gx

    context = _ephemeral_context(docs_dir)
    source = context.data_sources.add_pandas("imsvd")
    result_format = {
        "result_format": "SUMMARY",
        "unexpected_index_column_names": ["id"],
        "partial_unexpected_count": max(examples, 1),
    }
    results = {}
    with _no_batch_fingerprint():
        for name, table in tables.items():
            batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe(name)
            suite = context.suites.add(gx.ExpectationSuite(name=name, expectations=list(expectations[name])))
            definition = context.validation_definitions.add(
                gx.ValidationDefinition(name=name, data=batch, suite=suite)
            )
            result = definition.run(batch_parameters={"dataframe": table}, result_format=result_format)
            results[name] = _jsonable(result.to_json_dict())
    context.build_data_docs(site_names=[_SITE])
    return results


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=functools.partial(json_default, fallback=str)))


def duplicate_ids(manifest: pd.DataFrame) -> list[str]:
    """Ids of images whose pixels repeat an earlier image's (by ``sha256``).

    Args:
        manifest: a table with ``id`` and ``sha256``.
    """
    return manifest.loc[manifest["sha256"].duplicated(), "id"].astype(str).tolist()


def summarize_failures(
    results: Mapping[str, Mapping[str, Any]], manifest: pd.DataFrame, examples: int
) -> list[dict[str, Any]]:
    """One entry per failed expectation: table, type, column, bounds, observation, example ids.

    Args:
        results: table name to GX suite result dict (from :func:`run_suites`).
        manifest: the manifest, to name duplicated images.
        examples: at most this many example ids per failure.
    """
    failures = []
    for table, result in results.items():
        for outcome in result["results"]:
            if outcome["success"]:
                continue
            config = outcome["expectation_config"]
            kwargs = {k: v for k, v in config["kwargs"].items() if k not in {"batch_id", "column"}}
            detail = outcome.get("result") or {}
            ids = [str(row.get("id")) for row in detail.get("partial_unexpected_index_list") or []]
            if config["type"] == "expect_column_proportion_of_unique_values_to_be_between":
                ids = duplicate_ids(manifest)
            exception = outcome.get("exception_info") or {}
            failures.append(
                {
                    "table": table,
                    "expectation": config["type"],
                    "column": config["kwargs"].get("column"),
                    "kwargs": kwargs,
                    "observed_value": detail.get("observed_value"),
                    "unexpected_count": detail.get("unexpected_count"),
                    "examples": ids[:examples],
                    "exception": exception.get("exception_message")
                    if exception.get("raised_exception")
                    else None,
                }
            )
    return failures


def _describe_failure(failure: Mapping[str, Any]) -> str:
    bounds = ", ".join(
        f"{k}={v}" for k, v in failure["kwargs"].items() if k in {"min_value", "max_value", "value_set"}
    )
    column = f" on {failure['column']}" if failure["column"] else ""
    text = f"- {failure['table']}: {failure['expectation']}{column} ({bounds})"
    if failure["unexpected_count"] is not None:
        text += f": {failure['unexpected_count']} unexpected"
    elif failure["observed_value"] is not None:
        text += f": observed {failure['observed_value']}"
    if failure["examples"]:
        text += f", e.g. {', '.join(failure['examples'])}"
    if failure["exception"]:
        text += f" (error: {failure['exception']})"
    return text


def failure_message(failures: Sequence[Mapping[str, Any]], total: int) -> str:
    """The message of a failed validation: one line per failed expectation.

    Args:
        failures: entries from :func:`summarize_failures`.
        total: number of expectations evaluated.
    """
    if not failures:
        return ""
    lines = [f"image validation failed: {len(failures)} of {total} expectations failed"]
    return "\n".join(lines + [_describe_failure(f) for f in failures])


def new_staging(target: Path) -> Path:
    """An empty sibling folder of ``target`` for :func:`publish` to put in its place.

    The staging folders a killed run left behind are removed first (the project lock
    keeps two runs from staging at once).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    for leftover in [
        *target.parent.glob(f".{target.name}.*.tmp"),
        *target.parent.glob(f".{target.name}.*.old"),
    ]:
        logger.info("removing %s, left by an interrupted run", leftover)
        shutil.rmtree(leftover, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp's 0700 would stay on the published folder
    return staging


def publish(staging: Path, target: Path) -> None:
    """Put the complete folder ``staging`` in ``target``'s place (two renames: a kill
    between them leaves the previous folder under a ``.old`` name, which the next
    :func:`new_staging` removes, and no ``target``)."""
    previous = None
    if target.exists():
        previous = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
        os.replace(target, previous / target.name)
    os.replace(staging, target)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


@contextlib.contextmanager
def staged_folder(target: Path) -> Iterator[Path]:
    """Yield an empty sibling folder of ``target`` that replaces ``target`` on success.

    A killed or failed run leaves the previous ``target`` (or none), never a half-written one.

    Args:
        target: the folder to (re)place.
    """
    staging = new_staging(target)
    try:
        yield staging
        publish(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def validate_manifest(
    manifest: pd.DataFrame, class_names: Sequence[str], config: ValidateConfig
) -> dict[str, Any]:
    """Run the suite on ``manifest``, write Data Docs, and return the full report.

    Args:
        manifest: from :func:`build_manifest`.
        class_names: the label names.
        config: thresholds and the Data Docs folder.

    Returns:
        A JSON-able dict: ``success``, ``statistics``, ``failures`` (see
        :func:`summarize_failures`), ``message`` (empty on success), ``data_docs``
        (the site's index.html) and ``results`` (GX's full result per table).
    """
    # The split tables hold only the columns their expectations read (and ``id``, which names
    # offending rows): copies of every column took 28 MiB more at 200,000 images.
    tables = {
        "manifest": manifest,
        "train": manifest.loc[manifest["split"] == TRAIN, ["id"]].reset_index(drop=True),
        "test": manifest.loc[manifest["split"] == TEST, ["id", "label"]].reset_index(drop=True),
        "class_counts": class_counts(manifest, class_names),
    }
    expectations = build_expectations(manifest, class_names, config)
    docs_dir = Path(config.data_docs_dir).resolve()  # GX needs an absolute base_directory
    with staged_folder(docs_dir) as staging:
        results = run_suites(tables, expectations, staging, config.report_examples)
    failures = summarize_failures(results, manifest, config.report_examples)
    total = sum(len(r["results"]) for r in results.values())
    message = failure_message(failures, total)
    if message:
        message += f"\nData Docs: {docs_dir / 'index.html'}"
    return {
        "success": not failures,
        "statistics": {
            "evaluated_expectations": total,
            "successful_expectations": total - len(failures),
            "unsuccessful_expectations": len(failures),
        },
        "failures": failures,
        "message": message,
        "data_docs": str(docs_dir / "index.html"),
        "results": results,
    }


def check_images(
    data: ImageData, originals: Originals | Sequence[OriginalImage] | None, config: ValidateConfig
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Build the manifest of ``data`` and validate it.

    Args:
        data: the canonical images.
        originals: their original descriptions (``None``: stored as they came).
        config: thresholds.

    Returns:
        The manifest and the report of :func:`validate_manifest`, with ``images`` (count)
        and ``fingerprint`` (:attr:`ImageData.fingerprint`) added.
    """
    manifest = build_manifest(data, originals)
    report = validate_manifest(manifest, data.class_names, config)
    report["images"] = len(manifest)
    report["class_names"] = list(data.class_names)
    report["fingerprint"] = data.fingerprint
    return manifest, report


def require_validated(images: Any, report: Any, stage: str) -> ImageData:
    """Refuse images that did not pass the ``validate`` pipeline (no stage trusts its input).

    A later stage reads ``data/03_primary/images.npz``; if that file was put there by
    hand, left from an older run, or edited, its fingerprint no longer matches the
    successful validation report, and the stage stops with the validation's own message.

    Args:
        images: what the catalog loaded as ``validated_images``.
        report: what the catalog loaded as ``validation_report``.
        stage: the pipeline asking (named in the messages).

    Raises:
        DataError: on anything but validated, structurally sound images.
    """
    if not isinstance(images, ImageData):
        raise DataError(f"{stage}: validated_images must be image data, got {type(images).__name__}")
    array = images.images
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] not in (1, 3):
        raise DataError(
            f"{stage}: images must be (N, H, W, C) uint8 with C 1 or 3, got {array.dtype} {array.shape}"
        )
    if int(np.sum(images.splits == TRAIN)) < 2:
        raise DataError(f"{stage}: at least 2 training images are needed")
    if not isinstance(report, dict):
        raise DataError(
            f"{stage}: no validation report (data/08_reporting/validation.json): "
            "run `kedro run --pipeline=validate` first"
        )
    if not report.get("success"):
        raise DataError(
            f"{stage}: the last validation failed: {report.get('message', 'see data/08_reporting/validation.json')}"
        )
    if report.get("fingerprint") != images.fingerprint:
        raise DataError(
            f"{stage}: data/03_primary/images.npz is not the data the last successful validation "
            "checked (fingerprints differ): run `kedro run --pipeline=validate` again"
        )
    return images
