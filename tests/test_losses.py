"""Tests of ``imsvd.losses``: each loss against a plain transcription of its paper.

The transcriptions below are written term by term with Python loops over samples,
units and blocks, in float64, exactly as the formulas read in the papers; the library is
held to them on values and on gradients (``torch.autograd.grad``). Property tests cover
symmetry, collapse, the joint distribution, argument checks and mixed precision.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from imsvd.config import BarlowTwinsConfig, IMSVDConfig, PretrainConfig, SimCLRConfig, VICRegConfig
from imsvd.errors import ConfigError
from imsvd.losses import (
    BarlowTwinsLoss,
    IMSVDLoss,
    SimCLRLoss,
    VICRegLoss,
    barlow_twins_loss,
    imsvd_loss,
    joint_distribution,
    loss_for_method,
    off_block_neg_entropy,
    simclr_loss,
    soft_discretize,
    vicreg_loss,
)

F64 = torch.float64
CUDA = torch.cuda.is_available()


def _pair(n: int, d: int, seed: int = 0, dtype: torch.dtype = F64) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=gen, dtype=F64)
    z2 = z1 + 0.5 * torch.randn(n, d, generator=gen, dtype=F64)
    return z1.to(dtype).requires_grad_(True), z2.to(dtype).requires_grad_(True)


def _assert_same(actual: Tensor, expected: Tensor, z: tuple[Tensor, Tensor], tol: float = 1e-10) -> None:
    """Equal values and equal gradients with respect to both inputs."""
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)
    grads_actual = torch.autograd.grad(actual, z, retain_graph=True)
    grads_expected = torch.autograd.grad(expected, z, retain_graph=True)
    for g_a, g_e in zip(grads_actual, grads_expected, strict=True):
        torch.testing.assert_close(g_a, g_e, rtol=tol, atol=tol)


# --------------------------------------------------------------------------- transcriptions


def _transcribed_soft_codes(z: Tensor, bin_size: int, t: float) -> list[list[list[Tensor]]]:
    """p[n][a][k] = max(exp(z_{n, a*bin+k} / t) / Σ_k' exp(z_{n, a*bin+k'} / t), 1e-8)."""
    n_samples, dim = z.shape
    codes = []
    for n in range(n_samples):
        row = []
        for a in range(dim // bin_size):
            exps = [torch.exp(z[n, a * bin_size + k] / t) for k in range(bin_size)]
            norm = sum(exps)
            row.append([torch.clamp(e / norm, min=1e-8) for e in exps])
        codes.append(row)
    return codes


def transcribed_imsvd(
    z1: Tensor, z2: Tensor, bin_size: int, t: float, c_diag: float, c_off: float, c_inv: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """IMSVD (Niu et al., 2025) read literally: returns (total, diagonal, off_block, invariance)."""
    n_samples, dim = z1.shape
    blocks = dim // bin_size
    p1 = _transcribed_soft_codes(z1, bin_size, t)
    p2 = _transcribed_soft_codes(z2, bin_size, t)

    def joint(i: int, j: int) -> Tensor:
        a, k = divmod(i, bin_size)
        b, m = divmod(j, bin_size)
        return sum(p1[n][a][k] * p2[n][b][m] for n in range(n_samples)) / n_samples

    diagonal = sum(joint(i, i) * torch.log(joint(i, i)) for i in range(dim)) / blocks
    off_block = 0.0
    for i in range(dim):
        for j in range(dim):
            if i // bin_size != j // bin_size:
                off_block = off_block + joint(i, j) * torch.log(joint(i, j))
    off_block = off_block / (blocks * (blocks - 1))
    invariance = 0.0
    for n in range(n_samples):
        for a in range(blocks):
            invariance = invariance - torch.log(sum(p1[n][a][k] * p2[n][a][k] for k in range(bin_size)))
    invariance = invariance / (n_samples * blocks)
    terms = (c_diag * diagonal, c_off * off_block, c_inv * invariance)
    return (sum(terms), *terms)


def transcribed_barlow_twins(z1: Tensor, z2: Tensor, lam: float) -> Tensor:
    """Σ_i (1 - C_ii)² + λ Σ_{i≠j} C_ij², C from batch-standardised columns (biased std)."""
    n_samples, dim = z1.shape

    def standardised(z: Tensor) -> list[list[Tensor]]:
        cols = []
        for j in range(dim):
            mean = sum(z[n, j] for n in range(n_samples)) / n_samples
            var = sum((z[n, j] - mean) ** 2 for n in range(n_samples)) / n_samples
            cols.append([(z[n, j] - mean) / torch.sqrt(var) for n in range(n_samples)])
        return cols

    a, b = standardised(z1), standardised(z2)
    loss = 0.0
    for i in range(dim):
        for j in range(dim):
            c_ij = sum(a[i][n] * b[j][n] for n in range(n_samples)) / n_samples
            loss = loss + ((1 - c_ij) ** 2 if i == j else lam * c_ij**2)
    return loss


def transcribed_vicreg(z1: Tensor, z2: Tensor, lam: float, mu: float, nu: float, eps: float) -> Tensor:
    """λ s(Z, Z') + μ (v(Z) + v(Z')) / 2 + ν (c(Z) + c(Z')), Bardes et al. (2022)."""
    n_samples, dim = z1.shape
    s = sum((z1[n, j] - z2[n, j]) ** 2 for n in range(n_samples) for j in range(dim)) / (n_samples * dim)

    def mean(z: Tensor, j: int) -> Tensor:
        return sum(z[n, j] for n in range(n_samples)) / n_samples

    def cov(z: Tensor, i: int, j: int) -> Tensor:
        mi, mj = mean(z, i), mean(z, j)
        return sum((z[n, i] - mi) * (z[n, j] - mj) for n in range(n_samples)) / (n_samples - 1)

    def v(z: Tensor) -> Tensor:
        return sum(torch.clamp(1 - torch.sqrt(cov(z, j, j) + eps), min=0) for j in range(dim)) / dim

    def c(z: Tensor) -> Tensor:
        return sum(cov(z, i, j) ** 2 for i in range(dim) for j in range(dim) if i != j) / dim

    return lam * s + mu * (v(z1) + v(z2)) / 2 + nu * (c(z1) + c(z2))


def transcribed_nt_xent(z1: Tensor, z2: Tensor, t: float) -> Tensor:
    """Chen et al. (2020): mean over the 2N samples of -log(exp(s_i,pos/t) / Σ_{k≠i} exp(s_ik/t))."""
    n_samples, dim = z1.shape
    samples = [z1[n] for n in range(n_samples)] + [z2[n] for n in range(n_samples)]

    def sim(u: Tensor, w: Tensor) -> Tensor:
        dot = sum(u[j] * w[j] for j in range(dim))
        return dot / (
            torch.sqrt(sum(u[j] ** 2 for j in range(dim))) * torch.sqrt(sum(w[j] ** 2 for j in range(dim)))
        )

    loss = 0.0
    for i in range(2 * n_samples):
        positive = (i + n_samples) % (2 * n_samples)
        denom = sum(torch.exp(sim(samples[i], samples[k]) / t) for k in range(2 * n_samples) if k != i)
        loss = loss - torch.log(torch.exp(sim(samples[i], samples[positive]) / t) / denom)
    return loss / (2 * n_samples)


# --------------------------------------------------------------------------- IMSVD values and gradients

IMSVD_CASES = [
    # (N, D, bin_size, temperature, coeffs)
    (4, 12, 3, 1.0, (1.0, 1.0, 1.0)),
    (5, 16, 4, 0.7, (1.3, 0.6, 2.0)),
    (3, 20, 10, 2.5, (0.5, 3.0, 0.25)),
    (6, 15, 5, 0.3, (2.0, 1.5, 0.75)),
]


@pytest.mark.parametrize(("n", "d", "bin_size", "t", "coeffs"), IMSVD_CASES)
def test_imsvd_matches_transcription(n: int, d: int, bin_size: int, t: float, coeffs: tuple) -> None:
    z = _pair(n, d, seed=n * d)
    got = imsvd_loss(*z, bin_size, t, *coeffs)
    want = transcribed_imsvd(*z, bin_size, t, *coeffs)
    assert isinstance(got, IMSVDLoss)
    for actual, expected in zip(got, want, strict=True):
        _assert_same(actual, expected, z)


def _dense_imsvd_total(z1: Tensor, z2: Tensor, bin_size: int, t: float) -> Tensor:
    """Vectorised float64 form (full D x D P, masked blocks) for sizes the loops cannot reach."""
    n, d = z1.shape
    blocks = d // bin_size
    p1 = torch.softmax(z1.reshape(n, blocks, bin_size) / t, -1).clamp(min=1e-8).reshape(n, d)
    p2 = torch.softmax(z2.reshape(n, blocks, bin_size) / t, -1).clamp(min=1e-8).reshape(n, d)
    joint = p1.T @ p2 / n
    block_of = torch.arange(d) // bin_size
    off = block_of[:, None] != block_of[None, :]
    plogp = joint * torch.log(joint)
    diagonal = torch.diagonal(plogp).sum() / blocks
    off_block = plogp[off].sum() / (blocks * (blocks - 1))
    invariance = -torch.log((p1 * p2).reshape(n, blocks, bin_size).sum(-1)).mean()
    return diagonal + off_block + invariance


def test_imsvd_many_slabs_matches_dense_form() -> None:
    """A size with many slabs (uneven last slab) against the dense float64 form."""
    z = _pair(32, 7 * 24, seed=3)
    got = imsvd_loss(*z, bin_size=24, temperature=0.5).total
    _assert_same(got, _dense_imsvd_total(*z, 24, 0.5), z)


@pytest.mark.parametrize("chunk_blocks", [1, 2, 3, None])
def test_off_block_function_gradcheck(chunk_blocks: int | None) -> None:
    gen = torch.Generator().manual_seed(chunk_blocks or 0)
    n, blocks, bin_size = 5, 4, 3
    p1 = torch.softmax(torch.randn(n, blocks, bin_size, generator=gen, dtype=F64), -1).reshape(n, -1)
    p2 = torch.softmax(torch.randn(n, blocks, bin_size, generator=gen, dtype=F64), -1).reshape(n, -1)
    p1.requires_grad_(True)
    p2.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: off_block_neg_entropy(a, b, bin_size, chunk_blocks=chunk_blocks), (p1, p2)
    )
    # Only one input requiring a gradient, and no gradient at all: same value.
    with_grad = off_block_neg_entropy(p1, p2.detach(), bin_size, chunk_blocks)
    (grad,) = torch.autograd.grad(with_grad, p1)
    assert grad.shape == p1.shape
    with torch.no_grad():
        torch.testing.assert_close(off_block_neg_entropy(p1, p2, bin_size, chunk_blocks), with_grad.detach())


# --------------------------------------------------------------------------- IMSVD properties


def test_imsvd_symmetric_in_views() -> None:
    z1, z2 = _pair(8, 24, seed=1)
    forward = imsvd_loss(z1, z2, 6, 0.8, 1.2, 0.7, 1.5)
    swapped = imsvd_loss(z2, z1, 6, 0.8, 1.2, 0.7, 1.5)
    for a, b in zip(forward, swapped, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_imsvd_collapse_scores_worse() -> None:
    gen = torch.Generator().manual_seed(0)
    n, blocks, bin_size = 64, 8, 4
    states = torch.randint(bin_size, (n, blocks), generator=gen)
    informative = 8.0 * torch.nn.functional.one_hot(states, bin_size).reshape(n, -1).to(F64)
    collapsed = informative[:1].expand(n, -1)
    good = imsvd_loss(informative, informative, bin_size).total
    bad = imsvd_loss(collapsed, collapsed, bin_size).total
    assert bad > good + 1.0


def test_joint_distribution_blocks_are_distributions() -> None:
    z1, z2 = _pair(10, 20, seed=2)
    bin_size, blocks = 5, 4
    p1 = soft_discretize(z1, bin_size, 0.6).reshape(10, -1)
    p2 = soft_discretize(z2, bin_size, 0.6).reshape(10, -1)
    joint = joint_distribution(p1, p2)
    assert joint.shape == (20, 20)
    # Every one of the B x B blocks is a joint distribution, so the B diagonal blocks sum
    # to B and the whole matrix to B².
    per_block = joint.reshape(blocks, bin_size, blocks, bin_size).sum(dim=(1, 3))
    torch.testing.assert_close(per_block, torch.ones(blocks, blocks, dtype=F64))
    torch.testing.assert_close(torch.diagonal(per_block).sum(), torch.tensor(float(blocks), dtype=F64))
    torch.testing.assert_close(joint.sum(), torch.tensor(float(blocks**2), dtype=F64))
    torch.testing.assert_close(joint_distribution(p2, p1), joint.T)


def test_soft_discretize_shape_floor_and_sum() -> None:
    z = torch.tensor([[100.0, 0.0, 0.0, 0.0, 1.0, 1.0]], dtype=F64).expand(3, -1)
    p = soft_discretize(z, 2, temperature=0.5)
    assert p.shape == (3, 3, 2)
    assert p.min() >= 1e-8
    torch.testing.assert_close(p[0, 0], torch.tensor([1.0, 1e-8], dtype=F64))
    torch.testing.assert_close(p[0, 1:], torch.full((2, 2), 0.5, dtype=F64))


@pytest.mark.parametrize(
    ("z1", "z2", "kwargs", "match"),
    [
        (torch.randn(8), torch.randn(8), {}, "z1 must be 2-D"),
        (torch.randn(2, 8, 1), torch.randn(2, 8, 1), {}, "z1 must be 2-D"),
        (torch.randn(4, 8), torch.randn(4, 12), {}, "same shape"),
        (torch.randn(1, 8), torch.randn(1, 8), {}, "at least 2 samples.*one sample"),
        (torch.randn(4, 10), torch.randn(4, 10), {}, "bin_size \\(4\\) must divide"),
        (torch.randn(4, 8), torch.randn(4, 8), {"bin_size": 8}, "at least 2 blocks"),
        (torch.randn(4, 8), torch.randn(4, 8), {"bin_size": 1}, "bin_size must be at least 2"),
        (torch.randn(4, 8), torch.randn(4, 8), {"temperature": 0.0}, "temperature must be positive"),
        (torch.randn(4, 8), torch.randn(4, 8), {"temperature": -1.0}, "temperature must be positive"),
    ],
)
def test_imsvd_rejects_bad_input(z1: Tensor, z2: Tensor, kwargs: dict, match: str) -> None:
    args = {"bin_size": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        imsvd_loss(z1, z2, **args)


def test_config_errors_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="bin_size"):
        imsvd_loss(torch.randn(4, 10), torch.randn(4, 10), bin_size=4)
    with pytest.raises(ConfigError, match="temperature"):
        simclr_loss(torch.randn(4, 8), torch.randn(4, 8), temperature=0.0)
    with pytest.raises(ValueError, match="p1 must be 2-D"):
        joint_distribution(torch.randn(4), torch.randn(4))


def test_bfloat16_input_gives_float32_loss() -> None:
    z1, z2 = _pair(16, 64, seed=5, dtype=torch.float32)
    reference = imsvd_loss(z1, z2, 8)
    z1_bf, z2_bf = z1.detach().bfloat16().requires_grad_(True), z2.detach().bfloat16().requires_grad_(True)
    low = imsvd_loss(z1_bf, z2_bf, 8)
    assert all(term.dtype == torch.float32 for term in low)
    torch.testing.assert_close(low.total, reference.total, rtol=2e-2, atol=2e-2)
    low.total.backward()
    assert z1_bf.grad is not None and z1_bf.grad.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = imsvd_loss(z1, z2, 8)
    assert auto.total.dtype == torch.float32
    torch.testing.assert_close(auto.total, reference.total, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_imsvd_cuda_matches_cpu() -> None:
    z = _pair(24, 120, seed=7)
    cpu = imsvd_loss(*z, 10, 0.7, 1.1, 0.9, 1.3)
    cpu_grads = torch.autograd.grad(cpu.total, z)
    zc = tuple(x.detach().cuda().requires_grad_(True) for x in z)
    gpu = imsvd_loss(*zc, 10, 0.7, 1.1, 0.9, 1.3)
    gpu_grads = torch.autograd.grad(gpu.total, zc)
    for a, b in zip(gpu, cpu, strict=True):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-10, atol=1e-10)
    for a, b in zip(gpu_grads, cpu_grads, strict=True):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-10, atol=1e-10)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        auto = imsvd_loss(*(x.float() for x in zc), 10, 0.7)
    assert auto.total.dtype == torch.float32


# --------------------------------------------------------------------------- baselines


@pytest.mark.parametrize(("n", "d", "lam"), [(5, 4, 5e-3), (7, 6, 0.3)])
def test_barlow_twins_matches_transcription(n: int, d: int, lam: float) -> None:
    z = _pair(n, d, seed=11 + n)
    got = barlow_twins_loss(*z, lambda_offdiag=lam)
    assert isinstance(got, BarlowTwinsLoss)
    _assert_same(got.total, transcribed_barlow_twins(*z, lam), z)
    torch.testing.assert_close(got.total, got.on_diagonal + got.off_diagonal)


@pytest.mark.parametrize(
    ("n", "d", "coeffs"), [(5, 4, (25.0, 25.0, 1.0, 1e-4)), (6, 3, (2.0, 3.0, 0.5, 1e-2))]
)
def test_vicreg_matches_transcription(n: int, d: int, coeffs: tuple) -> None:
    z1, z2 = _pair(n, d, seed=21 + n)
    # Scale one view down so that the variance hinge is active on some columns.
    z = (z1, (0.3 * z2.detach()).requires_grad_(True))
    got = vicreg_loss(*z, *coeffs)
    assert isinstance(got, VICRegLoss)
    _assert_same(got.total, transcribed_vicreg(*z, *coeffs), z)
    torch.testing.assert_close(got.total, got.invariance + got.variance + got.covariance)


@pytest.mark.parametrize(("n", "d", "t"), [(4, 3, 0.5), (5, 6, 0.2)])
def test_simclr_matches_transcription(n: int, d: int, t: float) -> None:
    z = _pair(n, d, seed=31 + n)
    got = simclr_loss(*z, temperature=t)
    assert isinstance(got, SimCLRLoss)
    _assert_same(got.total, transcribed_nt_xent(*z, t), z)


@pytest.mark.parametrize("loss", [imsvd_loss, barlow_twins_loss, vicreg_loss, simclr_loss])
def test_every_loss_rejects_single_sample_and_mismatch(loss) -> None:
    kwargs = {"bin_size": 2} if loss is imsvd_loss else {}
    with pytest.raises(ValueError, match="at least 2 samples"):
        loss(torch.randn(1, 4), torch.randn(1, 4), **kwargs)
    with pytest.raises(ValueError, match="same shape"):
        loss(torch.randn(3, 4), torch.randn(2, 4), **kwargs)


@pytest.mark.parametrize("loss", [barlow_twins_loss, vicreg_loss, simclr_loss])
def test_baselines_symmetric_and_prefer_aligned_views(loss) -> None:
    z1, z2 = _pair(16, 8, seed=41)
    torch.testing.assert_close(loss(z1, z2).total, loss(z2, z1).total)
    unrelated = torch.randn(16, 8, generator=torch.Generator().manual_seed(99), dtype=F64)
    assert loss(z1, z1 + 0.01 * z2).total < loss(z1, unrelated).total


# --------------------------------------------------------------------------- selection


@pytest.mark.parametrize(
    ("method", "result_type"),
    [("imsvd", IMSVDLoss), ("barlow_twins", BarlowTwinsLoss), ("vicreg", VICRegLoss), ("simclr", SimCLRLoss)],
)
def test_loss_for_method(method: str, result_type: type) -> None:
    cfg = PretrainConfig(
        method=method, projector="32-24",
        imsvd=IMSVDConfig(bin_size=6, temperature=0.4, diagonal_coeff=1.5, off_block_coeff=0.5, invariance_coeff=2.0),
        barlow_twins=BarlowTwinsConfig(lambda_offdiag=0.01),
        vicreg=VICRegConfig(sim_coeff=10.0, std_coeff=20.0, cov_coeff=2.0),
        simclr=SimCLRConfig(temperature=0.2),
    )  # fmt: skip
    z1, z2 = _pair(6, 24, seed=51)
    result = loss_for_method(cfg)(z1, z2)
    assert isinstance(result, result_type)
    assert math.isfinite(float(result.total.detach()))
    expected = {
        "imsvd": lambda: imsvd_loss(z1, z2, 6, 0.4, 1.5, 0.5, 2.0),
        "barlow_twins": lambda: barlow_twins_loss(z1, z2, 0.01),
        "vicreg": lambda: vicreg_loss(z1, z2, 10.0, 20.0, 2.0),
        "simclr": lambda: simclr_loss(z1, z2, 0.2),
    }[method]()
    torch.testing.assert_close(result.total, expected.total)


@pytest.mark.parametrize("method", ["imsvd", "barlow_twins", "vicreg", "simclr"])
def test_every_loss_is_float32_under_bf16_autocast(method: str) -> None:
    """Training autocasts to bf16 (CPU with native bf16, most GPUs): the loss must still be
    computed in float32, matmuls included, and equal the float32 loss."""
    cfg = PretrainConfig(method=method, projector="64-64")
    gen = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(128, 64, generator=gen), torch.randn(128, 64, generator=gen)
    reference = loss_for_method(cfg)(z1, z2)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        mixed = loss_for_method(cfg)(z1, z2)
    for name, value in mixed._asdict().items():
        assert value.dtype == torch.float32, name
        torch.testing.assert_close(value, getattr(reference, name), rtol=1e-6, atol=1e-6, msg=name)
