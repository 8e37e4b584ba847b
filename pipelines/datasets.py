"""Kedro datasets that write atomically and load nothing executable.

Why not kedro-datasets' own: its CSV/JSON/Matplotlib datasets write in place through
fsspec, so a killed run can leave a truncated file; it has no NumPy ``.npz`` dataset
that refuses pickles, and its torch support loads full pickles. These few classes wrap
the same formats with :mod:`imsvd.io`'s write-then-rename.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from kedro.io import AbstractDataset, DatasetError

from imsvd.data import ImageData
from imsvd.errors import DataError
from imsvd.io import atomic_open, atomic_write_bytes, json_default


class _FileDataset(AbstractDataset):
    def __init__(self, filepath: str, metadata: dict[str, Any] | None = None) -> None:
        self._filepath = Path(filepath)
        self.metadata = metadata

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath)}

    def _exists(self) -> bool:
        return self._filepath.is_file()

    def _missing(self) -> DatasetError:
        return DatasetError(f"{self._filepath} does not exist: run the pipeline that writes it first")


class ImageArraysDataset(_FileDataset):
    """:class:`imsvd.data.ImageData` as an uncompressed ``.npz`` (no pickles allowed)."""

    def load(self) -> ImageData:
        if not self._exists():
            raise self._missing()
        try:
            with np.load(self._filepath, allow_pickle=False) as arrays:
                return ImageData.from_arrays({k: arrays[k] for k in arrays.files})
        except DataError as exc:
            raise DataError(f"{self._filepath}: {exc}") from None
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise DataError(
                f"{self._filepath} is not a readable image array file ({exc}); "
                "run `kedro run --pipeline=validate` to rebuild it"
            ) from None

    def save(self, data: ImageData) -> None:
        # Streamed into the temporary file: an in-memory buffer and its copy would hold
        # the images twice more.
        with atomic_open(self._filepath, "wb") as handle:
            np.savez(handle, **data.to_arrays())  # type: ignore[arg-type]


class AtomicCSVDataset(_FileDataset):
    """A pandas table as CSV."""

    def load(self) -> pd.DataFrame:
        if not self._exists():
            raise self._missing()
        return pd.read_csv(self._filepath)

    def save(self, data: pd.DataFrame) -> None:
        with atomic_open(self._filepath, "w") as handle:
            data.to_csv(handle, index=False)


class AtomicJSONDataset(_FileDataset):
    """A JSON document (dict or list), indented for people and for ``dvc metrics``.

    Args:
        filepath: where the file lives.
        optional: load ``None`` instead of failing when the file does not exist (an
            input that a pipeline can do without, such as the view-cache manifest).
    """

    def __init__(self, filepath: str, optional: bool = False, metadata: dict[str, Any] | None = None) -> None:
        super().__init__(filepath, metadata)
        self._optional = optional

    def load(self) -> Any:
        if not self._exists():
            if self._optional:
                return None
            raise self._missing()
        return json.loads(self._filepath.read_text())

    def save(self, data: Any) -> None:
        with atomic_open(self._filepath, "w") as handle:
            json.dump(data, handle, indent=2, sort_keys=True, default=json_default)
            handle.write("\n")


class AtomicPNGDataset(_FileDataset):
    """A Matplotlib figure saved as PNG."""

    def load(self) -> bytes:
        if not self._exists():
            raise self._missing()
        return self._filepath.read_bytes()

    def save(self, data: Any) -> None:
        buffer = io.BytesIO()
        data.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
        atomic_write_bytes(self._filepath, buffer.getvalue())


class TorchWeightsDataset(_FileDataset):
    """A dict of tensors (plus plain metadata) loaded with ``weights_only=True``."""

    def load(self) -> dict[str, Any]:
        from imsvd.checkpoints import load_weights

        if not self._exists():
            raise self._missing()
        return load_weights(self._filepath)

    def save(self, data: dict[str, Any]) -> None:
        from imsvd.checkpoints import save_weights

        save_weights(self._filepath, data)
