"""Correct but unusual lab submissions: each must get full marks (tests/test_grading_robustness.py).

Each case: (id, part, submission).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def softmax_by_logsumexp(x, dim=-1):
    return torch.exp(x - torch.logsumexp(x, dim=dim, keepdim=True))


def attention_by_einsum(q, k, v, mask=None, is_causal=False):
    scores = torch.einsum("...td,...sd->...ts", q, k) / math.sqrt(q.shape[-1])
    hidden = torch.full_like(scores, -math.inf)
    if is_causal:
        t, s = q.shape[-2], k.shape[-2]
        keep = torch.arange(s)[None, :] <= torch.arange(t)[:, None] + (s - t)
        scores = torch.where(keep, scores, hidden)
    if mask is not None and mask.dtype == torch.bool:
        scores = torch.where(mask, scores, hidden)
    elif mask is not None:
        scores = scores + mask
    weights = torch.exp(scores - scores.amax(-1, keepdim=True))
    weights = weights / weights.sum(-1, keepdim=True)
    return torch.einsum("...ts,...sd->...td", weights, v)


def split_heads_by_unflatten(x, n_head):
    return x.unflatten(-1, (n_head, -1)).permute(0, 2, 1, 3)


def merge_heads_by_movedim(x):
    return x.movedim(1, 2).flatten(-2)


class MultiHeadAttentionPerHead(nn.Module):
    """Loops over heads with slices of the projected features instead of split/merge."""

    def __init__(self, n_embd, n_head, kv_dim=None):
        super().__init__()
        kv_dim = n_embd if kv_dim is None else kv_dim
        self.n_head, self.head_dim = n_head, n_embd // n_head
        self.q_proj, self.out_proj = (
            nn.Linear(n_embd, n_embd),
            nn.Linear(n_embd, n_embd),
        )
        self.k_proj, self.v_proj = nn.Linear(kv_dim, n_embd), nn.Linear(kv_dim, n_embd)

    def forward(self, query, key_value=None, attn_mask=None, is_causal=False):
        key_value = query if key_value is None else key_value
        q, k, v = self.q_proj(query), self.k_proj(key_value), self.v_proj(key_value)
        heads = []
        for h in range(self.n_head):
            cols = slice(h * self.head_dim, (h + 1) * self.head_dim)
            heads.append(attention_by_einsum(q[..., cols], k[..., cols], v[..., cols],
                                             attn_mask, is_causal))  # fmt: skip
        return self.out_proj(torch.cat(heads, dim=-1))


def rotate_half_by_roll(x):
    half = x.shape[-1] // 2
    sign = torch.cat([-torch.ones(half), torch.ones(half)]).to(x.dtype)
    return torch.roll(x, half, dims=-1) * sign


def rotate_interleaved_by_reshape(x):
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)


def apply_rope_complex(q, k, offset=0, *, base=10000.0, interleaved=False):
    d = q.shape[-1]
    theta = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    positions = torch.arange(offset, offset + q.shape[-2], dtype=torch.float64)
    rotation = torch.polar(torch.ones(()).double(), positions[:, None] * theta).to(torch.complex64)

    def rotate(x):
        x32 = x.float()
        if interleaved:
            z = torch.view_as_complex(x32.unflatten(-1, (-1, 2)).contiguous()) * rotation
            return torch.view_as_real(z).flatten(-2).to(x.dtype)
        first, second = x32.chunk(2, dim=-1)
        z = torch.complex(first, second) * rotation
        return torch.cat([z.real, z.imag], dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


def online_softmax_right_to_left(x, block_size=128):
    row_max = torch.full(x.shape[:-1], -math.inf, dtype=x.dtype)
    row_sum = torch.zeros_like(row_max)
    starts = list(range(0, x.shape[-1], block_size))
    for start in reversed(starts):
        block = x[..., start : start + block_size]
        new_max = torch.maximum(row_max, block.amax(-1))
        row_sum = row_sum * torch.exp(row_max - new_max) + torch.exp(
            block - new_max[..., None]
        ).sum(-1)
        row_max = new_max
    return torch.exp(x - row_max[..., None]) / row_sum[..., None]


def flash_keys_outer(q, k, v, is_causal=False, block_size_q=64, block_size_k=64):
    """Key blocks in the outer loop, query blocks inside: every query's running statistics
    live for the whole pass (the same memory as the output)."""
    b, h, t, d = q.shape
    s = k.shape[-2]
    offset, scale = s - t, 1 / math.sqrt(d)
    row_max = torch.full((b, h, t), -math.inf)
    row_sum = torch.zeros(b, h, t)
    acc = torch.zeros(b, h, t, v.shape[-1])
    for k0 in range(0, s, block_size_k):
        k1 = min(k0 + block_size_k, s)
        k_tile, v_tile = k[:, :, k0:k1].float(), v[:, :, k0:k1].float()
        for q0 in range(0, t, block_size_q):
            q1 = min(q0 + block_size_q, t)
            if is_causal and q1 - 1 + offset < k0:
                continue  # the whole tile is above the diagonal
            scores = q[:, :, q0:q1].float() @ k_tile.transpose(-2, -1) * scale
            if is_causal:
                rows = torch.arange(q0, q1)[:, None] + offset
                scores = scores.masked_fill(rows < torch.arange(k0, k1), -math.inf)
            old = row_max[:, :, q0:q1]
            new = torch.maximum(old, scores.amax(-1))
            safe = torch.where(new == -math.inf, 0.0, new)
            probs = torch.exp(scores - safe[..., None])
            correction = torch.exp(old - safe)
            row_sum[:, :, q0:q1] = row_sum[:, :, q0:q1] * correction + probs.sum(-1)
            acc[:, :, q0:q1] = acc[:, :, q0:q1] * correction[..., None] + probs @ v_tile
            row_max[:, :, q0:q1] = new
    return (acc / row_sum[..., None]).to(q.dtype), row_max + row_sum.log()


# (id, part, submission)
CASES = [
    ("softmax by logsumexp", "softmax", softmax_by_logsumexp),
    ("attention by einsum and torch.where", "attention", attention_by_einsum),
    ("split_heads by unflatten + permute", "split_heads", split_heads_by_unflatten),
    ("merge_heads by movedim + flatten", "merge_heads", merge_heads_by_movedim),
    ("multi-head attention looping over heads", "multi_head_attention", MultiHeadAttentionPerHead),
    ("rotate_half by roll and sign", "rotate_half", rotate_half_by_roll),
    ("rotate_interleaved by reshape", "rotate_interleaved", rotate_interleaved_by_reshape),
    ("RoPE by complex multiplication", "apply_rope", apply_rope_complex),
    ("online softmax right to left", "online_softmax", online_softmax_right_to_left),
    ("flash walking key blocks outside", "flash_forward", flash_keys_outer),
]
