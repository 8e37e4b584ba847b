"""BatchNorm synchronised across processes on CPU as well as GPU.

``torch.nn.SyncBatchNorm`` refuses CPU tensors (and DDP refuses it on CPU modules), so
a CPU (gloo) DDP run would train with per-process statistics and differ from one
process on the whole batch. On GPU the plugin below uses torch's own SyncBatchNorm; on
CPU it swaps in :class:`GlobalBatchNorm`, which computes the global mean and variance
with differentiable all-reduces.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm
from torch import Tensor, nn


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
