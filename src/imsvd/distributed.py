"""Several processes: which launcher started this one, the shuffle they share, and
BatchNorm synchronised across them on CPU as well as GPU.

Launchers: ``torchrun`` (torchelastic) and SLURM's ``srun`` are recognised through
Lightning's own cluster environments, so what Lightning's trainer sees and what the
project's entry point and hooks see cannot disagree.

BatchNorm: ``torch.nn.SyncBatchNorm`` refuses CPU tensors (and DDP refuses it on CPU
modules), so a CPU (gloo) DDP run would train with per-process statistics and differ from
one process on the whole batch. On GPU the plugin below uses torch's own SyncBatchNorm; on
CPU it swaps in :class:`GlobalBatchNorm`, which computes the global mean and variance
with differentiable all-reduces.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm
from torch import Tensor, nn
from torch.utils.data import Sampler


@dataclass(frozen=True)
class Launch:
    """This process's place in a launch by ``torchrun`` or ``srun``.

    Attributes:
        launcher: ``"torchrun"`` or ``"slurm"``.
        global_rank: rank among all processes (0 writes every output).
        world_size: processes in all (nodes times processes per node).
        local_world_size: processes on this node.
    """

    launcher: str
    global_rank: int
    world_size: int
    local_world_size: int

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))


def launched() -> Launch | None:
    """The launch this process belongs to, or ``None`` when nothing launched it
    (a plain ``kedro run``; Lightning's own spawned workers also read as ``None`` in
    the parent, which is the process that runs the Kedro session).

    A SLURM allocation with one task (an ``sbatch`` script running ``kedro run``
    directly) is no launch: there is nothing to share.
    """
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    if TorchElasticEnvironment.detect():
        elastic = TorchElasticEnvironment()
        world = elastic.world_size()
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        return Launch("torchrun", elastic.global_rank(), world, local)
    if SLURMEnvironment.detect() and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        slurm = SLURMEnvironment()
        local = int(os.environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])
        return Launch("slurm", slurm.global_rank(), slurm.world_size(), local)
    return None


def is_writer() -> bool:
    """True in the one process that writes outputs, checkpoints and the MLflow run:
    global rank 0 of a launch, or the only process. A process that Lightning's own DDP
    launcher started (``pretrain.strategy=ddp`` without torchrun: it sets ``LOCAL_RANK``
    and ``NODE_RANK``) is no writer either unless both are 0."""
    launch = launched()
    if launch is not None:
        return launch.global_rank == 0
    return all(os.environ.get(name, "0") in ("", "0") for name in ("LOCAL_RANK", "NODE_RANK"))


class SharedShuffle(Sampler[int]):
    """Every rank's share of one seeded permutation of the data set, per epoch.

    All ranks draw the same permutation (seed and epoch), drop its tail to a multiple of
    ``batch_size``, and rank ``r`` of ``W`` reads every ``W``-th index from ``r``. So
    global batch ``k`` (the union of the ranks' ``k``-th batches of ``batch_size / W``)
    is exactly batch ``k`` of a single process with the same seed: a run on any number
    of processes sees the batches of one process, and the equality of the two is
    testable. torch's ``DistributedSampler`` splits the same way but fixes rank and
    world size when built, which for Lightning's spawned workers is before the process
    group exists; this one reads them when iterated.

    Lightning calls ``set_epoch`` at each epoch's start (and the loader must be given to
    the trainer with ``use_distributed_sampler=False``).
    """

    def __init__(self, size: int, batch_size: int, seed: int) -> None:
        self.size = size
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @staticmethod
    def _place() -> tuple[int, int]:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def _used(self) -> int:
        # Whole global batches only, as drop_last would give one process (but keep a data
        # set smaller than one batch whole, split evenly over the ranks).
        _, world = self._place()
        if self.size >= self.batch_size:
            return self.size - self.size % self.batch_size
        return self.size - self.size % world

    def __iter__(self) -> Iterator[int]:
        rank, world = self._place()
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator)[: self._used()]
        return iter(order[rank::world].tolist())

    def __len__(self) -> int:
        return self._used() // self._place()[1]


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are taken over every process's batch.

    Gradients flow through the all-reduce (its backward all-reduces them), so with a
    loss computed on the gathered batch, DDP's averaged gradients equal those of one
    process on the concatenated batch. Outside a process group it is plain BatchNorm.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {input.dim()}-D")

    def forward(self, input: Tensor) -> Tensor:
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if not (self.training and distributed):
            return super().forward(input)
        dims = [0, *range(2, input.dim())]
        count = torch.tensor([input.numel() / input.shape[1]], dtype=input.dtype, device=input.device)
        stats = dist_fn.all_reduce(torch.cat([input.sum(dims), (input * input).sum(dims), count]))
        c = self.num_features
        total = stats[-1]
        mean = stats[:c] / total
        var = stats[c : 2 * c] / total - mean * mean
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                momentum = 0.1 if self.momentum is None else self.momentum
                unbiased = var * total / (total - 1).clamp_min(1)
                self.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased.detach(), alpha=momentum)
                self.num_batches_tracked.add_(1)  # type: ignore[union-attr]
        shape = [1, c] + [1] * (input.dim() - 2)
        out = (input - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def convert_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm layer with :class:`GlobalBatchNorm`, sharing its tensors."""
    converted = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        converted = GlobalBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        if module.affine:
            converted.weight = module.weight
            converted.bias = module.bias
        converted.running_mean = module.running_mean
        converted.running_var = module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
    for name, child in module.named_children():
        converted.add_module(name, convert_batchnorm(child))
    return converted


class SyncBatchNormPlugin(TorchSyncBatchNorm):
    """Lightning layer-sync plugin: torch's SyncBatchNorm on GPU, GlobalBatchNorm on CPU."""

    def apply(self, model: nn.Module) -> nn.Module:
        first = next(model.parameters(), None)
        if first is not None and first.is_cuda:
            return super().apply(model)
        return convert_batchnorm(model)
