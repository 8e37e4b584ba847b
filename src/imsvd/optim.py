"""Optimisers and the learning-rate schedule of the reference recipe."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak lr at ``step``: linear warm-up, then cosine to ``min_ratio``.

    The reference recipe: lr rises linearly from 0 over the warm-up, then follows
    ``q = (1 + cos(pi * t)) / 2`` down to ``min_ratio`` of the peak at the last step.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    q = 0.5 * (1.0 + math.cos(math.pi * t))
    return q + min_ratio * (1.0 - q)


def is_bias_or_norm(param: Tensor) -> bool:
    """Biases and normalisation scales are the 1-D parameters."""
    return param.ndim == 1


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling (You et al. 2017), the reference's ImageNet optimiser.

    Written here because torch ships no LARS. Biases and norm parameters (1-D) get
    neither weight decay nor the trust-ratio adaptation, as in the reference.

    Args:
        params: parameters or parameter groups.
        lr: learning rate.
        weight_decay: L2 penalty on adapted parameters.
        momentum: heavy-ball momentum.
        eta: trust coefficient.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        eta: float = 0.001,
    ) -> None:
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if not is_bias_or_norm(p):
                    grad = grad.add(p, alpha=group["weight_decay"])
                    param_norm = torch.linalg.vector_norm(p)
                    update_norm = torch.linalg.vector_norm(grad)
                    trust = torch.where(
                        (param_norm > 0) & (update_norm > 0),
                        group["eta"] * param_norm / update_norm,
                        torch.ones_like(param_norm),
                    )
                    grad = grad.mul(trust)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(grad)
                p.add_(buf, alpha=-group["lr"])
        return loss


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """SGD (momentum 0.9, the reference CIFAR choice) or LARS (its ImageNet choice)."""
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    if name == "lars":
        return LARS(model.parameters(), lr=lr, weight_decay=weight_decay)
    raise ValueError(f"pretrain.optimizer must be 'sgd' or 'lars', got {name!r}")
