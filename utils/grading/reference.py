"""The grader's own float64 references: attention, its log-sum-exp and the causal mask,
written here (not imported from :mod:`utils`, which learner code may patch or which may
change) with torch function handles saved when the grader is imported.

Shapes: q (..., T, D), k (..., S, D), v (..., S, Dv); a boolean mask is True where the query
may attend, a float mask is added to the scaled scores; causal masks are aligned bottom
right (query i sees keys 0 .. S - T + i).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_matmul, _softmax, _logsumexp = torch.matmul, torch.softmax, torch.logsumexp
_transpose, _where, _ones, _tril = torch.transpose, torch.where, torch.ones, torch.tril
_full_like = torch.full_like


def causal_keep(query_len: int, key_len: int) -> Tensor:
    """(T, S) bool, True where query i may see key j: j <= i + S - T."""
    return _tril(_ones(query_len, key_len, dtype=torch.bool), key_len - query_len)


def scores(q: Tensor, k: Tensor, mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
    """float64 (..., T, S) scaled scores with the masks applied (-inf where hidden)."""
    q, k = q.double(), k.double()
    out = _matmul(q, _transpose(k, -2, -1)) / math.sqrt(q.shape[-1])
    hidden = _full_like(out, -math.inf)
    if is_causal:
        out = _where(causal_keep(q.shape[-2], k.shape[-2]), out, hidden)
    if mask is not None and mask.dtype == torch.bool:
        out = _where(mask, out, hidden)
    elif mask is not None:
        out = out + mask.double()
    return out


def attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, is_causal: bool = False
) -> Tensor:
    """float64 softmax(q k^T / sqrt(D) + mask) v, differentiable in q, k, v."""
    return _matmul(_softmax(scores(q, k, mask, is_causal), dim=-1), v.double())


def attention_lse(
    q: Tensor, k: Tensor, v: Tensor, is_causal: bool = False
) -> tuple[Tensor, Tensor]:
    """float64 (out (..., T, Dv), lse (..., T)): lse is the log-sum-exp of the scaled scores."""
    s = scores(q, k, is_causal=is_causal)
    return _matmul(_softmax(s, dim=-1), v.double()), _logsumexp(s, dim=-1)


def softmax(x: Tensor, dim: int) -> Tensor:
    """float64 softmax along ``dim``."""
    return _softmax(x.double(), dim=dim)
