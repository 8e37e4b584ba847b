"""Decoding a folder's image files in parallel, each file once, into one array.

Two passes over the files, each in a pool of worker processes: the first reads only the
headers (size and mode: Pillow decodes no pixels at ``Image.open``), which fixes the common
size and channel count, so the second can decode and resize every file straight into its
row of one array allocated once. Before this, the decoded originals, their resized copies,
the stacked array and the in-memory ``.npz`` were all held at once (four times the data).

The array lives in anonymous shared memory created before the pool forks, so workers write
their rows in place and send back only a status and the image's digest and mean; no pixels
are pickled. Where ``fork`` is not available the decoding runs in this process.

A folder larger than ``data.max_in_memory_mb`` takes the other way, :func:`map_segments`:
each worker takes consecutive files, a segment at a time, and writes them into the image
store itself (:mod:`imsvd.store`), sending back only each file's digest and mean. Sending
the bytes to one writing process instead capped the whole at that process's rate (0.38 ms
of its CPU a file, measured by ``bench/validate_throughput.py``: about 2,600 files/s
however many cores decode).

Written here rather than with a dataset engine: the engine (litdata) stores and streams the
images; what this module does is the validation's own decoding, which no engine does for
it (header checks, bomb limits, the canonical conversion, every failure named).
"""

from __future__ import annotations

import collections
import contextlib
import gc
import itertools
import math
import mmap
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from imsvd.errors import DataError

#: Files per task: enough to amortise the round trip, few enough to balance the workers.
CHUNK = 64
#: Below this many files the pool's start costs more than it saves.
MIN_PARALLEL_FILES = 2 * CHUNK
#: Tasks submitted ahead per worker: keeps every worker busy, bounds what waits to be read.
IN_FLIGHT = 3
#: The most files in one segment of :func:`map_segments`. A segment is written as shards of
#: its own (by the worker that takes it), so it ends on one part-filled chunk a split: the
#: 20,000 photos of the scale bench (segments of 313 files, about 25 MB) made 464 chunks of
#: 3.6 MB on average where 4 MB was asked. Larger segments would make the progress bar move
#: in larger steps and balance the workers less well.
SEGMENT = 512
#: Segments wanted at least (as far as :data:`CHUNK` allows): eight a worker for eight
#: workers, so that the last to finish leaves the others idle for a short while only.
SEGMENTS = 64


@dataclass(frozen=True, slots=True)  # one per file
class Header:
    """A file's size and Pillow mode, read without decoding its pixels."""

    height: int
    width: int
    mode: str


def cpu_count() -> int:
    """The cores this process may use (its affinity, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


# Per-process state of the pool workers, set before the fork.
_SHARED: dict[str, Any] = {}


def die_with_parent() -> None:
    """Linux: ask the kernel to kill this worker process when its parent dies."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - best effort
        pass


@contextlib.contextmanager
def pillow_errors() -> Iterator[None]:
    """Turn what Pillow raises on a bad file into a :class:`DataError` with the reason."""
    try:
        yield
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(f"decompression bomb refused by data.max_image_pixels ({exc})") from exc
    except UnidentifiedImageError:
        raise DataError("not an image Pillow can identify") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DataError(f"cannot decode ({exc})") from exc


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Keep the garbage collector off every object that exists now, while forked workers
    share them.

    A forked child shares its parent's memory until either writes to a page. A collection
    in the child writes to the header of each container object it visits, so it copies
    every page that the parent's per-file tables sit on (at 200,000 files the two workers
    held about 130 MiB of such copies each). :func:`gc.freeze` moves the objects to a
    generation that no collection visits, as Python's documentation advises before a fork;
    they go back to the collector when the pool has ended.
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _init(max_image_pixels: int) -> None:
    import warnings

    die_with_parent()
    Image.MAX_IMAGE_PIXELS = max_image_pixels
    warnings.simplefilter("error", Image.DecompressionBombWarning)


def read_header(path: Path) -> Header:
    """Size and mode of one image file, decoding no pixels.

    Raises:
        DataError: with the reason (not an image, a decompression bomb, unreadable).
    """
    with pillow_errors(), Image.open(path) as img:
        return Header(img.height, img.width, img.mode)


def _headers(paths: Sequence[str]) -> list[Header | str]:
    out: list[Header | str] = []
    for path in paths:
        try:
            out.append(read_header(Path(path)))
        except DataError as exc:
            out.append(str(exc))
    return out


def _decode_rows(task: tuple[int, Sequence[str]]) -> list[tuple[str | None, Any]]:
    """Decode ``task``'s files into their rows of the shared array: per file, the reason
    it failed (or ``None``) and what ``decode`` said of it (or ``None``)."""
    start, paths = task
    decode: Callable[[Path], tuple[np.ndarray, Any]] = _SHARED["decode"]
    out = _SHARED["out"]
    results: list[tuple[str | None, Any]] = []
    for offset, path in enumerate(paths):
        try:
            out[start + offset], about = decode(Path(path))
            results.append((None, about))
        except DataError as exc:
            results.append((str(exc), None))
    return results


def _tasks(paths: Sequence[str]) -> list[tuple[int, Sequence[str]]]:
    return [(start, paths[start : start + CHUNK]) for start in range(0, len(paths), CHUNK)]


