"""DeBERTa's disentangled self-attention (He et al. 2021).

Each token carries two vectors: its content ``x_i`` and, for every pair of positions, a
learned embedding of their relative distance. The score of query i for key j adds three
terms (the fourth, position-to-position, is dropped in the paper)::

    A[i, j] = Qc_i . Kc_j            content-to-content
            + Qc_i . Kr_d(i, j)      content-to-position
            + Kc_j . Qr_d(j, i)      position-to-content

with ``d(i, j) = clamp(i - j, -k, k - 1) + k`` in ``[0, 2k)`` and scale ``1 / sqrt(3 D)``.
Shapes: B batch, T length, E model width, H heads, D head dimension, k max relative distance.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from utils.attention import merge_heads, split_heads


def relative_distance_index(length: int, max_distance: int, device=None) -> Tensor:
    """(T, T) long tensor ``d(i, j) = clamp(i - j, -k, k - 1) + k`` in ``[0, 2k)``."""
    if max_distance < 1:
        raise ValueError(f"max_distance must be >= 1, got {max_distance}")
    position = torch.arange(length, device=device)
    offset = position[:, None] - position[None, :]  # i - j
    return offset.clamp(-max_distance, max_distance - 1) + max_distance


class DisentangledSelfAttention(nn.Module):
    """Self-attention with DeBERTa's disentangled content and relative-position scores.

    Args:
        n_embd: E.
        n_head: H (E must be divisible by H).
        max_distance: k; relative distances are clipped to [-k, k - 1] (2k embeddings).
        bias: whether the projections have biases.
    """

    def __init__(self, n_embd: int, n_head: int, max_distance: int, bias: bool = True):
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd={n_embd} is not divisible by n_head={n_head}")
        self.n_head, self.max_distance = n_head, max_distance
        self.q_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.k_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.v_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.pos_q_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.pos_k_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.relative = nn.Embedding(2 * max_distance, n_embd)
        self.out_proj = nn.Linear(n_embd, n_embd, bias=bias)

    def scores(self, x: Tensor) -> Tensor:
        """(B, T, E) -> the three score terms summed and scaled, (B, H, T, T)."""
        if x.dim() != 3 or not x.is_floating_point():
            raise ValueError(f"x must be a float tensor (B, T, E), got {x.dtype} {tuple(x.shape)}")
        heads, length = self.n_head, x.shape[1]
        q, k = split_heads(self.q_proj(x), heads), split_heads(self.k_proj(x), heads)
        rel = self.relative.weight[None]  # (1, 2k, E)
        q_rel = split_heads(self.pos_q_proj(rel), heads)[0]  # (H, 2k, D)
        k_rel = split_heads(self.pos_k_proj(rel), heads)[0]
        index = relative_distance_index(length, self.max_distance, x.device)  # (T, T)
        content = q @ k.transpose(-2, -1)  # (B, H, T, T)
        c2p = (q @ k_rel.transpose(-2, -1)).gather(-1, index.expand(*q.shape[:2], -1, -1))
        p2c = (k @ q_rel.transpose(-2, -1)).gather(-1, index.expand(*k.shape[:2], -1, -1))
        scale = 1.0 / math.sqrt(3 * q.shape[-1])
        return (content + c2p + p2c.transpose(-2, -1)) * scale

    def forward(
        self, x: Tensor, *, attention_mask: Tensor | None = None, need_weights: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """x (B, T, E) -> (B, T, E); attention_mask (B, T) bool, True = real token; with
        ``need_weights`` also the (B, H, T, T) attention weights."""
        scores = self.scores(x)
        if attention_mask is not None:
            if attention_mask.dtype != torch.bool or attention_mask.shape != x.shape[:2]:
                raise ValueError(
                    f"attention_mask must be bool (B, T) = {tuple(x.shape[:2])}, "
                    f"got {attention_mask.dtype} {tuple(attention_mask.shape)}"
                )
            scores = scores.masked_fill(~attention_mask[:, None, None, :], float("-inf"))
        weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-masked rows -> 0
        out = self.out_proj(merge_heads(weights @ split_heads(self.v_proj(x), self.n_head)))
        return (out, weights) if need_weights else out
