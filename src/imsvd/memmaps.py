"""Arrays larger than a memory budget: memory maps of unlinked scratch files, read and
written in chunks without staying in the process's resident memory.

A memory map's pages, once read or written, count in the process's resident memory (RSS,
and PSS) for as long as they stay mapped: reading 1 GB of features in 64 MiB chunks
through a map still leaves the whole gigabyte resident, which is what a user (or the
scale bench, measuring from outside) sees. :func:`release` drops them from the process
with ``madvise(MADV_DONTNEED)``: for a shared file mapping that only unmaps the pages, whose
data stays in the kernel's page cache (written pages are written back to the file as
usual) and is faulted back in on the next access. NumPy has no call for this, so it is
written here: :func:`mapping` finds the ``mmap`` behind an array through ``ndarray.base``,
the public chain from a view to the buffer it was made from.
"""

from __future__ import annotations

import mmap
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


def allocate(
    rows: int, width: int, scratch: Path | None, name: str, dtype: type[np.generic] = np.float32
) -> np.ndarray:
    """A (rows, width) array of ``dtype``: in memory, or a memory map in ``scratch``.

    The map's file is unlinked once mapped: the mapping keeps its pages, their disk space
    goes with the array's last reference, and a crash leaves no file behind.
    """
    if scratch is None:
        return np.empty((rows, width), dtype=dtype)
    scratch.mkdir(parents=True, exist_ok=True)
    handle, path = tempfile.mkstemp(prefix=f"imsvd-{name}-", suffix=".npy", dir=scratch)
    os.close(handle)
    try:
        return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(rows, width))
    finally:
        os.unlink(path)


def mapping(array: Any) -> mmap.mmap | None:
    """The ``mmap`` an array (or a view of one, at any depth) was made from; ``None`` for
    an array in memory."""
    while array is not None and not isinstance(array, mmap.mmap):
        array = getattr(array, "base", None)
    return array


def release(array: Any) -> None:
    """Drop the pages of the memory map behind ``array`` from this process's resident
    memory (see the module's note); nothing for an array in memory or a closed map."""
    mapped = mapping(array)
    if mapped is not None and not mapped.closed:
        mapped.madvise(mmap.MADV_DONTNEED)


def read_rows(array: Any, rows: slice | np.ndarray) -> np.ndarray:
    """``array[rows]`` as an array of its own: for a memory map, a copy, after which the
    map's pages are released (:func:`release`), so reading a map chunk by chunk holds one
    chunk; for an array in memory, the plain (possibly shared) ``array[rows]``."""
    if mapping(array) is None:
        return array[rows]
    chunk = np.array(array[rows])
    release(array)
    return chunk
