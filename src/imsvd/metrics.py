"""Metrics on frozen features: kNN, linear probe, redundancy, bin usage, discrete code, collapse.

Every function takes torch tensors or numpy arrays and returns plain Python floats (or
small numpy arrays where a picture needs them), so results go straight into a metrics
JSON file or MLflow. Nothing here trains the encoder or reads files; features are
computed elsewhere and passed in.

References:
    Wu et al. 2018, "Unsupervised Feature Learning via Non-Parametric Instance
    Discrimination" (the weighted kNN protocol, k=20, T=0.07).
    Garrido et al. 2023, "RankMe: Assessing the Downstream Performance of Pretrained
    Self-Supervised Representations by Their Rank" (effective rank).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from imsvd.errors import ConfigError, DataError, check_positive
from imsvd.memmaps import read_rows

ArrayLike = torch.Tensor | np.ndarray

#: A bin whose marginal mass is below ``DEAD_BIN_FRACTION / bin_size`` counts as dead.
DEAD_BIN_FRACTION = 1e-3
#: The eps of RankMe (Garrido et al. 2023), added to the normalised singular values.
RANKME_EPS = 1e-7


# --------------------------------------------------------------------------- inputs


def _as_float(x: ArrayLike, name: str, ndim: int) -> torch.Tensor:
    """``x`` as a detached float32 CPU tensor of ``ndim`` dimensions (float64 kept)."""
    if isinstance(x, np.ndarray) and not x.flags.writeable:
        x = np.array(x)  # a read-only memory map's rows: torch cannot share read-only memory
    t = torch.as_tensor(x).detach().cpu()
    if t.ndim != ndim:
        raise DataError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if not (t.is_floating_point() and t.dtype == torch.float64):
        t = t.float()
    return t


def _chunk(x: ArrayLike, rows: slice | np.ndarray, name: str) -> torch.Tensor:
    """``x[rows]`` as by :func:`_as_float`, read with :func:`imsvd.memmaps.read_rows`: a
    memory map's pages leave the process once the chunk is copied, so reading features
    larger than memory chunk by chunk holds one chunk, not every page touched so far."""
    return _as_float(read_rows(x, rows), name, 2)


def _as_labels(y: ArrayLike, name: str, n: int) -> torch.Tensor:
    """``y`` as a (n,) int64 CPU tensor of non-negative class indices."""
    t = torch.as_tensor(y).detach().cpu()
    if t.ndim != 1 or t.shape[0] != n:
        raise DataError(f"{name} must have shape ({n},), got {tuple(t.shape)}")
    if t.is_floating_point() and not torch.equal(t, t.round()):
        raise DataError(f"{name} must hold integer class indices")
    t = t.long()
    if n and int(t.min()) < 0:
        raise DataError(f"{name} must be >= 0 (unlabelled samples cannot be evaluated)")
    return t


# --------------------------------------------------------------------------- kNN


def _vote(
    top_sim: torch.Tensor,
    top_idx: torch.Tensor,
    train_labels: torch.Tensor,
    temperature: float,
    num_classes: int,
) -> torch.Tensor:
    """(M, C) class scores: each of a row's neighbours (``top_idx``, with similarities
    ``top_sim``, both (M, k)) votes ``exp(similarity / temperature)`` for its class."""
    weights = (top_sim / temperature).exp()
    scores = torch.zeros(top_sim.shape[0], num_classes, dtype=weights.dtype)
    return scores.scatter_add_(1, train_labels[top_idx], weights)


def _streamed_vote(
    queries: Iterable[torch.Tensor],
    n_train: int,
    train_block: Callable[[int], torch.Tensor],
    train_chunk_size: int,
    labels: torch.Tensor,
    protocols: Sequence[tuple[int, float]],
    num_classes: int,
) -> list[torch.Tensor]:
    """Class scores of each query chunk's nearest training rows, visiting the training set
    ``train_chunk_size`` rows at a time with a running top-k, for each ``(k, temperature)``
    of ``protocols``.

    ``train_block(start)`` gives the prepared training rows from ``start`` (normalised
    features, one-hot codes); ``query @ block.T`` is the similarity. A training set of one
    block is prepared once and kept. One pass serves every protocol: it keeps the largest
    k, and a smaller k votes with the first k of those (``topk`` sorts them), so the
    reference's k = 20 and lightly's k = 200 cost one similarity pass, not two.
    """
    k_max = max(k for k, _ in protocols)
    starts = range(0, n_train, train_chunk_size)
    kept = train_block(0) if len(starts) == 1 else None
    chunks: list[list[torch.Tensor]] = [[] for _ in protocols]
    for query in queries:
        best_sim = torch.empty(query.shape[0], 0, dtype=query.dtype)
        best_idx = torch.empty(query.shape[0], 0, dtype=torch.long)
        for start in starts:
            block = kept if kept is not None else train_block(start)
            sim, idx = (query @ block.T).topk(min(k_max, block.shape[0]), dim=1)
            merged = torch.cat([best_sim, sim], dim=1)
            best_sim, order = merged.topk(min(k_max, merged.shape[1]), dim=1)
            best_idx = torch.cat([best_idx, idx + start], dim=1).gather(1, order)
        for out, (k, temperature) in zip(chunks, protocols, strict=True):
            out.append(_vote(best_sim[:, :k], best_idx[:, :k], labels, temperature, num_classes))
    return [torch.cat(out) if out else torch.zeros(0, num_classes) for out in chunks]


def _rows(x: ArrayLike, name: str) -> tuple[int, int]:
    """(rows, columns) of a 2-d array without reading it (a memory map stays on disk)."""
    if len(x.shape) != 2:
        raise DataError(f"{name} must have 2 dimensions, got shape {tuple(x.shape)}")
    return int(x.shape[0]), int(x.shape[1])


#: The largest normalised block of training features the kNN holds at once.
TRAIN_CHUNK_BYTES = 64 * 2**20
#: The largest block of similarities (test rows x training rows) the kNN holds at once: at
#: 65,536 training rows a block was 256 MiB, so evaluation's memory grew with the training
#: set up to that many rows.
SIMILARITY_BYTES = 64 * 2**20


def _capped_train_rows(rows: int, row_bytes: int, chunk_size: int, n_test: int, itemsize: int) -> int:
    """Training rows per kNN block: at most ``rows``, a block of at most
    :data:`TRAIN_CHUNK_BYTES` (``row_bytes`` a row) and similarities to a chunk of test
    rows of at most :data:`SIMILARITY_BYTES` (``itemsize`` a value)."""
    return max(
        1,
        min(
            rows,
            TRAIN_CHUNK_BYTES // max(1, row_bytes),
            SIMILARITY_BYTES // (min(chunk_size, max(1, n_test)) * itemsize),
        ),
    )


def knn_scores(
    train_features: ArrayLike,
    train_labels: ArrayLike,
    test_features: ArrayLike,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
    train_chunk_size: int = 65_536,
) -> torch.Tensor:
    """Class scores of the weighted cosine kNN classifier: :func:`knn_scores_many` with one
    ``(k, temperature)``."""
    return knn_scores_many(
        train_features,
        train_labels,
        test_features,
        [(k, temperature)],
        num_classes,
        chunk_size,
        train_chunk_size,
    )[0]


def knn_scores_many(
    train_features: ArrayLike,
    train_labels: ArrayLike,
    test_features: ArrayLike,
    protocols: Sequence[tuple[int, float]],
    num_classes: int | None = None,
    chunk_size: int = 1024,
    train_chunk_size: int = 65_536,
) -> list[torch.Tensor]:
    """Class scores of the weighted cosine kNN classifier (Wu et al. 2018).

    Each test sample takes its ``k`` nearest training samples by cosine similarity; each
    neighbour votes for its class with weight ``exp(sim / temperature)``. The reference
    protocol of InstDisc/IMSVD is k=20, T=0.07; lightly's benchmarks use k=200, T=0.1.

    Both sides are read in chunks, so the features may be memory maps larger than memory:
    ``chunk_size`` test rows against ``train_chunk_size`` training rows at a time, keeping a
    running top-k per test row. Memory is O(chunk_size * train_chunk_size) plus one chunk
    of each, both capped in bytes (``TRAIN_CHUNK_BYTES``, ``SIMILARITY_BYTES``); a
    training set of one chunk is normalised once and kept.

    Args:
        train_features: (N_train, F) frozen features of the labelled training set.
        train_labels: (N_train,) class indices in [0, C).
        test_features: (M, F) features to classify.
        protocols: ``(k, temperature)`` pairs, scored from one similarity pass: k
            neighbours (clipped to N_train when larger), vote temperature (> 0).
        num_classes: C; by default ``max(train_labels) + 1``.
        chunk_size: test rows per similarity block.
        train_chunk_size: training rows per similarity block.

    Returns:
        One (M, C) float tensor of summed votes (higher is more likely) per protocol.

    Raises:
        ConfigError: no protocol, or a k, temperature or chunk size not positive.
        DataError: shapes disagree or the training set is empty.
    """
    n_train, width = _rows(train_features, "train_features")
    n_test, test_width = _rows(test_features, "test_features")
    labels = _as_labels(train_labels, "train_labels", n_train)
    if n_train == 0:
        raise DataError("kNN needs at least one training sample")
    if width != test_width:
        raise DataError(f"train features have {width} columns, test features {test_width}")
    if not protocols:
        raise ConfigError("kNN needs at least one (k, temperature) protocol")
    for k, temperature in protocols:
        check_positive(k, "k")
        check_positive(temperature, "temperature")
    check_positive(chunk_size, "chunk_size")
    check_positive(train_chunk_size, "train_chunk_size")
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    protocols = [(min(k, n_train), temperature) for k, temperature in protocols]
    dtype = _as_float(train_features[:1], "train_features", 2).dtype  # float64 kept, else float32
    # Wide features (raw pixels: 12,288 values per 64 x 64 RGB image) would make one chunk of
    # 65,536 rows several GiB: the chunk is also capped in bytes.
    itemsize = torch.finfo(dtype).bits // 8
    train_chunk_size = _capped_train_rows(train_chunk_size, width * itemsize, chunk_size, n_test, itemsize)

    def train_block(start: int) -> torch.Tensor:
        rows = _chunk(train_features, slice(start, start + train_chunk_size), "train_features")
        return F.normalize(rows.to(dtype), dim=1)

    queries = (
        F.normalize(_chunk(test_features, slice(i, i + chunk_size), "test_features").to(dtype), dim=1)
        for i in range(0, n_test, chunk_size)
    )
    return _streamed_vote(queries, n_train, train_block, train_chunk_size, labels, protocols, num_classes)


def topk_accuracy(scores: ArrayLike, labels: ArrayLike, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Share of samples whose true class is among the ``k`` highest scores, for each k.

    Args:
        scores: (M, C) class scores (logits, votes or probabilities).
        labels: (M,) true class indices.
        ks: the k values; a k above C is clipped to C (so it gives 1.0).

    Returns:
        ``{k: accuracy in [0, 1]}`` for each k in ``ks``.

    Raises:
        DataError: shapes disagree or there are no samples.
    """
    s = _as_float(scores, "scores", 2)
    y = _as_labels(labels, "labels", s.shape[0])
    if s.shape[0] == 0:
        raise DataError("accuracy needs at least one sample")
    if int(y.max()) >= s.shape[1]:
        raise DataError(f"labels go up to {int(y.max())} but scores have only {s.shape[1]} classes")
    ranked = s.topk(min(max(ks), s.shape[1]), dim=1).indices
    hits = ranked == y[:, None]
    return {k: float(hits[:, : min(k, s.shape[1])].any(dim=1).float().mean()) for k in ks}


