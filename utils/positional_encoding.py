"""Positional information for attention: absolute (sinusoidal, learned), relative (T5 bias,
ALiBi) and rotary (RoPE).

Shapes: B batch, H heads, T length, D head dimension, E model dimension.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def sinusoidal_encoding(block_size: int, n_embd: int, base: float = 10000.0) -> Tensor:
    """The table of Vaswani et al. (2017), shape (block_size, n_embd).

    PE[p, 2i] = sin(p / base^(2i/n_embd)),  PE[p, 2i+1] = cos(p / base^(2i/n_embd)).
    """
    if n_embd % 2:
        raise ValueError(f"sinusoidal encoding needs an even n_embd, got {n_embd}")
    position = torch.arange(block_size, dtype=torch.float32)[:, None]  # (N, 1)
    inv_freq = base ** (-torch.arange(0, n_embd, 2, dtype=torch.float32) / n_embd)  # (E/2,)
    table = torch.zeros(block_size, n_embd)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq)
    return table


class SinusoidalPositionalEncoding(nn.Module):
    """Adds the fixed sinusoidal table to token embeddings: (B, T, E) -> (B, T, E)."""

    def __init__(self, n_embd: int, block_size: int = 4096, base: float = 10000.0) -> None:
        super().__init__()
        self.register_buffer(
            "table", sinusoidal_encoding(block_size, n_embd, base), persistent=False
        )

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        _check_positions(x.shape[1], offset, self.table.shape[0])
        return x + self.table[offset : offset + x.shape[1]].to(x.dtype)


class LearnedPositionalEmbedding(nn.Module):
    """A trained vector per position (BERT, GPT-2): (B, T, E) -> (B, T, E)."""

    def __init__(self, block_size: int, n_embd: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(block_size, n_embd)

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        _check_positions(x.shape[1], offset, self.embedding.num_embeddings)
        positions = torch.arange(offset, offset + x.shape[1], device=x.device)
        return x + self.embedding(positions)


def _check_positions(length: int, offset: int, block_size: int) -> None:
    if offset < 0 or offset + length > block_size:
        raise ValueError(
            f"positions {offset}..{offset + length - 1} exceed block_size={block_size}"
        )


def relative_position_bucket(
    relative_position: Tensor,
    bidirectional: bool = True,
    num_buckets: int = 32,
    max_distance: int = 128,
) -> Tensor:
    """T5's bucketing of (key - query) offsets: exact buckets for small distances,
    logarithmically wider ones up to ``max_distance``, and one bucket beyond it."""
    bucket = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        bucket += (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = -torch.clamp(relative_position, max=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    log_bucket = (
        max_exact
        + (
            torch.log(distance.float() / max_exact)
            / math.log(max_distance / max_exact)
            * (num_buckets - max_exact)
        ).long()
    )
    log_bucket = torch.clamp(log_bucket, max=num_buckets - 1)
    return bucket + torch.where(is_small, distance, log_bucket)


class RelativePositionBias(nn.Module):
    """T5-style learned scalar bias per (head, distance bucket), added to attention scores.

    ``forward(T, S)`` returns a (1, H, T, S) float mask for
    :func:`utils.attention.scaled_dot_product_attention`. T5 does not scale scores by
    1/sqrt(D); that is the model's choice, not this module's.
    """

    def __init__(
        self,
        n_head: int,
        num_buckets: int = 32,
        max_distance: int = 128,
        bidirectional: bool = True,
    ) -> None:
        super().__init__()
        self.num_buckets, self.max_distance, self.bidirectional = (
            num_buckets,
            max_distance,
            bidirectional,
        )
        self.bias = nn.Embedding(num_buckets, n_head)

    def forward(self, query_len: int, key_len: int, offset: int = 0) -> Tensor:
        device = self.bias.weight.device
        query_pos = torch.arange(offset, offset + query_len, device=device)[:, None]
        key_pos = torch.arange(key_len, device=device)[None, :]
        buckets = relative_position_bucket(
            key_pos - query_pos, self.bidirectional, self.num_buckets, self.max_distance
        )  # (T, S)
        return self.bias(buckets).permute(2, 0, 1)[None]  # (1, H, T, S)


def alibi_slopes(n_head: int) -> Tensor:
    """ALiBi's per-head slopes (Press et al. 2022): a geometric sequence starting at
    2^(-8/n) for the nearest power of two n, interleaved for other head counts."""

    def power_of_two_slopes(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** math.floor(math.log2(n_head))
    slopes = power_of_two_slopes(closest)
    if closest < n_head:
        slopes += power_of_two_slopes(2 * closest)[0::2][: n_head - closest]
    return torch.tensor(slopes)


def alibi_bias(n_head: int, query_len: int, key_len: int) -> Tensor:
    """(1, H, T, S) additive bias ``-slope_h * (distance from query to key)`` (causal use:
    queries aligned to the last T keys)."""
    query_pos = torch.arange(key_len - query_len, key_len)[:, None]
    key_pos = torch.arange(key_len)[None, :]
    distance = (query_pos - key_pos).clamp(min=0).float()  # (T, S)
    return -(alibi_slopes(n_head)[:, None, None] * distance)[None]


def rotate_half(x: Tensor) -> Tensor:
    """Half-split layout (GPT-NeoX, Llama): pairs are (x[i], x[i + D/2]) -> (-x2, x1)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def rotate_interleaved(x: Tensor) -> Tensor:
    """Interleaved layout (GPT-J, the RoPE paper): pairs are (x[2i], x[2i+1]) -> (-x2, x1)."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([-x2, x1], dim=-1).flatten(-2)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (Su et al. 2021) for queries and keys.

    Each pair of features is rotated by the angle ``position * base^(-2i/D)``, so the score
    between a query at m and a key at n depends only on m - n.

    Args:
        head_dim: D, even.
        base: the frequency base (``rope_theta``; 10000 in the paper and Llama 2).
        interleaved: pair (2i, 2i+1) as GPT-J; default False pairs (i, i + D/2) as Llama.
    """

    def __init__(self, head_dim: int, base: float = 10000.0, interleaved: bool = False) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        self.head_dim, self.base, self.interleaved = head_dim, base, interleaved
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # (D/2,)

    def cos_sin(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos and sin tables for integer positions (T,), each (T, D) in float32."""
        angles = positions.float()[:, None] * self.inv_freq[None, :]  # (T, D/2)
        if self.interleaved:
            angles = angles.repeat_interleave(2, dim=-1)
        else:
            angles = torch.cat([angles, angles], dim=-1)
        return angles.cos(), angles.sin()

    def rotate(self, x: Tensor, offset: int = 0) -> Tensor:
        """Rotate x of shape (..., T, D) whose first row is at position ``offset``."""
        if x.shape[-1] != self.head_dim:
            raise ValueError(f"expected last dimension {self.head_dim}, got {tuple(x.shape)}")
        positions = torch.arange(offset, offset + x.shape[-2], device=x.device)
        cos, sin = self.cos_sin(positions)
        turn = rotate_interleaved if self.interleaved else rotate_half
        return (x.float() * cos + turn(x.float()) * sin).to(x.dtype)

    def forward(self, q: Tensor, k: Tensor, offset: int = 0) -> tuple[Tensor, Tensor]:
        """Rotate q (..., T, D) and k (..., T, D), both starting at position ``offset``."""
        return self.rotate(q, offset), self.rotate(k, offset)
