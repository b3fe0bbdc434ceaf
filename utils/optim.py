"""Optimizers and learning-rate schedules; nothing here knows about models or data.

- :class:`AdamW`: Adam with decoupled weight decay (Loshchilov and Hutter 2019), written out;
  it matches ``torch.optim.AdamW`` step for step. :func:`configure_adamw` builds PyTorch's
  AdamW with two :func:`parameter_groups`: matrices decay, biases and norm gains do not.
- :func:`lr_at`: linear warmup, then cosine or linear decay to ``min_lr`` (or constant).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class AdamW(torch.optim.Optimizer):
    """AdamW written out (Loshchilov and Hutter 2019), for teaching; same numbers as
    ``torch.optim.AdamW``. For each parameter p with gradient g, at step t:

        p <- p * (1 - lr * weight_decay)              decoupled weight decay
        m <- beta1 * m + (1 - beta1) * g              first moment (momentum)
        v <- beta2 * v + (1 - beta2) * g^2            second moment
        p <- p - lr * m_hat / (sqrt(v_hat) + eps),    m_hat = m / (1 - beta1^t),
                                                      v_hat = v / (1 - beta2^t)
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"lr, eps, weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}")
        if not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                m.lerp_(p.grad, 1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                denominator = (v.sqrt() / math.sqrt(1 - beta2**t)).add_(group["eps"])
                p.addcdiv_(m, denominator, value=-group["lr"] / (1 - beta1**t))


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW parameter groups: weight matrices and embeddings (dim >= 2) decay; biases and
    normalisation gains (dim < 2) do not. Tied parameters appear once."""
    params = list(dict.fromkeys(p for p in model.parameters() if p.requires_grad))
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def configure_adamw(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.99),
    eps: float = 1e-8,
    fused: bool = False,
) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` over :func:`parameter_groups` (``fused`` uses one fused kernel)."""
    return torch.optim.AdamW(
        parameter_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, fused=fused or None
    )


SCHEDULES = ("cosine", "linear", "constant")


def lr_at(
    step: int,
    *,
    lr: float,
    max_iters: int,
    warmup_iters: int = 0,
    min_lr: float = 0.0,
    schedule: str = "cosine",
) -> float:
    """Learning rate of optimizer step ``step`` (0-based).

    Warmup: ``lr * (step + 1) / warmup_iters`` for the first ``warmup_iters`` steps, reaching
    ``lr`` at step ``warmup_iters - 1``. Then ``cosine``: ``min_lr + (lr - min_lr) *
    (1 + cos(pi * p)) / 2``, or ``linear``: ``lr - (lr - min_lr) * p``, with ``p`` going from 0
    at step ``warmup_iters`` to 1 at step ``max_iters`` (``min_lr`` afterwards); ``constant``
    stays at ``lr``.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if not 0 <= warmup_iters <= max_iters:
        raise ValueError(f"need 0 <= warmup_iters <= max_iters, got {warmup_iters}, {max_iters}")
    if step < warmup_iters:
        return lr * (step + 1) / warmup_iters
    if schedule == "constant":
        return lr
    progress = min(1.0, (step - warmup_iters) / max(1, max_iters - warmup_iters))
    if schedule == "cosine":
        return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr - (lr - min_lr) * progress