def knn_accuracy(
    train_features: ArrayLike,
    train_labels: ArrayLike,
    test_features: ArrayLike,
    test_labels: ArrayLike,
    k: int = 20,
    temperature: float = 0.07,
    ks: Sequence[int] = (1, 5),
    chunk_size: int = 1024,
) -> dict[int, float]:
    """Top-k accuracies of the weighted cosine kNN classifier (see ``knn_scores``).

    Returns:
        ``{k: accuracy in [0, 1]}`` for each k in ``ks``.
    """
    return knn_accuracies(
        train_features, train_labels, test_features, test_labels, [(k, temperature)], ks, chunk_size
    )[0]


def knn_accuracies(
    train_features: ArrayLike,
    train_labels: ArrayLike,
    test_features: ArrayLike,
    test_labels: ArrayLike,
    protocols: Sequence[tuple[int, float]],
    ks: Sequence[int] = (1, 5),
    chunk_size: int = 1024,
) -> list[dict[int, float]]:
    """:func:`knn_accuracy` for several ``(k, temperature)`` protocols from one similarity
    pass (:func:`knn_scores_many`).

    Returns:
        One ``{k: accuracy in [0, 1]}`` per protocol.
    """
    y_test = torch.as_tensor(test_labels)
    y_train = torch.as_tensor(train_labels)
    num_classes = int(max(int(y_train.max()), int(y_test.max()))) + 1
    scores = knn_scores_many(train_features, y_train, test_features, protocols, num_classes, chunk_size)
    return [topk_accuracy(s, y_test, ks) for s in scores]


