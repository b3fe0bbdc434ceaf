"""Gradient attribution: how much each input token's embedding moves a model's output.

``forward`` maps embeddings ``(N, T, E)`` to one score per row ``(N,)`` (e.g. a class logit);
the attributions of one example ``x`` ``(T, E)`` are summed over E to one number per token.
:func:`replaced_output` lets a model that starts from token ids take embeddings instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from utils import checks

Forward = Callable[[Tensor], Tensor]


def _score_gradient(forward: Forward, points: Tensor) -> tuple[Tensor, Tensor]:
    """Scores (N,) of ``points`` (N, T, E) and their gradients (N, T, E)."""
    points = points.detach().requires_grad_(True)
    with torch.enable_grad():
        scores = forward(points)
        if scores.shape != points.shape[:1]:
            raise ValueError(
                f"forward must return one score per row, shape {tuple(points.shape[:1])}, "
                f"got {tuple(scores.shape)}"
            )
        (gradient,) = torch.autograd.grad(scores.sum(), points)
    return scores.detach(), gradient


def _check_example(x: Tensor, name: str) -> None:
    checks.floating(name, x)
    if x.dim() != 2:
        raise ValueError(
            f"{name} must be one example's embeddings (T, E), got shape {tuple(x.shape)}"
        )


def input_x_gradient(forward: Forward, x: Tensor) -> Tensor:
    """Per-token attribution (T,) of x (T, E): sum over E of x * d score / dx."""
    _check_example(x, "x")
    _, gradient = _score_gradient(forward, x[None])
    return (x * gradient[0]).sum(-1)


def integrated_gradients(forward: Forward, x: Tensor, baseline: Tensor, steps: int = 32) -> Tensor:
    """Per-token integrated gradients (T,) of x (T, E) from ``baseline`` (T, E).

    (x - baseline) times the mean gradient at ``steps`` midpoints of the straight path
    (Sundararajan et al. 2017); the attributions sum to about score(x) - score(baseline).
    """
    _check_example(x, "x")
    if baseline.shape != x.shape:
        raise ValueError(
            f"baseline must have x's shape {tuple(x.shape)}, got {tuple(baseline.shape)}"
        )
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    alphas = (torch.arange(steps, dtype=x.dtype, device=x.device) + 0.5) / steps
    path = baseline + alphas[:, None, None] * (x - baseline)  # (steps, T, E)
    _, gradient = _score_gradient(forward, path)
    return ((x - baseline) * gradient.mean(0)).sum(-1)


@contextmanager
def replaced_output(module: nn.Module, value: Tensor) -> Iterator[None]:
    """Inside this block, ``module`` (e.g. a token embedding) returns ``value`` instead."""
    handle = module.register_forward_hook(lambda mod, args, output: value)
    try:
        yield
    finally:
        handle.remove()