def _map(
    fn: Callable[[Any], list[Any]],
    tasks: Sequence[Any],
    workers: int,
    max_image_pixels: int,
    bar: tqdm,
) -> Iterator[list[Any]]:
    """``fn`` over ``tasks`` in order, in a forked pool when worth it, updating ``bar``.

    At most :data:`IN_FLIGHT` tasks per worker are submitted ahead of the one being read:
    ``Pool.imap`` would queue every result that the caller has not read yet, and when the
    results carry images (the store's bytes) memory would grow with the folder.
    """
    parallel = workers > 1 and "fork" in multiprocessing.get_all_start_methods()
    if not parallel:
        for task in tasks:
            result = fn(task)
            bar.update(len(result))
            yield result
        return
    context = multiprocessing.get_context("fork")  # the workers inherit _SHARED, nothing is pickled
    with frozen_heap(), context.Pool(workers, _init, (max_image_pixels,)) as pool:
        upcoming = iter(tasks)
        pending = collections.deque(
            pool.apply_async(fn, (task,)) for task in itertools.islice(upcoming, IN_FLIGHT * workers)
        )
        while pending:
            result = pending.popleft().get()
            for task in itertools.islice(upcoming, 1):
                pending.append(pool.apply_async(fn, (task,)))
            bar.update(len(result))
            yield result


def _progress(total: int, desc: str) -> tqdm:
    # Off a TTY (logs, CI) a line every 10 s instead of a redrawn bar.
    interval = 0.5 if sys.stderr.isatty() else 10.0
    return tqdm(total=total, desc=desc, unit="file", mininterval=interval, disable=total < MIN_PARALLEL_FILES)


def read_headers(paths: Sequence[str | Path], max_image_pixels: int, workers: int) -> list[Header | str]:
    """Each file's :class:`Header`, or the reason it cannot be read, in ``paths`` order."""
    names = [str(p) for p in paths]
    workers = workers if len(names) >= MIN_PARALLEL_FILES else 1
    tasks = [names[start : start + CHUNK] for start in range(0, len(names), CHUNK)]
    out: list[Header | str] = []
    with _progress(len(names), "reading headers") as bar:
        for result in _map(_headers, tasks, workers, max_image_pixels, bar):
            out.extend(result)
    return out


def decode_into(
    paths: Sequence[str | Path],
    shape: tuple[int, int, int],
    decode: Callable[[Path], tuple[np.ndarray, Any]],
    max_image_pixels: int,
    workers: int,
) -> tuple[np.ndarray, list[str | None], list[Any]]:
    """Decode every file with ``decode`` into one uint8 array of ``(len(paths), *shape)``.
    ``decode`` returns the file's ``shape`` row and a small value about the file (sent back
    to this process: the validation's digest and mean).

    Returns:
        The array (rows of failed files are left zero), per file ``None`` or the reason it
        failed, and per file what ``decode`` said of it (``None`` where it failed).
    """
    n = len(paths)
    nbytes = max(1, n * math.prod(shape))
    buffer = mmap.mmap(-1, nbytes)  # anonymous and shared: forked workers write into it
    out = np.frombuffer(buffer, dtype=np.uint8, count=n * math.prod(shape)).reshape(n, *shape)
    names = [str(p) for p in paths]
    workers = workers if n >= MIN_PARALLEL_FILES else 1
    _SHARED.update(decode=decode, out=out)
    reasons: list[str | None] = []
    about: list[Any] = []
    try:
        with _progress(n, "decoding") as bar:
            for result in _map(_decode_rows, _tasks(names), workers, max_image_pixels, bar):
                for reason, said in result:
                    reasons.append(reason)
                    about.append(said)
    finally:
        _SHARED.clear()
    return out, reasons, about


def segments(count: int) -> list[tuple[int, int]]:
    """``count`` files cut into consecutive ``(start, stop)`` ranges of :data:`CHUNK` to
    :data:`SEGMENT` files, :data:`SEGMENTS` of them when the files allow. The cut depends on
    the files alone, not on the number of workers: the store's shards come out the same
    whatever ``data.workers`` says."""
    size = min(SEGMENT, max(CHUNK, math.ceil(count / SEGMENTS)))
    return [(start, min(start + size, count)) for start in range(0, count, size)]


def _apply_segment(task: tuple[int, int, int]) -> list[tuple[Any, str | None]]:
    segment, start, stop = task
    return _SHARED["fn"](segment, start, stop)


def map_segments(
    fn: Callable[[int, int, int], list[tuple[Any, str | None]]],
    bounds: Sequence[tuple[int, int]],
    max_image_pixels: int,
    workers: int,
    desc: str = "decoding",
) -> Iterator[tuple[Any, str | None]]:
    """``fn(segment, start, stop)`` on each of the consecutive ranges ``bounds`` of the
    files (:func:`segments`), in worker processes; yields its per-file ``(result, None)``
    or ``(None, reason)`` in file order.

    ``fn`` does the whole work of its files, writing included (the image store's workers
    each write their own shards, :func:`imsvd.store.stream_into_store`), and sends back
    only what is small: this process merely counts. It reaches the workers by the fork, so
    it may be any callable, a closure included.
    """
    count = sum(stop - start for start, stop in bounds)
    workers = workers if count >= MIN_PARALLEL_FILES else 1
    tasks = [(segment, start, stop) for segment, (start, stop) in enumerate(bounds)]
    _SHARED.update(fn=fn)
    try:
        with _progress(count, desc) as bar:
            for result in _map(_apply_segment, tasks, workers, max_image_pixels, bar):
                yield from result
    finally:
        _SHARED.clear()
