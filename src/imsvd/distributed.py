"""BatchNorm synchronised across processes on CPU as well as GPU.

``torch.nn.SyncBatchNorm`` refuses CPU tensors, so a CPU (gloo) DDP run would train
with per-process statistics and differ from one process on the whole batch. This
subclass keeps torch's implementation on accelerators and, on CPU, computes the
global mean and variance with differentiable all-reduces.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm
from torch import Tensor, nn


class PortableSyncBatchNorm(nn.SyncBatchNorm):
    """``SyncBatchNorm`` that also works on CPU tensors (gloo)."""

    def forward(self, input: Tensor) -> Tensor:
        if input.is_cuda or not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(input) if input.is_cuda else self._local(input)
        if dist.get_world_size() == 1:
            return self._local(input)
        dims = [0, *range(2, input.dim())]
        count = torch.tensor([input.numel() / input.shape[1]], dtype=input.dtype, device=input.device)
        stats = torch.cat([input.sum(dims), (input * input).sum(dims), count])
        stats = dist_fn.all_reduce(stats)  # differentiable: gradients are all-reduced back
        c = self.num_features
        total = stats[-1]
        mean = stats[:c] / total
        var = stats[c : 2 * c] / total - mean * mean
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                momentum = 0.1 if self.momentum is None else self.momentum
                unbiased = var * total / max(float(total) - 1.0, 1.0)
                self.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased.detach(), alpha=momentum)
                self.num_batches_tracked += 1
        shape = [1, c] + [1] * (input.dim() - 2)
        out = (input - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {input.dim()}-D")

    def _local(self, input: Tensor) -> Tensor:
        return nn.functional.batch_norm(
            input,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight,
            self.bias,
            self.training or not self.track_running_stats,
            0.1 if self.momentum is None else self.momentum,
            self.eps,
        )


def convert_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm layer with :class:`PortableSyncBatchNorm`, weights kept."""
    converted = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, nn.SyncBatchNorm):
        converted = PortableSyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        if module.affine:
            with torch.no_grad():
                converted.weight = module.weight
                converted.bias = module.bias
        converted.running_mean = module.running_mean
        converted.running_var = module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
    for name, child in module.named_children():
        converted.add_module(name, convert_batchnorm(child))
    return converted


class PortableSyncBatchNormPlugin(TorchSyncBatchNorm):
    """Lightning layer-sync plugin using :class:`PortableSyncBatchNorm` (CPU and GPU)."""

    def apply(self, model: nn.Module) -> nn.Module:
        return convert_batchnorm(model)
