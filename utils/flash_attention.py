"""FlashAttention-2, tile by tile: a PyTorch reference (forward and backward) and a Triton kernel.

Attention ``softmax(q k^T * scale) v`` computed block by block with the *online softmax*
(Milakov & Gimelshein 2018; Dao et al. 2022, 2023): for each block of queries we stream over
blocks of keys, keeping a running row maximum ``m``, a running denominator ``l`` and an
unnormalised output ``acc``. When a new block raises the maximum, the old ``l`` and ``acc`` are
rescaled by ``exp(m_old - m_new)``. Nothing of size T x S is ever built: the largest
intermediate is one (B, H, block_size_q, block_size_k) tile of scores.

The forward pass also returns the log-sum-exp of every score row,
``lse = m + log(l)``, which is all the backward pass needs to recompute the attention weights
tile by tile (``p = exp(s - lse)``) instead of storing them.

Shapes: q (B, H, T, D), k (B, H, S, D), v (B, H, S, Dv); out (B, H, T, Dv); lse (B, H, T)
in float32. ``is_causal`` uses the course's bottom-right alignment
(:func:`utils.attention.causal_mask`): query ``i`` sees keys ``0 .. S - T + i``.
Accumulation is in float32 whatever the input dtype; outputs come back in the input dtype.

:mod:`utils.memory` measures what the book quotes: the peak bytes of tensors alive at once
during a call, and the largest single tensor it created.

Triton: on a machine without a GPU, call :func:`use_triton_interpreter` first (it sets
``TRITON_INTERPRET=1``; importing this module writes nothing to the environment); then
:func:`triton_flash_attention_forward` runs on CPU tensors through Triton's interpreter
(slow: use large blocks and small problems). The kernel is compiled on first use. Without
triton installed the module still imports; only the Triton function raises.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import sys

import torch
from torch import Tensor

tl = None  # triton.language, imported on first use (after use_triton_interpreter)


# ---------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------


def _validate(q: Tensor, k: Tensor, v: Tensor, is_causal: bool, block_q: int, block_k: int) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
        if x.dim() != 4:
            raise ValueError(f"{name} must have shape (B, H, length, dim), got {tuple(x.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.shape[:2] != k.shape[:2] or k.shape[:2] != v.shape[:2]:
        raise ValueError(
            f"q, k, v must share (B, H), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q and k must share the head dim, got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(
            f"k and v must share the length, got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if is_causal and q.shape[-2] > k.shape[-2]:
        raise ValueError(
            f"causal attention needs T <= S, got q length {q.shape[-2]} > k length {k.shape[-2]}"
        )
    for name, size in (("block_size_q", block_q), ("block_size_k", block_k)):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"{name} must be a positive int, got {size!r}")


def _acc_dtype(x: Tensor) -> torch.dtype:
    """Accumulation dtype: float32, or float64 for float64 inputs."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _scale(q: Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def _causal_keep(q_start: int, q_end: int, k_start: int, k_end: int, offset: int, device) -> Tensor:
    """(bq, bk) bool tile of the bottom-right causal mask: True where query may see key."""
    rows = torch.arange(q_start, q_end, device=device)[:, None] + offset
    cols = torch.arange(k_start, k_end, device=device)[None, :]
    return rows >= cols


def _key_end(q_end: int, key_len: int, offset: int, is_causal: bool) -> int:
    """One past the last key any query in rows ``.. q_end - 1`` may see."""
    return min(key_len, q_end + offset) if is_causal else key_len


def _needs_mask(q_start: int, k_end: int, offset: int, is_causal: bool) -> bool:
    """True if some (query, key) pair of the tile lies above the causal diagonal."""
    return is_causal and k_end - 1 > q_start + offset


# ---------------------------------------------------------------------------------------------
# PyTorch reference: forward and backward
# ---------------------------------------------------------------------------------------------


