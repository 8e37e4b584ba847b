"""Self-supervised losses: IMSVD and the baselines it is compared with.

Every loss is a pure function of two batches of embeddings ``z1, z2: (N, D)`` (the two
views of the same N images) and returns a ``NamedTuple`` whose first field is ``total``.
No function here talks to a process group: in multi-device training the caller gathers
the embeddings of all ranks (with gradients) and calls the loss on the full batch.

References:
    - IMSVD: C. Niu, W. Xia, H. Shan, G. Wang, "Information-Maximized Soft Variable
      Discretization for Self-Supervised Image Representation Learning",
      arXiv:2501.03469, 2025.
    - Barlow Twins: J. Zbontar, L. Jing, I. Misra, Y. LeCun, S. Deny, "Barlow Twins:
      Self-Supervised Learning via Redundancy Reduction", ICML 2021.
    - VICReg: A. Bardes, J. Ponce, Y. LeCun, "VICReg: Variance-Invariance-Covariance
      Regularization for Self-Supervised Learning", ICLR 2022.
    - SimCLR: T. Chen, S. Kornblith, M. Norouzi, G. Hinton, "A Simple Framework for
      Contrastive Learning of Visual Representations", ICML 2020.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, TypeVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from imsvd.config import PretrainConfig
from imsvd.errors import ConfigError, check_positive

#: Lower bound of every soft-code probability, so that ``log P`` is always finite.
PROB_FLOOR = 1e-8

#: Elements of one row slab of the D x D joint distribution held at a time: 16 MiB in
#: float32 on CPU, where smaller slabs cost no speed and save memory; 256 MiB on
#: accelerators, where few large products run fastest (measured on an H100 at
#: N=256, D=8160, bin 80: one slab 3.1 ms, 64 MiB slabs 3.3 ms, 16 MiB slabs 4.2 ms).
_SLAB_ELEMENTS_CPU = 1 << 22
_SLAB_ELEMENTS_ACCELERATOR = 1 << 26

_HALF_DTYPES = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- checks


def _check_views(z1: Tensor, z2: Tensor, names: tuple[str, str] = ("z1", "z2")) -> None:
    """Raise ``ValueError`` unless ``z1`` and ``z2`` are two (N, D) batches with N >= 2."""
    for name, z in zip(names, (z1, z2), strict=True):
        if not isinstance(z, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(z).__name__}")
        if z.dim() != 2:
            raise ValueError(f"{name} must be 2-D (N, D), got shape {tuple(z.shape)}")
        if not z.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {z.dtype}")
    if z1.shape != z2.shape:
        raise ValueError(
            f"{names[0]} and {names[1]} must have the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}"
        )
    if z1.shape[0] < 2:
        raise ValueError(
            f"{names[0]} and {names[1]} need a batch of at least 2 samples, got N={z1.shape[0]}: "
            "batch statistics (a joint distribution, a variance, a correlation) cannot be "
            "estimated from one sample"
        )
    if z1.shape[1] < 1:
        raise ValueError(f"{names[0]} must have at least one feature, got D=0")


def _check_bins(dim: int, bin_size: int, name: str = "z") -> int:
    """Return the number of blocks B = dim // bin_size, raising ``ConfigError`` if invalid."""
    if isinstance(bin_size, bool) or not isinstance(bin_size, int):
        raise ConfigError(f"bin_size must be an integer, got {bin_size!r}")
    if bin_size < 2:
        raise ConfigError(
            f"bin_size must be at least 2 (a one-state variable carries no information), got {bin_size}"
        )
    if dim % bin_size != 0:
        raise ConfigError(f"bin_size ({bin_size}) must divide the feature size of {name} (D={dim})")
    blocks = dim // bin_size
    if blocks < 2:
        raise ConfigError(
            f"bin_size ({bin_size}) must leave at least 2 blocks in {name} (D={dim}): "
            "the off-block term needs two variables"
        )
    return blocks


def _as_float32_at_least(z: Tensor) -> Tensor:
    """Upcast half-precision inputs (autocast output) to float32; keep float32/float64."""
    return z.float() if z.dtype in _HALF_DTYPES else z


# --------------------------------------------------------------------------- IMSVD


