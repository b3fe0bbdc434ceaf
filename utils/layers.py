"""The layers every model in :mod:`utils.transformer` is built from: LayerNorm, RMSNorm and
the position-wise feed-forward network (plain or gated: SwiGLU). Attention lives in
:mod:`utils.attention`, positions in :mod:`utils.positional_encoding`.

Shape letters: E model width, F feed-forward width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LayerNorm(nn.Module):
    """LayerNorm (Ba et al. 2016) over the last dimension, with an optional bias (nanoGPT).

    (..., E) -> (..., E): subtract the mean, divide by the standard deviation, scale, shift.
    """

    def __init__(self, n_embd: int, eps: float = 1e-5, bias: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n_embd))
        self.bias = nn.Parameter(torch.zeros(n_embd)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """RMSNorm (Zhang and Sennrich 2019), also T5's ``T5LayerNorm``: no mean, no bias.

    (..., E) -> (..., E): ``weight * x / sqrt(mean(x^2) + eps)``, computed in float32.
    """

    def __init__(self, n_embd: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n_embd))

    def forward(self, x: Tensor) -> Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x.float() * torch.rsqrt(variance + self.eps)).to(x.dtype)


ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,  # exact (erf) GELU: BERT
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # GPT-2's "gelu_new"
    "silu": F.silu,  # with gated=True: SwiGLU (Llama)
}


class FeedForward(nn.Module):
    """Position-wise feed-forward network: (B, T, E) -> (B, T, E).

    Plain: ``fc_out(act(fc_in(x)))``. Gated (GLU family, Shazeer 2020):
    ``fc_out(act(fc_gate(x)) * fc_in(x))``; ``activation="silu", gated=True`` is SwiGLU.
    """

    def __init__(
        self,
        n_embd: int,
        ffn_dim: int,
        activation: str = "gelu",
        gated: bool = False,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.activation, self.act = activation, ACTIVATIONS[activation]
        self.fc_gate = nn.Linear(n_embd, ffn_dim, bias=bias) if gated else None
        self.fc_in = nn.Linear(n_embd, ffn_dim, bias=bias)
        self.fc_out = nn.Linear(ffn_dim, n_embd, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.fc_gate is None:
            return self.fc_out(self.act(self.fc_in(x)))
        return self.fc_out(self.act(self.fc_gate(x)) * self.fc_in(x))
