"""Scaled dot-product attention and multi-head attention.

Shape letters used throughout the course:
    B batch, H query heads, H_kv key/value heads, T query length, S key length,
    D head dimension, E model (embedding) dimension.

Mask convention (one for the whole course, the same as
``torch.nn.functional.scaled_dot_product_attention``): a **boolean** mask is ``True`` where
a query *may attend* to a key and ``False`` where it may not; a **floating-point** mask is
*added* to the scores (``0`` keeps, ``-inf`` removes, any other value biases).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from utils import checks


def causal_mask(query_len: int, key_len: int, device=None) -> Tensor:
    """Boolean causal mask of shape (T, S), ``True`` where query i may see key j.

    Aligned to the bottom right: query ``i`` is the token at position ``S - T + i``, so it
    sees keys ``0 .. S - T + i``. With ``T == S`` this is the usual lower triangle; with a
    KV cache (``T < S``) the new queries see the whole cached prefix.
    """
    if query_len > key_len:
        raise ValueError(f"causal mask needs query_len <= key_len, got {query_len} > {key_len}")
    return torch.ones(query_len, key_len, dtype=torch.bool, device=device).tril(key_len - query_len)


def scaled_dot_product_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    *,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
    return_weights: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """softmax(q k^T / sqrt(D) + attn_mask) v, written out.

    Args:
        q: (..., T, D) queries.
        k: (..., S, D) keys.
        v: (..., S, Dv) values.
        attn_mask: optional, broadcastable to (..., T, S); bool (True = attend) or float (added).
        is_causal: also apply :func:`causal_mask` (may be combined with ``attn_mask``).
        dropout_p: dropout probability on the attention weights (use 0 in evaluation).
        scale: score scale, default ``1 / sqrt(D)``.
        return_weights: also return the (..., T, S) attention weights.

    Returns:
        (..., T, Dv) outputs, and the weights if asked. A query whose keys are all masked
        gets all-zero weights (and a zero output) rather than NaN.
    """
    if checks.needed():
        scores_shape = checks.qkv(q, k, v)
        if attn_mask is not None:
            checks.attn_mask(attn_mask, scores_shape)
        if not 0.0 <= dropout_p < 1.0:
            raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")

    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale  # (..., T, S)

    keep = None  # boolean (..., T, S) or None
    if is_causal:
        keep = causal_mask(q.shape[-2], k.shape[-2], device=q.device)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        keep = attn_mask if keep is None else keep & attn_mask
    elif attn_mask is not None:
        scores = scores + attn_mask
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))

    # A query whose keys are all masked has a row of -inf: softmax would give NaN there (and
    # NaN gradients). Such rows get zero weights and zero gradients instead. The extra
    # masked_fill runs only when needed, so autograd normally saves one (..., T, S) tensor.
    empty = torch.isneginf(scores).all(dim=-1, keepdim=True)  # (..., T, 1)
    if empty.any():
        weights = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    else:
        weights = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p, training=True)
    out = weights @ v  # (..., T, Dv)
    return (out, weights) if return_weights else out


def split_heads(x: Tensor, n_head: int) -> Tensor:
    """(B, T, H * D) -> (B, H, T, D)."""
    if x.dim() != 3 or x.shape[-1] % n_head:
        raise ValueError(
            f"split_heads needs (B, T, H*D) with H*D divisible by n_head={n_head}, "
            f"got {tuple(x.shape)}"
        )
    batch, length, width = x.shape
    return x.view(batch, length, n_head, width // n_head).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """(B, H, T, D) -> (B, T, H * D)."""
    if x.dim() != 4:
        raise ValueError(f"merge_heads needs (B, H, T, D), got {tuple(x.shape)}")
    batch, heads, length, dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * dim)


def with_padding(
    attn_mask: Tensor | None, attention_mask: Tensor | None, batch: int, key_len: int
) -> Tensor | None:
    """Combine an attention pattern (bool or additive, broadcastable to (B, H, T, S)) with a
    (B, S) padding mask (True = real token) into one mask for the scores."""
    if attention_mask is None:
        return attn_mask
    if checks.needed():
        checks.attention_mask(attention_mask, batch, key_len)
    padding = attention_mask[:, None, None, :]  # (B, 1, 1, S)
    if attn_mask is None:
        return padding
    if attn_mask.dtype == torch.bool:
        return attn_mask & padding
    return attn_mask + torch.where(padding, 0.0, float("-inf")).to(attn_mask.dtype)


def repeat_kv_heads(x: Tensor, n_head: int) -> Tensor:
    """Grouped-query attention: (B, H_kv, S, D) -> (B, H, S, D), each K/V head shared by
    H / H_kv query heads (unchanged when H_kv == H)."""
    repeat = n_head // x.shape[1]
    return x if repeat == 1 else x.repeat_interleave(repeat, dim=1)


class KVCache:
    """Keys and values one attention layer has seen so far, each (B, H_kv, S, D).

    ``update`` appends the new step's keys/values and returns everything cached, so a
    decoder feeding one token at a time attends to the whole prefix without recomputing it.
    """

    def __init__(self) -> None:
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.k is None else self.k.shape[-2]

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.k is None:
            self.k, self.v = k, v
        else:
            self.k = torch.cat([self.k, k], dim=-2)
            self.v = torch.cat([self.v, v], dim=-2)
        return self.k, self.v

    def reorder(self, batch_index: Tensor) -> None:
        """Keep, as row i, the cached row ``batch_index[i]`` (beam search: each new beam
        continues the cache of the beam it extends). ``batch_index`` is (B_new,) long."""
        if self.k is not None:
            self.k, self.v = self.k[batch_index], self.v[batch_index]


class MultiHeadAttention(nn.Module):
    """Multi-head (and grouped-query) attention, for self- or cross-attention.

    Args:
        n_embd: E, width of the queries and of the output.
        n_head: H, number of query heads; ``head_dim = E // H`` unless given.
        n_kv_head: H_kv key/value heads (grouped-query attention); must divide H.
            Default H (standard multi-head attention); 1 gives multi-query attention.
        kv_dim: width of the key/value input for cross-attention (default E).
        bias: whether the projections have biases.
        dropout: dropout on the attention weights during training.
        fused: one (E, 3E) input projection ``qkv`` (GPT-2 layout) instead of separate
            ``q_proj``, ``k_proj``, ``v_proj`` (BERT/Llama layout). Self-attention only.
        rotary: optional module with ``forward(q, k, offset) -> (q, k)`` (e.g.
            :class:`utils.positional_encoding.RotaryEmbedding`) applied after projection.
        head_dim: D, if not E // H.
        scale: score scale, default ``1 / sqrt(D)``; T5 uses unscaled scores (``scale=1.0``).
    """

    def __init__(
        self,
        n_embd: int,
        n_head: int,
        *,
        n_kv_head: int | None = None,
        kv_dim: int | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        fused: bool = False,
        rotary: nn.Module | None = None,
        head_dim: int | None = None,
        scale: float | None = None,
    ) -> None:
        super().__init__()
        if head_dim is None:
            if n_embd % n_head:
                raise ValueError(f"n_embd={n_embd} is not divisible by n_head={n_head}")
            head_dim = n_embd // n_head
        n_kv_head = n_head if n_kv_head is None else n_kv_head
        if n_head % n_kv_head:
            raise ValueError(f"n_head={n_head} is not divisible by n_kv_head={n_kv_head}")
        kv_dim = n_embd if kv_dim is None else kv_dim
        if fused and (kv_dim != n_embd or n_kv_head != n_head):
            raise ValueError("fused=True needs kv_dim == n_embd and n_kv_head == n_head")

        self.n_embd, self.n_head, self.n_kv_head = n_embd, n_head, n_kv_head
        self.head_dim, self.kv_dim, self.dropout, self.fused = head_dim, kv_dim, dropout, fused
        self.rotary, self.scale = rotary, scale
        q_width, kv_width = n_head * head_dim, n_kv_head * head_dim
        if fused:
            self.qkv = nn.Linear(n_embd, 3 * q_width, bias=bias)
        else:
            self.q_proj = nn.Linear(n_embd, q_width, bias=bias)
            self.k_proj = nn.Linear(kv_dim, kv_width, bias=bias)
            self.v_proj = nn.Linear(kv_dim, kv_width, bias=bias)
        self.out_proj = nn.Linear(q_width, n_embd, bias=bias)

    def _project(self, query: Tensor, key_value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if not self.fused:
            return self.q_proj(query), self.k_proj(key_value), self.v_proj(key_value)
        if key_value is query:  # self-attention: one (E, 3E) matmul
            return self.qkv(query).chunk(3, dim=-1)
        w_q, w_k, w_v = self.qkv.weight.chunk(3, dim=0)
        b_q, b_k, b_v = (None,) * 3 if self.qkv.bias is None else self.qkv.bias.chunk(3)
        return (
            F.linear(query, w_q, b_q),
            F.linear(key_value, w_k, b_k),
            F.linear(key_value, w_v, b_v),
        )

    def forward(
        self,
        query: Tensor,
        key_value: Tensor | None = None,
        *,
        attn_mask: Tensor | None = None,
        attention_mask: Tensor | None = None,
        is_causal: bool = False,
        kv_cache: KVCache | None = None,
        need_weights: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Attend from ``query`` (B, T, E) to ``key_value`` (B, S, kv_dim; None: itself).

        ``attn_mask``: attention pattern, bool (True = attend) or additive (e.g. T5's bias),
        broadcastable to (B, H, T, S_total), S_total counting cached keys; ``attention_mask``: (B,
        S_total) padding mask, True = real token; ``is_causal`` is bottom-right aligned with a
        ``kv_cache``. Returns (B, T, E), and the (B, H, T, S_total) weights if asked."""
        key_value = query if key_value is None else key_value
        if checks.needed():
            checks.attention_inputs(query, key_value, self.n_embd, self.kv_dim)
        q, k, v = self._project(query, key_value)
        q = split_heads(q, self.n_head)  # (B, H, T, D); k, v: (B, H_kv, S, D)
        k, v = split_heads(k, self.n_kv_head), split_heads(v, self.n_kv_head)
        if self.rotary is not None:
            q, k = self.rotary(q, k, offset=0 if kv_cache is None else len(kv_cache))
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)
        k, v = repeat_kv_heads(k, self.n_head), repeat_kv_heads(v, self.n_head)
        mask = with_padding(attn_mask, attention_mask, query.shape[0], k.shape[-2])
        p = self.dropout if self.training else 0.0
        out, weights = scaled_dot_product_attention(
            q, k, v, mask, is_causal=is_causal, dropout_p=p, scale=self.scale, return_weights=True
        )
        out = self.out_proj(merge_heads(out))  # (B, T, E)
        return (out, weights) if need_weights else out