def soft_discretize(z: Tensor, bin_size: int, temperature: float = 1.0) -> Tensor:
    """Turn each block of ``bin_size`` units into a soft discrete variable.

    Every consecutive block of ``bin_size`` units is one variable; its states are the
    softmax of the block divided by ``temperature``, clamped below at ``PROB_FLOOR``
    (Niu et al., 2025, soft variable discretization).

    Args:
        z: embeddings, (N, D), D divisible by ``bin_size``.
        bin_size: units (states) per variable.
        temperature: softmax temperature, > 0.

    Returns:
        Soft codes, (N, D // bin_size, bin_size); each row of the last axis sums to 1
        (up to the floor).

    Raises:
        ValueError: if ``z`` is not 2-D.
        ConfigError: on a bad ``bin_size`` or ``temperature``.
    """
    if not isinstance(z, Tensor) or z.dim() != 2:
        shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
        raise ValueError(f"z must be a 2-D tensor (N, D), got {shape}")
    blocks = _check_bins(z.shape[1], bin_size)
    check_positive(temperature, "temperature")
    logits = z.reshape(z.shape[0], blocks, bin_size)
    if temperature != 1.0:
        logits = logits / temperature
    return torch.softmax(logits, dim=-1).clamp(min=PROB_FLOOR)


def joint_distribution(p1: Tensor, p2: Tensor) -> Tensor:
    """Empirical joint distribution of the soft codes of two views.

    ``P = p1ᵀ p2 / N``; the (a, b) block of size bin x bin is the joint distribution of
    variable a of view 1 and variable b of view 2, so every block sums to 1 (up to the
    1e-8 floor): the B diagonal blocks together sum to B, the whole matrix to B².

    Args:
        p1: flattened soft codes of view 1, (N, D).
        p2: flattened soft codes of view 2, (N, D).

    Returns:
        P, (D, D).

    Raises:
        ValueError: on shapes that are not two equal (N, D) with N >= 2.
    """
    _check_views(p1, p2, ("p1", "p2"))
    return p1.transpose(0, 1) @ p2 / p1.shape[0]


def _zero_diagonal_blocks(rows: Tensor, first_block: int, bin_size: int) -> None:
    """Zero, in place, the diagonal blocks of a row slab of a block matrix.

    ``rows`` is (k * bin_size, B * bin_size) and holds block rows ``first_block`` to
    ``first_block + k - 1``; block (first_block + j, first_block + j) is zeroed for each j.
    """
    k = rows.shape[0] // bin_size
    blocks = rows.shape[1] // bin_size
    grid = rows.view(k, bin_size, blocks, bin_size)
    grid.diagonal(offset=first_block, dim1=0, dim2=2).zero_()