# --------------------------------------------------------------------------- linear probe


#: Bytes per feature value of the full-batch probe: its standardised float32 copy. The
#: statistics are summed in chunks and each chunk is standardised in float64 on its way in
#: (at most :data:`FILL_BYTES` at a time); standardising a whole float64 copy took 12 bytes
#: a value, 938 MiB for 160,000 x 512 backbone features.
FULL_BATCH_BYTES = 4
#: The float64 rows the full-batch probe standardises at once while filling its copy.
FILL_BYTES = 16 * 2**20

#: The most float32 values (in bytes) of one mini-batch the probe standardises at once. A
#: batch of 4,096 raw 64 x 64 RGB images is 200 MB in float32; wider batches are split into pieces whose gradients are summed, which is the same step.
PIECE_BYTES = 64 * 2**20


def linear_probe(
    train_features: ArrayLike,
    train_labels: ArrayLike,
    test_features: ArrayLike,
    test_labels: ArrayLike,
    epochs: int = 200,
    lr: float = 0.1,
    weight_decay: float = 1e-4,
    seed: int = 0,
    ks: Sequence[int] = (1, 5),
    memory_budget_mb: float | None = None,
    batch_size: int = 4096,
    minibatch_epochs: int = 30,
) -> dict[int, float]:
    """Test top-k accuracy of a linear classifier trained on frozen features.

    The features are standardised with the mean and standard deviation of the training
    set only. A linear layer is then trained with Adam (learning rate ``lr`` decayed to 0
    by a cosine, L2 ``weight_decay`` on the weights) on the cross-entropy.

    Full batch (``epochs`` steps) when the training features fit ``memory_budget_mb`` (or
    no budget is set): deterministic for a seed, and well under a second on a few thousand
    512-d features; Adam makes the step size insensitive to how correlated the features
    are. Larger features, memory maps included, are read in mini-batches of
    ``batch_size`` rows, seeded, for ``minibatch_epochs`` passes: the statistics, every
    step and the test logits each touch one batch at a time.

    Args:
        train_features: (N, F) training features.
        train_labels: (N,) class indices.
        test_features: (M, F) test features.
        test_labels: (M,) class indices.
        epochs: full-batch optimisation steps.
        lr: peak learning rate.
        weight_decay: L2 penalty on the weights (not the bias).
        seed: initialises the layer (a local ``torch.Generator``; global state untouched).
        ks: the k values of the reported accuracies.
        memory_budget_mb: the most the full-batch probe may hold (``FULL_BATCH_BYTES`` per
            training value); ``None``: no limit.
        batch_size: rows per mini-batch step.
        minibatch_epochs: passes over the training set in mini-batches.

    Returns:
        ``{k: test accuracy in [0, 1]}`` for each k in ``ks``.

    Raises:
        ConfigError: epochs, lr, batch_size or minibatch_epochs not positive, or
            weight_decay negative.
        DataError: shapes disagree or the training set is empty.
    """
    n, width = _rows(train_features, "train_features")
    m, test_width = _rows(test_features, "test_features")
    y_train = _as_labels(train_labels, "train_labels", n)
    y_test = _as_labels(test_labels, "test_labels", m)
    if n == 0:
        raise DataError("the linear probe needs at least one training sample")
    if width != test_width:
        raise DataError(f"train features have {width} columns, test features {test_width}")
    check_positive(epochs, "epochs")
    check_positive(lr, "lr")
    check_positive(batch_size, "batch_size")
    check_positive(minibatch_epochs, "minibatch_epochs")
    if weight_decay < 0:
        raise ConfigError(f"weight_decay must be >= 0, got {weight_decay}")
    num_classes = int(max(int(y_train.max()), int(y_test.max()) if len(y_test) else 0)) + 1
    generator = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(width) if width else 0.0
    weight = ((torch.rand(num_classes, width, generator=generator) * 2 - 1) * bound).requires_grad_(True)
    bias = torch.zeros(num_classes, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=lr)

    def step(pieces: Iterable[tuple[torch.Tensor, torch.Tensor]], rows: int) -> None:
        """One optimiser step on the mean cross-entropy of ``rows`` samples given in pieces."""
        optimizer.zero_grad(set_to_none=True)
        for x, y in pieces:
            (F.cross_entropy(F.linear(x, weight, bias), y, reduction="sum") / rows).backward()
        (0.5 * weight_decay * weight.pow(2).sum()).backward()
        optimizer.step()

    piece = max(1, PIECE_BYTES // max(1, width * 4))

    def standardised(features: ArrayLike, rows: np.ndarray | slice, name: str) -> torch.Tensor:
        # The statistics are float64; applying them in float32 loses nothing the float32
        # layer would keep, and costs a third of the float64 round trip (the mini-batch
        # probe's largest cost on raw pixels).
        x = _chunk(features, rows, name).float()  # may share the caller's memory
        return torch.sub(x, mean32).mul_(inv_std32)

    fill = max(1, FILL_BYTES // max(1, 8 * width))
    mean, std = _column_stats(train_features, fill)  # constant columns get 1e-8: 0, not NaN
    mean32, inv_std32 = mean.float(), std.reciprocal().float()
    if memory_budget_mb is None or n * width * FULL_BATCH_BYTES <= memory_budget_mb * 2**20:
        # One float32 copy, filled chunk by chunk, each standardised in float64 on the way
        # (FULL_BATCH_BYTES a value, tested): a whole float64 copy first held three times that.
        x_train = torch.empty(n, width)
        for i in range(0, n, fill):
            chunk = _chunk(train_features, slice(i, i + fill), "train_features").to(torch.float64, copy=True)
            x_train[i : i + fill] = chunk.sub_(mean).div_(std)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
        for _ in range(epochs):
            step([(x_train, y_train)], n)
            schedule.step()
        del x_train
    else:
        batches = math.ceil(n / batch_size)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=minibatch_epochs * batches)
        for _ in range(minibatch_epochs):
            order = torch.randperm(n, generator=generator)
            for rows in order.split(batch_size):
                rows = rows.sort().values  # ascending reads of a memory map
                step(
                    (
                        (standardised(train_features, part.numpy(), "train_features"), y_train[part])
                        for part in rows.split(piece)
                    ),
                    len(rows),
                )
                schedule.step()
    with torch.no_grad():
        logits = [
            F.linear(standardised(test_features, slice(i, i + piece), "test_features"), weight, bias)
            for i in range(0, m, piece)
        ]
    return topk_accuracy(torch.cat(logits) if logits else torch.zeros(0, num_classes), y_test, ks)


def _column_stats(x: ArrayLike, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 column means and standard deviations of ``x``, read ``batch_size`` rows at a
    time (shifted by the first row, so the sums of squares do not cancel)."""
    shift = _as_float(x[:1], "train_features", 2).double()[0]
    total = torch.zeros_like(shift)
    squares = torch.zeros_like(shift)
    n = int(x.shape[0])
    for i in range(0, n, batch_size):
        chunk = _chunk(x, slice(i, i + batch_size), "train_features").to(torch.float64, copy=True)
        chunk -= shift
        total += chunk.sum(0)
        squares += chunk.pow_(2).sum(0)
    mean = total / n
    var = (squares / n - mean.pow(2)).clamp_min(0)
    return mean + shift, var.sqrt().clamp_min(1e-8)


# --------------------------------------------------------------------------- redundancy

#: Rows of a chunk when second moments are summed (:class:`Moments`): at most this many
#: bytes of float64 values, so the metrics' memory is set by D, not by N.
MOMENT_BYTES = 64 * 2**20


class Moments:
    """First and second moments of a stream of (rows, D) chunks, summed in float64.

    The redundancy metrics need only D x D sums: the correlation between columns comes
    from the centred sums, the singular values of ``z`` from the eigenvalues of its
    uncentred Gram matrix ``zᵀz``. Summed over chunks, they cost ``O(D²)`` memory for any
    number of rows (at 40,000 x 1,024, the whole-matrix versions held three float64
    copies of ``z`` and an SVD's workspace: over 1 GiB). The sums are taken about the
    first row (``shift``), so centring does not cancel digits when a column's mean is
    large against its spread.
    """

    def __init__(self, dim: int) -> None:
        self.n = 0
        self.shift = torch.zeros(dim, dtype=torch.float64)
        self.total = torch.zeros(dim, dtype=torch.float64)  # sum of (x - shift)
        self.products = torch.zeros(dim, dim, dtype=torch.float64)  # sum of (x - shift)ᵀ(x - shift)

    def add(self, chunk: torch.Tensor) -> None:
        """Add a (rows, D) chunk."""
        x = chunk.double()
        if self.n == 0 and len(x):
            self.shift = x[0].clone()
        x = x - self.shift
        self.n += len(x)
        self.total += x.sum(0)
        self.products += x.T @ x

    @property
    def dim(self) -> int:
        return int(self.shift.shape[0])

    def correlation(self) -> torch.Tensor:
        """(D, D) Pearson correlation; 0 in the rows and columns of constant columns."""
        centred = self.products - torch.outer(self.total, self.total) / self.n
        var = centred.diagonal().clamp_min(0)
        # A column whose spread is at rounding level of its sums is constant.
        scale = self.products.diagonal().abs().clamp_min(1e-300)
        std = torch.where(var > 1e-12 * scale, var.sqrt(), torch.zeros_like(var))
        inverse = torch.where(std > 0, 1 / std, torch.zeros_like(std))
        return centred * inverse[:, None] * inverse[None, :]

    def gram(self) -> torch.Tensor:
        """(D, D) uncentred ``zᵀz``, rebuilt from the shifted sums."""
        s = self.shift
        return (
            self.products
            + torch.outer(s, self.total)
            + torch.outer(self.total, s)
            + self.n * torch.outer(s, s)
        )


def _row_chunks(z: ArrayLike, name: str) -> Iterator[torch.Tensor]:
    """The rows of ``z`` (an array or a memory map) as float tensors, in chunks whose
    float64 copy takes at most :data:`MOMENT_BYTES`."""
    n, d = _rows(z, name)
    rows = max(1, MOMENT_BYTES // max(1, 8 * d))
    for i in range(0, n, rows):
        yield _chunk(z, slice(i, i + rows), name)


def moments(z: ArrayLike, name: str = "z") -> Moments:
    """:class:`Moments` of the rows of ``z`` (an array or a memory map, read in chunks of
    :data:`MOMENT_BYTES`)."""
    out = Moments(_rows(z, name)[1])
    for chunk in _row_chunks(z, name):
        out.add(chunk)
    return out


def mean_abs_off_diagonal_correlation(z: ArrayLike | Moments, block: int = 1) -> float:
    """Mean absolute Pearson correlation between distinct columns of ``z`` (or, with
    ``block``, between columns of distinct blocks).

    0 for decorrelated features, 1 when every column is a copy (up to sign and scale) of
    one other. A constant column has no defined correlation; it counts as 0.

    Args:
        z: (N, D) features (for example the projector output), N >= 2, D >= 2, or their
            :class:`Moments` (read in chunks either way).
        block: columns come in blocks of this many consecutive units, and pairs inside
            one block are left out. For IMSVD's soft codes (``block = bin_size``): the
            units of one block sum to 1, so they are anticorrelated by construction and
            say nothing about redundancy between variables.

    Returns:
        The mean of ``|corr[i, j]|`` over the pairs of columns in different blocks.
    """
    stats = z if isinstance(z, Moments) else moments(z)
    n, d = stats.n, stats.dim
    if n < 2 or d < 2:
        raise DataError(f"correlation needs at least 2 samples and 2 columns, got shape {(n, d)}")
    if block < 1 or d % block or d // block < 2:
        raise DataError(f"{d} columns do not make at least 2 blocks of {block}")
    owner = torch.arange(d) // block
    return float(stats.correlation().abs()[owner[:, None] != owner[None, :]].mean())


def effective_rank(z: ArrayLike | Moments, eps: float = RANKME_EPS) -> float:
    """RankMe effective rank (Garrido et al. 2023).

    ``exp(-sum_k p_k log p_k)`` with ``p_k = sigma_k / sum(sigma) + eps`` over the
    min(N, D) singular values of ``z`` (not centred, as in the paper). Between 1 (rank
    one) and min(N, D) (all singular values equal). The singular values are the square
    roots of the eigenvalues of ``zᵀz``, summed in chunks (:class:`Moments`); their
    rounding error is about ``1e-8 sigma_max``, a tenth of ``eps``.

    Args:
        z: (N, D) embeddings, or their :class:`Moments`.
        eps: added to the normalised singular values (the paper's 1e-7).

    Returns:
        The effective rank as a float.
    """
    stats = z if isinstance(z, Moments) else moments(z)
    if stats.n == 0 or stats.dim == 0:
        raise DataError(f"effective rank needs a non-empty matrix, got shape {(stats.n, stats.dim)}")
    eigenvalues = torch.linalg.eigvalsh(stats.gram()).flip(0)[: min(stats.n, stats.dim)]
    sigma = eigenvalues.clamp_min(0).sqrt()
    total = sigma.sum()
    if total <= 0:
        return 0.0
    p = sigma / total + eps
    return float(torch.exp(-(p * p.log()).sum()))


# --------------------------------------------------------------------------- IMSVD codes


def _as_codes(codes: ArrayLike) -> torch.Tensor:
    """Soft codes as a (N, B, bin) float64 tensor."""
    p = _as_float(codes, "codes", 3).double()
    if p.shape[0] == 0 or p.shape[2] < 2:
        raise DataError(f"codes must be (N, B, bin) with N >= 1 and bin >= 2, got {tuple(p.shape)}")
    return p


class CodeStatistics:
    """What the code metrics and pictures need of N soft codes, summed chunk by chunk:
    the per-block marginals, the argmax counts, and the :class:`Moments` of the flattened
    codes (whose Gram matrix over N is the joint matrix P). Memory ``O(D²)``, not ``O(N)``."""

    def __init__(self, blocks: int, bins: int) -> None:
        self.n = 0
        self.marginal_sum = torch.zeros(blocks, bins, dtype=torch.float64)
        self.argmax_counts = torch.zeros(blocks, bins, dtype=torch.float64)
        self.moments = Moments(blocks * bins)

    def add(self, codes: torch.Tensor) -> None:
        """Add (rows, B, bin) soft codes."""
        p = codes.double()
        self.n += len(p)
        self.marginal_sum += p.sum(0)
        self.argmax_counts.scatter_add_(1, p.argmax(2).T, torch.ones(p.shape[1], len(p), dtype=torch.float64))
        self.moments.add(p.reshape(len(p), -1))

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.n, *self.marginal_sum.shape)

    def marginals(self) -> np.ndarray:
        """(B, bin): :func:`block_marginals`."""
        return (self.marginal_sum / self.marginal_sum.sum(1, keepdim=True)).numpy()

    def occupancy(self) -> np.ndarray:
        """(B, bin): :func:`bin_occupancy`."""
        return (self.argmax_counts / self.n).numpy()

    def joint(self) -> np.ndarray:
        """(D, D) ``P = pᵀp / N`` of the flattened codes (the two views being the same)."""
        return (self.moments.gram() / self.n).numpy()


def code_statistics(
    z: ArrayLike, codes_of: Callable[[torch.Tensor], torch.Tensor], name: str = "z"
) -> CodeStatistics:
    """:class:`CodeStatistics` of ``codes_of(chunk)`` ((rows, B, bin) soft codes) over the
    rows of ``z``, read in chunks of :data:`MOMENT_BYTES` of codes."""
    if _rows(z, name)[0] == 0:
        raise DataError(f"{name} has no rows: code statistics need at least one")
    out: CodeStatistics | None = None
    for chunk in _row_chunks(z, name):
        codes = codes_of(chunk)
        if out is None:
            out = CodeStatistics(codes.shape[1], codes.shape[2])
        out.add(codes)
    assert out is not None
    return out


def block_marginals(codes: ArrayLike) -> np.ndarray:
    """Mean soft code per block: how much probability each bin receives overall.

    Args:
        codes: (N, B, bin) soft codes, each (sample, block) row summing to 1.

    Returns:
        (B, bin) float64 array, each row summing to 1.
    """
    p = _as_codes(codes).mean(0)
    return (p / p.sum(1, keepdim=True)).numpy()


def bin_occupancy(codes: ArrayLike) -> np.ndarray:
    """Share of samples whose most probable bin (argmax) is each bin, per block.

    Args:
        codes: (N, B, bin) soft codes (or logits: only the argmax matters).

    Returns:
        (B, bin) float64 array, each row summing to 1.
    """
    p = _as_codes(codes)
    n, blocks, bins = p.shape
    hits = F.one_hot(p.argmax(2), bins).double()
    return (hits.sum(0) / n).numpy()


def bin_usage(
    codes: ArrayLike | CodeStatistics, dead_fraction: float = DEAD_BIN_FRACTION
) -> dict[str, float]:
    """How evenly the bins of each block are used by a set of soft codes.

    Dead bins are defined on the marginal, not on the argmax: a bin is dead when its
    marginal mass (mean soft probability over samples) is below ``dead_fraction / bin``,
    that is under a thousandth of its uniform share. The marginal is the quantity the
    IMSVD diagonal term maximises the entropy of, and unlike an argmax count it is not
    distorted by ties (a uniform soft code has no meaningful argmax). The argmax view is
    kept in ``collapsed_block_share`` and ``bin_occupancy``.

    Args:
        codes: (N, B, bin) soft codes, each (sample, block) row summing to 1, or their
            :class:`CodeStatistics`.
        dead_fraction: dead threshold as a fraction of the uniform share 1/bin.

    Returns:
        ``entropy``: mean over blocks of the entropy (nats) of the block's marginal;
        ``normalized_entropy``: the same divided by log(bin), in [0, 1];
        ``dead_share``: share of the B*bin bins that are dead;
        ``collapsed_block_share``: share of blocks whose argmax bin is the same for
        every sample (1.0 means the discrete code is constant).
    """
    if isinstance(codes, CodeStatistics):
        marginal, occupancy = torch.from_numpy(codes.marginals()), torch.from_numpy(codes.occupancy())
    else:
        p = _as_codes(codes)
        marginal, occupancy = torch.from_numpy(block_marginals(p)), torch.from_numpy(bin_occupancy(p))
    bins = marginal.shape[1]
    entropy = -(marginal * marginal.clamp_min(1e-300).log()).sum(1)
    return {
        "entropy": float(entropy.mean()),
        "normalized_entropy": float(entropy.mean() / math.log(bins)),
        "dead_share": float((marginal < dead_fraction / bins).double().mean()),
        "collapsed_block_share": float((occupancy.max(1).values >= 1.0).double().mean()),
    }


def off_block_mutual_information(
    joint: ArrayLike, bin_size: int, max_pairs: int | None = 10_000, seed: int = 0
) -> float:
    """Mean mutual information between distinct blocks, from the joint matrix P.

    For blocks a != b, ``P_ab`` is the (bin, bin) sub-matrix of P at rows of block a and
    columns of block b, renormalised to sum 1 (it does already when P comes from soft
    codes); its marginals are its row and column sums. The MI of the pair is
    ``sum P_ab log(P_ab / (p_a p_b))`` with 0 log 0 = 0. Ordered pairs are used, since P
    from two views need not be symmetric. When B(B-1) exceeds ``max_pairs``, the mean is
    taken over ``max_pairs`` distinct pairs drawn with a ``seed``-ed generator (the same
    pairs for the same B, so runs stay comparable); otherwise over all pairs.

    Args:
        joint: (D, D) joint matrix, ``P = p1^T p2 / N`` of flattened soft codes.
        bin_size: bins per block; must divide D.
        max_pairs: most pairs to average over; None for all.
        seed: picks the subset of pairs.

    Returns:
        Mean MI in nats: 0 for independent blocks, log(bin) for identical one-hot blocks
        with all bins used equally.

    Raises:
        DataError: P is not square or bin_size does not divide D.
        ConfigError: fewer than 2 blocks, or max_pairs < 1.
    """
    p = _as_float(joint, "joint", 2).double()
    d = p.shape[0]
    if p.shape[1] != d:
        raise DataError(f"joint must be square, got shape {tuple(p.shape)}")
    if bin_size < 1 or d % bin_size:
        raise DataError(f"bin_size {bin_size} must divide the joint size {d}")
    blocks = d // bin_size
    if blocks < 2:
        raise ConfigError(f"mutual information between blocks needs at least 2 blocks, got {blocks}")
    if max_pairs is not None and max_pairs < 1:
        raise ConfigError(f"max_pairs must be >= 1 or None, got {max_pairs}")

    grid = p.reshape(blocks, bin_size, blocks, bin_size).permute(0, 2, 1, 3)  # (B, B, bin, bin)
    a, b = torch.triu_indices(blocks, blocks, offset=1)
    a, b = torch.cat([a, b]), torch.cat([b, a])  # all ordered pairs a != b
    if max_pairs is not None and len(a) > max_pairs:
        pick = torch.randperm(len(a), generator=torch.Generator().manual_seed(seed))[:max_pairs]
        a, b = a[pick], b[pick]
    pab = grid[a, b].clamp_min(0)
    pab = pab / pab.sum((1, 2), keepdim=True).clamp_min(1e-300)
    pa = pab.sum(2, keepdim=True)
    pb = pab.sum(1, keepdim=True)
    ratio = pab / (pa * pb).clamp_min(1e-300)
    terms = torch.where(pab > 0, pab * ratio.clamp_min(1e-300).log(), torch.zeros_like(pab))
    return float(terms.sum((1, 2)).mean())


# --------------------------------------------------------------------------- discrete code


def discrete_code(z: ArrayLike, bin_size: int) -> np.ndarray:
    """The discrete IMSVD code: the most probable bin of each block.

    Softmax is monotone, so the argmax of the projector output equals that of its soft
    codes; either may be passed.

    Args:
        z: (N, D) projector output or flattened soft codes, or (N, B, bin) soft codes.
        bin_size: bins per block; must divide D.

    Returns:
        (N, B) array of bin indices in [0, bin_size): uint8 up to 256 bins (160,000 codes
        of 64 blocks take 10 MB, not 82 MB as int64), else int64.
    """
    shape = tuple(z.shape)
    if len(shape) == 2:
        if bin_size < 1 or shape[1] % bin_size:
            raise DataError(f"bin_size {bin_size} must divide the code size {shape[1]}")
    elif len(shape) != 3 or shape[2] != bin_size:
        raise DataError(f"z must be (N, D) or (N, B, {bin_size}), got shape {shape}")
    blocks = math.prod(shape[1:]) // bin_size
    out = np.empty((shape[0], blocks), dtype=np.uint8 if bin_size <= 256 else np.int64)
    rows = max(1, MOMENT_BYTES // max(1, 8 * blocks * bin_size))  # a memory map is read in chunks
    for i in range(0, shape[0], rows):
        chunk = _as_float(read_rows(z, slice(i, i + rows)), "z", len(shape))
        out[i : i + len(chunk)] = chunk.reshape(len(chunk), blocks, bin_size).argmax(2).numpy()
    return out


def code_bits(num_blocks: int, bin_size: int) -> float:
    """Information capacity of the discrete code: ``num_blocks * log2(bin_size)`` bits."""
    if num_blocks < 1 or bin_size < 1:
        raise ConfigError(f"num_blocks and bin_size must be >= 1, got {num_blocks}, {bin_size}")
    return float(num_blocks * math.log2(bin_size))


def code_knn_scores(
    train_codes: ArrayLike,
    train_labels: ArrayLike,
    test_codes: ArrayLike,
    bin_size: int,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
    train_chunk_size: int = 65_536,
) -> torch.Tensor:
    """Class scores of a weighted kNN that sees only the discrete code.

    Similarity is the number of blocks whose bin agrees (a Hamming-style agreement count),
    computed as a product of one-hot codes; each of the ``k`` most similar training
    samples votes ``exp(agreement / B / temperature)`` for its class.

    Args:
        train_codes: (N_train, B) int bin indices (``discrete_code``).
        train_labels: (N_train,) class indices.
        test_codes: (M, B) int bin indices.
        bin_size: bins per block (codes lie in [0, bin_size)).
        k: neighbours; clipped to N_train.
        temperature: vote temperature (> 0).
        num_classes: C; by default ``max(train_labels) + 1``.
        chunk_size: test rows per similarity block.
        train_chunk_size: training rows per similarity block (memory
            O(chunk_size * train_chunk_size), as in :func:`knn_scores`).

    Returns:
        (M, C) float tensor of summed votes.
    """
    # As given (discrete_code's uint8): a block at a time is widened, not every row.
    train = torch.as_tensor(np.asarray(train_codes))
    test = torch.as_tensor(np.asarray(test_codes))
    if train.ndim != 2 or test.ndim != 2 or train.shape[1] != test.shape[1]:
        raise DataError(
            f"codes must be (N, B) with the same B, got {tuple(train.shape)} and {tuple(test.shape)}"
        )
    if train.shape[0] == 0:
        raise DataError("kNN needs at least one training sample")
    for name, c in (("train_codes", train), ("test_codes", test)):
        if c.numel() and (int(c.min()) < 0 or int(c.max()) >= bin_size):
            raise DataError(f"{name} must lie in [0, {bin_size})")
    labels = _as_labels(train_labels, "train_labels", train.shape[0])
    check_positive(k, "k")
    check_positive(temperature, "temperature")
    check_positive(chunk_size, "chunk_size")
    check_positive(train_chunk_size, "train_chunk_size")
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    blocks = train.shape[1]
    k = min(k, train.shape[0])
    offsets = torch.arange(blocks) * bin_size
    # Blocks capped in bytes as knn_scores' are: 65,536 one-hot rows of 64 blocks of 16 bins
    # were 268 MB, and as many similarities to 1,024 test rows 268 MB more.
    train_chunk_size = _capped_train_rows(
        train_chunk_size, blocks * bin_size * 4, chunk_size, test.shape[0], 4
    )

    def one_hot(codes: torch.Tensor) -> torch.Tensor:
        # Straight into float32: F.one_hot makes an int64 (rows, B, bins) tensor first,
        # twice the float copy.
        out = torch.zeros(codes.shape[0], blocks * bin_size)
        return out.scatter_(1, codes.long() + offsets, 1.0)

    def train_block(start: int) -> torch.Tensor:
        return one_hot(train[start : start + train_chunk_size])

    # Similarity: the number of agreeing blocks, exact in float32; a temperature
    # scaled by B makes each vote exp(agreement / B / temperature).
    queries = (one_hot(chunk) for chunk in test.split(chunk_size))
    return _streamed_vote(
        queries,
        train.shape[0],
        train_block,
        train_chunk_size,
        labels,
        [(k, temperature * blocks)],
        num_classes,
    )[0]


def code_knn_accuracy(
    train_codes: ArrayLike,
    train_labels: ArrayLike,
    test_codes: ArrayLike,
    test_labels: ArrayLike,
    bin_size: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> float:
    """Top-1 accuracy in [0, 1] of the discrete-code kNN (see ``code_knn_scores``)."""
    y_test = torch.as_tensor(test_labels)
    y_train = torch.as_tensor(train_labels)
    num_classes = int(max(int(y_train.max()), int(y_test.max()))) + 1
    scores = code_knn_scores(
        train_codes, y_train, test_codes, bin_size, k, temperature, num_classes, chunk_size
    )
    return topk_accuracy(scores, y_test, (1,))[1]


# --------------------------------------------------------------------------- collapse


def collapse_report(
    effective_rank: float,
    dim: int,
    bin_usage: dict[str, float] | None = None,
    ratio: float = 0.05,
) -> dict[str, bool | float | str]:
    """Flag a collapsed representation.

    Collapsed when the effective rank is below ``ratio * dim`` (dimensional collapse), or
    when every block puts all samples in one bin (``bin_usage["collapsed_block_share"]``
    is 1: the discrete code is the same for every image).

    Args:
        effective_rank: RankMe of the embeddings (``effective_rank``).
        dim: D, the embedding size.
        bin_usage: the dict of ``bin_usage`` for IMSVD codes; None for other methods.
        ratio: share of D under which the rank counts as collapsed (``evaluate.collapse_rank_ratio``).

    Returns:
        ``collapsed`` (bool), ``reason`` (str, empty when not collapsed),
        ``effective_rank`` and ``rank_threshold`` (floats).
    """
    if dim < 1:
        raise ConfigError(f"dim must be >= 1, got {dim}")
    if not 0 <= ratio <= 1:
        raise ConfigError(f"ratio must be in [0, 1], got {ratio}")
    threshold = ratio * dim
    reasons = []
    if effective_rank < threshold:
        reasons.append(
            f"effective rank {effective_rank:.2f} < {ratio:g} x D = {threshold:.2f} (dimensional collapse)"
        )
    if bin_usage is not None and bin_usage.get("collapsed_block_share", 0.0) >= 1.0:
        reasons.append("every block puts all samples in one bin (constant discrete code)")
    return {
        "collapsed": bool(reasons),
        "reason": "; ".join(reasons),
        "effective_rank": float(effective_rank),
        "rank_threshold": float(threshold),
    }
