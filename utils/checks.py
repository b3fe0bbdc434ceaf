"""Input checks at the boundary: the public entry points (model ``forward``, attention
functions) call these once, and the layers inside a model run without them.

A model's ``forward`` checks its token ids and masks, then runs its blocks inside
:func:`trusted`; the attention layers called there skip their own checks (``needed()`` is
False), so decoding does not re-validate the same tensors in every layer at every step.
Called on its own, a layer still checks everything.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor

_TRUSTED: ContextVar[bool] = ContextVar("utils_checks_trusted", default=False)


@contextmanager
def trusted() -> Iterator[None]:
    """Inside this block, layers skip the checks their caller has already done."""
    token = _TRUSTED.set(True)
    try:
        yield
    finally:
        _TRUSTED.reset(token)


def needed() -> bool:
    """Whether a layer should check its inputs (False inside :func:`trusted`)."""
    return not _TRUSTED.get()


# ---------------------------------------------------------------------------------------------
# Token ids and padding masks (models)
# ---------------------------------------------------------------------------------------------


def token_ids(idx: Tensor, name: str = "idx") -> None:
    """``idx`` must be a (B, T) integer tensor."""
    if not isinstance(idx, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(idx).__name__}")
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer token ids, got dtype {idx.dtype}")
    if idx.dim() != 2:
        raise ValueError(f"{name} must have shape (B, T), got {tuple(idx.shape)}")


def padding_mask(mask: Tensor | None, batch: int, length: int, name: str) -> Tensor | None:
    """Validate a (B, S) padding mask (bool, or 0/1 integers; True = real token) and return
    it as bool."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.is_floating_point() or mask.is_complex():
        raise ValueError(f"{name} must be bool or 0/1 integers, got dtype {mask.dtype}")
    if mask.shape != (batch, length):
        raise ValueError(
            f"{name} must have shape (B, S_total) = {(batch, length)} (cached + new tokens), "
            f"got {tuple(mask.shape)}"
        )
    return mask.bool()


def cache_length(kv_caches: list | None, n_layer: int) -> int:
    """Number of tokens already cached (0 without caches); checks one cache per layer."""
    from utils.attention import KVCache

    if kv_caches is None:
        return 0
    if len(kv_caches) != n_layer or not all(isinstance(c, KVCache) for c in kv_caches):
        raise ValueError(f"kv_caches must be a list of {n_layer} KVCache (one per layer)")
    return len(kv_caches[0])


def sequence_length(total: int, block_size: int) -> None:
    if total > block_size:
        raise ValueError(f"sequence length {total} exceeds block_size={block_size}")


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------


def floating(name: str, x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def qkv(q: Tensor, k: Tensor, v: Tensor) -> tuple[int, ...]:
    """q (..., T, D), k (..., S, D), v (..., S, Dv); returns the scores' shape (..., T, S)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        floating(name, x)
        if x.dim() < 2:
            raise ValueError(f"{name} must have shape (..., length, dim), got {tuple(x.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q and k must have the same last dimension (head dim), "
            f"got q {tuple(q.shape)} and k {tuple(k.shape)}"
        )
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(
            f"k and v must have the same length (dim -2), "
            f"got k {tuple(k.shape)} and v {tuple(v.shape)}"
        )
    try:
        batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2])
    except RuntimeError:
        raise ValueError(
            f"batch dimensions of q {tuple(q.shape)} and k {tuple(k.shape)} do not broadcast"
        ) from None
    return (*batch, q.shape[-2], k.shape[-2])


def attn_mask(mask: Tensor, scores_shape: tuple[int, ...]) -> None:
    """An attention pattern: bool (True = attend) or additive float, broadcastable to
    ``scores_shape``."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise ValueError(
            f"attn_mask must be bool (True = attend) or floating (additive), got {mask.dtype}"
        )
    try:
        if torch.broadcast_shapes(mask.shape, scores_shape) != torch.Size(scores_shape):
            raise RuntimeError
    except RuntimeError:
        raise ValueError(
            f"attn_mask of shape {tuple(mask.shape)} does not broadcast to the attention scores "
            f"of shape {scores_shape} (..., T, S)"
        ) from None


def attention_inputs(query: Tensor, key_value: Tensor, width: int, kv_width: int) -> None:
    """query (B, T, width) and key_value (B, S, kv_width) for :class:`MultiHeadAttention`."""
    floating("query", query)
    floating("key_value", key_value)
    if query.dim() != 3 or query.shape[-1] != width:
        raise ValueError(f"query must be (B, T, {width}), got {tuple(query.shape)}")
    if key_value.dim() != 3 or key_value.shape[-1] != kv_width:
        raise ValueError(f"key_value must be (B, S, {kv_width}), got {tuple(key_value.shape)}")
    if key_value.shape[0] != query.shape[0]:
        raise ValueError(
            f"query and key_value batch sizes differ: {query.shape[0]} vs {key_value.shape[0]}"
        )


def attention_mask(mask: Tensor, batch: int, length: int) -> None:
    """A layer's (B, S) bool padding mask, S counting cached keys too."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool or mask.shape != (batch, length):
        raise ValueError(
            f"attention_mask must be a bool tensor of shape (B, S) = {(batch, length)} "
            f"(True = real token), got {mask.dtype} {tuple(mask.shape)}"
        )