def _chunk_blocks(bin_size: int, dim: int, device: torch.device) -> int:
    """Block rows per slab so that a slab holds about the device's slab budget."""
    budget = _SLAB_ELEMENTS_CPU if device.type == "cpu" else _SLAB_ELEMENTS_ACCELERATOR
    return max(1, budget // (bin_size * dim))


@contextlib.contextmanager
def _gradient_matmul_precision(device: torch.device) -> Iterator[None]:
    """On CUDA, the two gradient products (and the value read off the first) run on the
    TF32 tensor cores, as PyTorch already does for convolutions by default: relative error
    about 1e-3 in dS/dp, against a few times faster products on Hopper. P itself and its
    log stay in full float32; CPU arithmetic is unchanged."""
    if device.type != "cuda":
        yield
        return
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _off_block_sums(p: Tensor, bin_size: int) -> Tensor:
    """For each unit i, the sum of ``p`` over the units outside the block of i: (N, D) -> (N, D).

    This is ``p J`` for the symmetric 0/1 matrix J that is 1 exactly on the off-diagonal
    blocks, computed in O(N D) instead of as a product with a D x D matrix.
    """
    n, dim = p.shape
    block_sums = p.view(n, dim // bin_size, bin_size).sum(dim=-1, keepdim=True)  # (N, B, 1)
    outside = p.sum(dim=1).view(n, 1, 1) - block_sums
    return outside.expand(n, dim // bin_size, bin_size).reshape(n, dim)


class _OffBlockNegEntropy(torch.autograd.Function):
    """S = Σ P log P over the off-diagonal blocks of P = p1ᵀ p2 / N, in row slabs.

    P is built one slab of block rows at a time into one buffer (at most the device's
    slab budget, so P is held whole only when it fits that budget), and ``L = log P``
    (zero on the diagonal blocks, which are in no term) overwrites it. The output is a scalar, so its gradient is ``grad_out`` times a gradient that does
    not depend on ``grad_out``; that one is accumulated in the forward pass while the
    slab is in memory. With ``G = dS/dP = L + J`` (J: ones on the off-diagonal blocks),
    ``dS/dp1 = p2 Gᵀ / N`` and ``dS/dp2 = p1 G / N``; the J parts are block sums
    (``_off_block_sums``). The value itself comes from the first product:
    ``S = Σ_{n,i} p1_ni (L p2ᵀ)_in / N``, so no elementwise pass over P besides the log.
    Backward only scales the two saved (N, D) results.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, p1: Tensor, p2: Tensor, bin_size: int, chunk_blocks: int, with_grad: bool
    ) -> Tensor:
        n, dim = p1.shape
        blocks = dim // bin_size
        p1t = p1.transpose(0, 1).div(n).contiguous()  # (D, N) = p1ᵀ / N; a slab of P is a row slice
        slab = torch.empty((min(blocks, chunk_blocks) * bin_size, dim), dtype=p1.dtype, device=p1.device)
        total = torch.zeros((), dtype=p1.dtype, device=p1.device)
        # grad_p1t holds L p2ᵀ, (D, N): transposed so that each slab writes whole rows.
        grad_p1t = torch.empty_like(p1t) if with_grad else None
        grad_p2 = torch.empty_like(p2) if with_grad else None
        for first in range(0, blocks, chunk_blocks):
            last = min(blocks, first + chunk_blocks)
            rows = slice(first * bin_size, last * bin_size)
            joint = torch.matmul(p1t[rows], p2, out=slab[: rows.stop - rows.start])
            if grad_p1t is None or grad_p2 is None:
                log_joint = torch.log(joint)
                _zero_diagonal_blocks(log_joint, first, bin_size)
                total += torch.dot(joint.view(-1), log_joint.view(-1))
                continue
            log_joint = joint.log_()
            _zero_diagonal_blocks(log_joint, first, bin_size)
            with _gradient_matmul_precision(p1.device):
                slab_grad_p1t = torch.matmul(log_joint, p2.transpose(0, 1), out=grad_p1t[rows])
                if first == 0:
                    torch.matmul(p1t[rows].transpose(0, 1), log_joint, out=grad_p2)
                else:
                    grad_p2.addmm_(p1t[rows].transpose(0, 1), log_joint)
            total += torch.dot(p1t[rows].reshape(-1), slab_grad_p1t.reshape(-1))
        if grad_p1t is not None and grad_p2 is not None:
            grad_p1 = (grad_p1t.transpose(0, 1) + _off_block_sums(p2, bin_size)).div_(n)
            grad_p2 += _off_block_sums(p1, bin_size).div_(n)  # p1t already carries 1 / N
            ctx.save_for_backward(grad_p1, grad_p2)
        ctx.with_grad = with_grad
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        if not ctx.with_grad:  # pragma: no cover - autograd only calls backward when recorded
            raise RuntimeError("off_block_neg_entropy was computed without gradient bookkeeping")
        grad_p1, grad_p2 = ctx.saved_tensors
        return grad_p1 * grad_out, grad_p2 * grad_out, None, None, None


def off_block_neg_entropy(p1: Tensor, p2: Tensor, bin_size: int, chunk_blocks: int | None = None) -> Tensor:
    """Σ P log P over the off-diagonal blocks of the joint distribution P = p1ᵀ p2 / N.

    Equal to gathering every block (a, b) with a != b of P and summing ``x log x``, but
    computed in row slabs with the gradient accumulated during the forward pass, so time
    and peak memory stay far below the plain autograd form: P is only ever held one slab
    of block rows at a time (the slab budget is 16 MiB on CPU, 256 MiB on accelerators),
    and nothing of size D x D is kept for backward. When a gradient will be taken (grad
    mode on, an input requiring grad) the forward pass does the three products of
    forward and backward, and backward only scales; under ``torch.no_grad`` it does one
    product. Not normalised: ``imsvd_loss`` divides by B (B - 1). Differentiable once
    (no double backward). Half-precision inputs are upcast to float32.

    Args:
        p1: flattened soft codes of view 1, (N, D), entries > 0.
        p2: flattened soft codes of view 2, (N, D), entries > 0.
        bin_size: units per variable (block side).
        chunk_blocks: block rows per slab; default keeps a slab near 16 MiB (CPU) or
            256 MiB (accelerator) in float32.

    Returns:
        Scalar tensor (the negative off-block entropy, un-normalised).

    Raises:
        ValueError: on bad shapes; ConfigError on a bad ``bin_size`` or ``chunk_blocks``.
    """
    _check_views(p1, p2, ("p1", "p2"))
    _check_bins(p1.shape[1], bin_size, "p1")
    if chunk_blocks is None:
        chunk_blocks = _chunk_blocks(bin_size, p1.shape[1], p1.device)
    elif isinstance(chunk_blocks, bool) or not isinstance(chunk_blocks, int) or chunk_blocks < 1:
        raise ConfigError(f"chunk_blocks must be a positive integer, got {chunk_blocks!r}")
    p1, p2 = _as_float32_at_least(p1), _as_float32_at_least(p2)
    if p1.dtype != p2.dtype:
        raise ValueError(f"p1 and p2 must share a dtype, got {p1.dtype} and {p2.dtype}")
    with_grad = torch.is_grad_enabled() and (p1.requires_grad or p2.requires_grad)
    with torch.autocast(device_type=p1.device.type, enabled=False):
        return _OffBlockNegEntropy.apply(p1.contiguous(), p2.contiguous(), bin_size, chunk_blocks, with_grad)


class IMSVDLoss(NamedTuple):
    """The IMSVD loss and its three terms (each already multiplied by its coefficient)."""

    total: Tensor
    diagonal: Tensor
    off_block: Tensor
    invariance: Tensor


def imsvd_loss(
    z1: Tensor,
    z2: Tensor,
    bin_size: int,
    temperature: float = 1.0,
    diagonal_coeff: float = 1.0,
    off_block_coeff: float = 1.0,
    invariance_coeff: float = 1.0,
) -> IMSVDLoss:
    """IMSVD loss (Niu et al., 2025, arXiv:2501.03469).

    Each block of ``bin_size`` units is a soft discrete variable, ``p = softmax(z / t)``
    per block, floored at 1e-8; B = D / bin_size. With ``P = p1ᵀ p2 / N`` (D x D):

    - ``diagonal = diagonal_coeff * Σ_i P_ii log P_ii / B``
    - ``off_block = off_block_coeff * Σ_{a != b} Σ_{(i, j) in block (a, b)} P_ij log P_ij / (B (B - 1))``
      (entries of the diagonal blocks off the diagonal are in no term)
    - ``invariance = -invariance_coeff * mean_{n, blocks} log Σ_k p1_nk p2_nk``
    - ``total = diagonal + off_block + invariance``

    The loss is computed in float32 (float64 stays float64) even when the embeddings
    arrive in bf16/fp16 under autocast.

    Args:
        z1: embeddings of view 1, (N, D), N >= 2.
        z2: embeddings of view 2, (N, D).
        bin_size: units per variable; must divide D and leave at least 2 blocks.
        temperature: softmax temperature, > 0.
        diagonal_coeff: weight of the diagonal term.
        off_block_coeff: weight of the off-block term.
        invariance_coeff: weight of the invariance term.

    Returns:
        ``IMSVDLoss(total, diagonal, off_block, invariance)``, scalar tensors.

    Raises:
        ValueError: on shapes that are not two equal (N, D) batches with N >= 2.
        ConfigError: on a bad ``bin_size`` or ``temperature``.
    """
    _check_views(z1, z2)
    blocks = _check_bins(z1.shape[1], bin_size, "z1")
    check_positive(temperature, "temperature")
    z1, z2 = _as_float32_at_least(z1), _as_float32_at_least(z2)
    if z1.dtype != z2.dtype:
        common = torch.promote_types(z1.dtype, z2.dtype)
        z1, z2 = z1.to(common), z2.to(common)
    n = z1.shape[0]
    with torch.autocast(device_type=z1.device.type, enabled=False):
        p1 = soft_discretize(z1, bin_size, temperature)
        p2 = soft_discretize(z2, bin_size, temperature)
        # The large products first, so that an accelerator is busy while the small terms
        # below are queued.
        off_block = off_block_neg_entropy(p1.reshape(n, -1), p2.reshape(n, -1), bin_size)
        off_block = off_block / (blocks * (blocks - 1))
        agreement = p1 * p2  # (N, B, bin)
        joint_diagonal = agreement.sum(dim=0).reshape(-1) / n  # P_ii, (D,)
        diagonal = torch.sum(joint_diagonal * torch.log(joint_diagonal)) / blocks
        invariance = -torch.log(agreement.sum(dim=-1)).mean()
    diagonal = diagonal_coeff * diagonal
    off_block = off_block_coeff * off_block
    invariance = invariance_coeff * invariance
    return IMSVDLoss(diagonal + off_block + invariance, diagonal, off_block, invariance)


# --------------------------------------------------------------------------- Barlow Twins


class BarlowTwinsLoss(NamedTuple):
    """Barlow Twins loss; ``off_diagonal`` is already multiplied by ``lambda_offdiag``."""

    total: Tensor
    on_diagonal: Tensor
    off_diagonal: Tensor


LossFn = TypeVar("LossFn", bound=Callable[..., NamedTuple])


def _outside_autocast(loss: LossFn) -> LossFn:
    """Run a loss with autocast off, so it is computed in float32 whatever the training
    precision. Upcasting the embeddings alone is not enough: under bf16/fp16 autocast
    every matmul inside (a cross-correlation, a covariance, a similarity matrix) would
    be cast back to half precision (``imsvd_loss`` turns autocast off itself)."""

    @functools.wraps(loss)
    def wrapped(z1: Tensor, *args: Any, **kwargs: Any) -> NamedTuple:
        with torch.autocast(device_type=z1.device.type, enabled=False):
            return loss(z1, *args, **kwargs)

    return cast(LossFn, wrapped)


def _standardize(z: Tensor) -> Tensor:
    """Zero-mean, unit-(biased)-std columns over the batch: (N, D) -> (N, D)."""
    return (z - z.mean(dim=0)) / z.std(dim=0, unbiased=False)


@_outside_autocast
def barlow_twins_loss(z1: Tensor, z2: Tensor, lambda_offdiag: float = 5e-3) -> BarlowTwinsLoss:
    """Barlow Twins loss (Zbontar et al., 2021).

    Columns are standardised over the batch with the biased (divide-by-N) standard
    deviation, as batch normalisation without affine parameters does in the released
    training code (read literally as PyTorch, the paper's pseudo-code ``z.std(0)`` would
    be the unbiased one; the difference is a factor (N - 1) / N on C). No epsilon is
    added: a constant column gives a non-finite loss, which training reports.
    ``C = z1ᵀ z2 / N``; loss ``Σ_i (1 - C_ii)² + λ Σ_{i != j} C_ij²``.

    Args:
        z1: embeddings of view 1, (N, D), N >= 2.
        z2: embeddings of view 2, (N, D).
        lambda_offdiag: weight λ of the redundancy-reduction term (paper: 5e-3).

    Returns:
        ``BarlowTwinsLoss(total, on_diagonal, off_diagonal)``, scalar tensors.

    Raises:
        ValueError: on bad shapes.
    """
    _check_views(z1, z2)
    z1, z2 = _as_float32_at_least(z1), _as_float32_at_least(z2)
    n = z1.shape[0]
    corr = _standardize(z1).transpose(0, 1) @ _standardize(z2) / n  # (D, D)
    diag = torch.diagonal(corr)
    on_diagonal = (1.0 - diag).pow(2).sum()
    off_diagonal = lambda_offdiag * (corr.pow(2).sum() - diag.pow(2).sum())
    return BarlowTwinsLoss(on_diagonal + off_diagonal, on_diagonal, off_diagonal)


# --------------------------------------------------------------------------- VICReg


class VICRegLoss(NamedTuple):
    """VICReg loss; each term is already multiplied by its coefficient."""

    total: Tensor
    invariance: Tensor
    variance: Tensor
    covariance: Tensor


def variance_term(z: Tensor, eps: float = 1e-4) -> Tensor:
    """VICReg hinge on the std of each column: mean_j max(0, 1 - sqrt(Var(z_j) + eps)).

    Args:
        z: (N, D); the variance is the unbiased one over the batch.
        eps: added to the variance for numerical stability.

    Returns:
        Scalar tensor.
    """
    std = torch.sqrt(z.var(dim=0) + eps)
    return F.relu(1.0 - std).mean()


def covariance_term(z: Tensor) -> Tensor:
    """VICReg decorrelation: Σ_{i != j} Cov(z)_ij² / D, unbiased covariance over the batch.

    Args:
        z: (N, D).

    Returns:
        Scalar tensor.
    """
    n, dim = z.shape
    centered = z - z.mean(dim=0)
    cov = centered.transpose(0, 1) @ centered / (n - 1)
    return (cov.pow(2).sum() - torch.diagonal(cov).pow(2).sum()) / dim


@_outside_autocast
def vicreg_loss(
    z1: Tensor,
    z2: Tensor,
    sim_coeff: float = 25.0,
    std_coeff: float = 25.0,
    cov_coeff: float = 1.0,
    eps: float = 1e-4,
) -> VICRegLoss:
    """VICReg loss (Bardes et al., 2022), defaults λ = μ = 25, ν = 1 as published.

    ``invariance = λ · mean_{n, j} (z1 - z2)²``;
    ``variance = μ · (v(z1) + v(z2)) / 2`` with ``v`` from ``variance_term``;
    ``covariance = ν · (c(z1) + c(z2))`` with ``c`` from ``covariance_term``.
    The variance term of the two branches is averaged and the covariance term summed, as
    in the released implementation the published coefficients were tuned with.

    Args:
        z1: embeddings of view 1, (N, D), N >= 2.
        z2: embeddings of view 2, (N, D).
        sim_coeff: λ, weight of the invariance (mean squared error) term.
        std_coeff: μ, weight of the variance term.
        cov_coeff: ν, weight of the covariance term.
        eps: added to the variance before the square root.

    Returns:
        ``VICRegLoss(total, invariance, variance, covariance)``, scalar tensors.

    Raises:
        ValueError: on bad shapes; ConfigError on a negative ``eps``.
    """
    _check_views(z1, z2)
    if not eps >= 0:
        raise ConfigError(f"eps must be >= 0, got {eps!r}")
    z1, z2 = _as_float32_at_least(z1), _as_float32_at_least(z2)
    invariance = sim_coeff * F.mse_loss(z1, z2)
    variance = std_coeff * 0.5 * (variance_term(z1, eps) + variance_term(z2, eps))
    covariance = cov_coeff * (covariance_term(z1) + covariance_term(z2))
    return VICRegLoss(invariance + variance + covariance, invariance, variance, covariance)


# --------------------------------------------------------------------------- SimCLR


class SimCLRLoss(NamedTuple):
    """SimCLR NT-Xent loss."""

    total: Tensor


@_outside_autocast
def simclr_loss(z1: Tensor, z2: Tensor, temperature: float = 0.5) -> SimCLRLoss:
    """NT-Xent loss of SimCLR (Chen et al., 2020) over the 2N samples of both views.

    With ``s_ij`` the cosine similarity of samples i and j of ``cat(z1, z2)`` (2N, D),
    the loss of sample i whose positive is j(i) (the other view of the same image) is
    ``-log exp(s_ij(i) / t) / Σ_{k != i} exp(s_ik / t)``; ``total`` is its mean over 2N.

    Args:
        z1: embeddings of view 1, (N, D), N >= 2.
        z2: embeddings of view 2, (N, D).
        temperature: t, > 0 (0.5 is the paper's CIFAR-10 setting).

    Returns:
        ``SimCLRLoss(total)``, a scalar tensor.

    Raises:
        ValueError: on bad shapes; ConfigError on a non-positive temperature.
    """
    _check_views(z1, z2)
    check_positive(temperature, "temperature")
    z1, z2 = _as_float32_at_least(z1), _as_float32_at_least(z2)
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)  # (2N, D)
    logits = z @ z.transpose(0, 1) / temperature  # (2N, 2N)
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return SimCLRLoss(F.cross_entropy(logits, positives))


# --------------------------------------------------------------------------- selection


LOSSES: dict[str, Callable[..., NamedTuple]] = {
    "imsvd": imsvd_loss,
    "barlow_twins": barlow_twins_loss,
    "vicreg": vicreg_loss,
    "simclr": simclr_loss,
}


def loss_for_method(cfg: PretrainConfig) -> Callable[[Tensor, Tensor], NamedTuple]:
    """The loss of ``cfg.method`` as a function of ``(z1, z2)``, with the keyword
    arguments of that method's own section (``cfg.imsvd``, ``cfg.vicreg`` ...).

    Raises:
        ConfigError: on an unknown method.
    """
    if cfg.method not in LOSSES:
        raise ConfigError(f"pretrain.method {cfg.method!r} has no loss; known: {', '.join(LOSSES)}")
    return functools.partial(LOSSES[cfg.method], **dataclasses.asdict(cfg.method_config))