def flash_attention_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    is_causal: bool = False,
    block_size_q: int = 64,
    block_size_k: int = 64,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Tiled FlashAttention-2 forward pass; never builds the (T, S) score matrix.

    Args:
        q: (B, H, T, D) queries. k: (B, H, S, D) keys. v: (B, H, S, Dv) values.
        is_causal: bottom-right-aligned causal mask; key blocks entirely above the diagonal
            are skipped, blocks crossing it are masked element-wise.
        block_size_q, block_size_k: tile sizes; T and S need not be multiples of them.
        scale: score scale, default ``1 / sqrt(D)``.

    Returns:
        out (B, H, T, Dv) in q's dtype, and lse (B, H, T), the log-sum-exp of each row of
        scaled (and masked) scores, in float32 (float64 for float64 inputs).
    """
    _validate(q, k, v, is_causal, block_size_q, block_size_k)
    scale = _scale(q, scale)
    batch, heads, q_len, _ = q.shape
    k_len, v_dim = k.shape[-2], v.shape[-1]
    offset = k_len - q_len
    acc_dtype = _acc_dtype(q)
    out = torch.empty(batch, heads, q_len, v_dim, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, heads, q_len, dtype=acc_dtype, device=q.device)

    for q_start in range(0, q_len, block_size_q):
        q_end = min(q_start + block_size_q, q_len)
        q_tile = q[:, :, q_start:q_end].to(acc_dtype)  # (B, H, bq, D)
        row_max = torch.full(
            (batch, heads, q_end - q_start), -math.inf, dtype=acc_dtype, device=q.device
        )
        row_sum = torch.zeros_like(row_max)
        acc = torch.zeros(batch, heads, q_end - q_start, v_dim, dtype=acc_dtype, device=q.device)
        for k_start in range(0, _key_end(q_end, k_len, offset, is_causal), block_size_k):
            k_end = min(k_start + block_size_k, k_len)
            k_tile = k[:, :, k_start:k_end].to(acc_dtype)
            scores = q_tile @ k_tile.transpose(-2, -1) * scale  # (B, H, bq, bk)
            if _needs_mask(q_start, k_end, offset, is_causal):
                keep = _causal_keep(q_start, q_end, k_start, k_end, offset, q.device)
                scores = scores.masked_fill(~keep, -math.inf)
            new_max = torch.maximum(row_max, scores.amax(dim=-1))
            probs = torch.exp(scores - new_max[..., None])
            correction = torch.exp(row_max - new_max)  # rescales what was summed so far
            row_sum = row_sum * correction + probs.sum(dim=-1)
            acc = acc * correction[..., None] + probs @ v[:, :, k_start:k_end].to(acc_dtype)
            row_max = new_max
        out[:, :, q_start:q_end] = (acc / row_sum[..., None]).to(q.dtype)
        lse[:, :, q_start:q_end] = row_max + torch.log(row_sum)
    return out, lse


def flash_attention_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    *,
    is_causal: bool = False,
    block_size_q: int = 64,
    block_size_k: int = 64,
    scale: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of FlashAttention by recomputation, tile by tile (FlashAttention-2, Alg. 2).

    For each tile, the weights are rebuilt from the saved log-sum-exp, ``p = exp(s - lse)``,
    and with ``delta = rowsum(grad_out * out)``:
    ``dv += p^T do``, ``ds = p * (do v^T - delta)``, ``dq += ds k * scale``,
    ``dk += ds^T q * scale``.

    Args:
        grad_out: (B, H, T, Dv). q, k, v, out, lse: as given to / returned by
            :func:`flash_attention_forward` with the same ``is_causal``, ``scale``.

    Returns:
        dq (B, H, T, D), dk (B, H, S, D), dv (B, H, S, Dv) in the inputs' dtype.
    """
    _validate(q, k, v, is_causal, block_size_q, block_size_k)
    scale = _scale(q, scale)
    q_len, k_len = q.shape[-2], k.shape[-2]
    offset = k_len - q_len
    acc_dtype = _acc_dtype(q)
    delta = (grad_out.to(acc_dtype) * out.to(acc_dtype)).sum(dim=-1)  # (B, H, T)
    dq = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc_dtype, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc_dtype, device=q.device)

    for k_start in range(0, k_len, block_size_k):
        k_end = min(k_start + block_size_k, k_len)
        k_tile, v_tile = k[:, :, k_start:k_end].to(acc_dtype), v[:, :, k_start:k_end].to(acc_dtype)
        # causal: the first query that sees key k_start is row k_start - offset
        first_q = max(0, k_start - offset) // block_size_q * block_size_q if is_causal else 0
        for q_start in range(first_q, q_len, block_size_q):
            q_end = min(q_start + block_size_q, q_len)
            q_tile = q[:, :, q_start:q_end].to(acc_dtype)
            do_tile = grad_out[:, :, q_start:q_end].to(acc_dtype)
            scores = q_tile @ k_tile.transpose(-2, -1) * scale  # (B, H, bq, bk)
            probs = torch.exp(scores - lse[:, :, q_start:q_end, None])
            if _needs_mask(q_start, k_end, offset, is_causal):
                keep = _causal_keep(q_start, q_end, k_start, k_end, offset, q.device)
                probs = probs.masked_fill(~keep, 0.0)
            dv[:, :, k_start:k_end] += probs.transpose(-2, -1) @ do_tile
            dprobs = do_tile @ v_tile.transpose(-2, -1)
            dscores = probs * (dprobs - delta[:, :, q_start:q_end, None])
            dq[:, :, q_start:q_end] += dscores @ k_tile * scale
            dk[:, :, k_start:k_end] += dscores.transpose(-2, -1) @ q_tile * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class FlashAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: saves (q, k, v, out, lse), not the attention weights.

    ``FlashAttentionFunction.apply(q, k, v, is_causal, block_size_q, block_size_k, scale)``
    returns out (B, H, T, Dv).
    """

    @staticmethod
    def forward(ctx, q, k, v, is_causal=False, block_size_q=64, block_size_k=64, scale=None):
        blocks = {"block_size_q": block_size_q, "block_size_k": block_size_k}
        out, lse = flash_attention_forward(q, k, v, is_causal=is_causal, scale=scale, **blocks)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.options = dict(
            is_causal=is_causal, block_size_q=block_size_q, block_size_k=block_size_k, scale=scale
        )
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = flash_attention_backward(grad_out, q, k, v, out, lse, **ctx.options)
        return dq, dk, dv, None, None, None, None


def flash_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    is_causal: bool = False,
    block_size_q: int = 64,
    block_size_k: int = 64,
    scale: float | None = None,
) -> Tensor:
    """FlashAttention with autograd: (B, H, T, D), (B, H, S, D), (B, H, S, Dv) -> (B, H, T, Dv)."""
    return FlashAttentionFunction.apply(q, k, v, is_causal, block_size_q, block_size_k, scale)


# ---------------------------------------------------------------------------------------------
# Triton forward kernel
# ---------------------------------------------------------------------------------------------


def _flash_forward_kernel(
    Q,  # pointers to contiguous (B*H, T, D), (B*H, S, D), (B*H, S, Dv), (B*H, T, Dv), (B*H, T)
    K,
    V,
    Out,
    Lse,
    scale,
    q_len,
    k_len,
    head_dim,
    v_dim,
    causal_offset,
    IS_CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """One program: BLOCK_M queries of one (batch, head); causal ones stop at ``key_end``."""
    block_m, bh = tl.program_id(0), tl.program_id(1)
    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols_d, cols_dv = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    q = tl.load(
        Q + bh * q_len * head_dim + rows[:, None] * head_dim + cols_d[None, :],
        mask=(rows[:, None] < q_len) & (cols_d[None, :] < head_dim),
        other=0.0,
    )
    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    key_end = tl.minimum(k_len, (block_m + 1) * BLOCK_M + causal_offset) if IS_CAUSAL else k_len
    for k_start in range(0, key_end, BLOCK_N):
        keys = k_start + tl.arange(0, BLOCK_N)
        k = tl.load(
            K + bh * k_len * head_dim + keys[:, None] * head_dim + cols_d[None, :],
            mask=(keys[:, None] < k_len) & (cols_d[None, :] < head_dim),
            other=0.0,
        )
        scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # (BLOCK_M, BLOCK_N)
        keep = keys[None, :] < k_len
        if IS_CAUSAL:
            keep = keep & (rows[:, None] + causal_offset >= keys[None, :])
        scores = tl.where(keep, scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        probs = tl.exp(scores - new_max[:, None])
        correction = tl.exp(row_max - new_max)
        row_sum = row_sum * correction + tl.sum(probs, 1)
        v = tl.load(
            V + bh * k_len * v_dim + keys[:, None] * v_dim + cols_dv[None, :],
            mask=(keys[:, None] < k_len) & (cols_dv[None, :] < v_dim),
            other=0.0,
        )
        acc = acc * correction[:, None] + tl.dot(probs.to(v.dtype), v, input_precision="ieee")
        row_max = new_max
    tl.store(
        Out + bh * q_len * v_dim + rows[:, None] * v_dim + cols_dv[None, :],
        (acc / row_sum[:, None]).to(Out.dtype.element_ty),
        mask=(rows[:, None] < q_len) & (cols_dv[None, :] < v_dim),
    )
    tl.store(Lse + bh * q_len + rows, row_max + tl.log(row_sum), mask=rows < q_len)


def use_triton_interpreter() -> None:
    """Run Triton kernels on CPU tensors through Triton's interpreter (for machines without a
    GPU; slow): sets ``TRITON_INTERPRET=1``. Triton reads it when ``triton.language`` is
    first imported, so call this before that (the lab's first cell; ``tests/conftest.py``)."""
    if "triton.language" in sys.modules and not _interpreted():
        raise RuntimeError(
            "triton was imported before use_triton_interpreter(): call it first "
            "(restart the kernel)"
        )
    os.environ["TRITON_INTERPRET"] = "1"


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _forward_kernel():
    """Import triton and compile :func:`_flash_forward_kernel` with ``triton.jit``."""
    global tl
    import triton
    import triton.language as tl

    return triton.jit(_flash_forward_kernel)


def triton_flash_attention_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    is_causal: bool = False,
    block_size_q: int = 64,
    block_size_k: int = 64,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """The FlashAttention-2 forward pass as a Triton kernel; same contract as
    :func:`flash_attention_forward` (out (B, H, T, Dv) in q's dtype, lse (B, H, T) float32).

    Runs on CUDA tensors on a GPU, and on CPU tensors after :func:`use_triton_interpreter`.
    Block sizes must be powers of two and at least 16 (``tl.dot``'s minimum); the interpreter
    is fastest with large blocks and has no bfloat16 arithmetic: use float32 or float16 on CPU.
    """
    if importlib.util.find_spec("triton") is None:
        raise RuntimeError(
            "triton_flash_attention_forward needs the `triton` package (pip install triton); "
            "the PyTorch flash_attention_forward works without it"
        )
    _validate(q, k, v, is_causal, block_size_q, block_size_k)
    for name, size in (("block_size_q", block_size_q), ("block_size_k", block_size_k)):
        if size < 16 or size & (size - 1):
            raise ValueError(f"{name} must be a power of two >= 16 for Triton, got {size}")
    interpreted = _interpreted()
    if q.device.type != "cuda" and not interpreted:
        raise ValueError(
            f"tensors on {q.device} need Triton's interpreter: call "
            "utils.flash_attention.use_triton_interpreter() first, or move q, k, v to a GPU"
        )
    if interpreted and q.dtype == torch.bfloat16:
        raise TypeError("Triton's interpreter has no bfloat16 arithmetic; use float32 or float16")
    batch, heads, q_len, head_dim = q.shape
    k_len, v_dim = k.shape[-2], v.shape[-1]
    q3, k3, v3 = (x.reshape(batch * heads, *x.shape[-2:]).contiguous() for x in (q, k, v))
    out = torch.empty(batch * heads, q_len, v_dim, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch * heads, q_len, dtype=torch.float32, device=q.device)
    kernel = _forward_kernel()
    grid = (math.ceil(q_len / block_size_q), batch * heads)
    kernel[grid](
        q3,
        k3,
        v3,
        out,
        lse,
        _scale(q, scale),
        q_len,
        k_len,
        head_dim,
        v_dim,
        k_len - q_len,
        IS_CAUSAL=is_causal,
        BLOCK_M=block_size_q,
        BLOCK_N=block_size_k,
        BLOCK_D=max(16, 1 << (head_dim - 1).bit_length()),  # next power of two
        BLOCK_DV=max(16, 1 << (v_dim - 1).bit_length()),
    )
    return out.view(batch, heads, q_len, v_dim), lse.view(batch, heads, q_len)
