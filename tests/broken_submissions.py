"""Deliberately broken lab submissions, each with the check it must fail and what the grader
must say. Used by tests/test_grading.py through the grader's Python API.

Each case: (id, part, submission, test that must end the part, status, words the message must
contain). The submissions are what learners really write, one bug each.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time

import torch
import torch.nn.functional as F

import utils.attention as course_attention
from utils.attention import causal_mask


def _scores(q, k, mask=None, is_causal=False):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if is_causal:
        scores = scores.masked_fill(~causal_mask(q.shape[-2], k.shape[-2]), -math.inf)
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, -math.inf)
    elif mask is not None:
        scores = scores + mask
    return scores


# --------------------------------------------------------------------------- lab 1: attention


def softmax_unstable(x, dim=-1):
    exps = x.exp()  # overflows for scores above ~88
    return exps / exps.sum(dim=dim, keepdim=True)


def softmax_wrong_axis(x, dim=-1):
    shifted = x - x.amax(dim=0, keepdim=True)  # always normalises over dim 0
    return shifted.exp() / shifted.exp().sum(dim=0, keepdim=True)


def softmax_prints_a_lot(x, dim=-1):
    print("debug " * 200_000)  # 1.2 MB of output per call
    shifted = x - x.amax(dim=dim, keepdim=True)
    return shifted.exp() / shifted.exp().sum(dim=dim, keepdim=True)


def attention_transposed_output(q, k, v, mask=None, is_causal=False):
    weights = torch.softmax(_scores(q, k, mask, is_causal), dim=-1)
    return (weights @ v).transpose(-2, -1)


def attention_missing_scale(q, k, v, mask=None, is_causal=False):
    return torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v


def attention_mask_inverted(q, k, v, mask=None, is_causal=False):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(mask, -math.inf)  # True was meant to *keep*
    return torch.softmax(scores, dim=-1) @ v


def attention_all_masked_default(q, k, v, mask=None, is_causal=False):
    if mask is None:  # "nothing masked"... in the opposite convention: every key is hidden
        mask = torch.zeros(q.shape[-2], k.shape[-2], dtype=torch.bool)
    scores = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).masked_fill(~mask, -math.inf)
    return torch.softmax(scores, dim=-1) @ v


def attention_raises(q, k, v, mask=None, is_causal=False):
    heads = q.shape[4]  # IndexError: q has 4 dimensions
    return heads


def attention_float64(q, k, v, mask=None, is_causal=False):
    q, k, v = q.double(), k.double(), v.double()  # "more precision" but the wrong dtype back
    return torch.softmax(_scores(q, k, mask, is_causal), dim=-1) @ v


def attention_wrong_device(q, k, v, mask=None, is_causal=False):
    out = torch.softmax(_scores(q, k, mask, is_causal), dim=-1) @ v
    return out.to("meta")  # e.g. a hard-coded device="cuda" elsewhere


def attention_in_place(q, k, v, mask=None, is_causal=False):
    q.mul_(1 / math.sqrt(q.shape[-1]))  # scales the caller's tensor
    return torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v


def attention_returns_weights(q, k, v, mask=None, is_causal=False):
    weights = torch.softmax(_scores(q, k, mask, is_causal), dim=-1)
    return weights @ v, weights


def attention_calls_sdpa(q, k, v, mask=None, is_causal=False):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)


def split_heads_view(x, n_head):
    batch, length, width = x.shape
    return x.view(batch, n_head, length, width // n_head)


# -------------------------------------------------------------------------------- lab 2: RoPE


def rotate_interleaved_mixed_up(x):
    first, second = x.chunk(2, dim=-1)  # the half-split pairing
    return torch.cat([-second, first], dim=-1)


def _rope(x, positions, base, interleaved):
    theta = base ** (-torch.arange(0, x.shape[-1], 2, dtype=torch.float64) / x.shape[-1])
    angles = positions.double()[:, None] * theta  # (T, D/2)
    if interleaved:
        angles = angles.repeat_interleave(2, dim=-1)
        even, odd = x[..., 0::2], x[..., 1::2]
        rotated = torch.stack([-odd, even], dim=-1).flatten(-2)
    else:
        angles = torch.cat([angles, angles], dim=-1)
        first, second = x.chunk(2, dim=-1)
        rotated = torch.cat([-second, first], dim=-1)
    cos, sin = angles.cos().float(), angles.sin().float()
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def apply_rope_ignores_offset(q, k, offset=0, *, base=10000.0, interleaved=False):
    positions = torch.arange(q.shape[-2])  # should start at offset
    return _rope(q, positions, base, interleaved), _rope(k, positions, base, interleaved)


# ----------------------------------------------------------------------------- lab 3: flash


def _flash(q, k, v, is_causal, block_q, block_k, rescale=True, skip=True):
    batch, heads, q_len, dim = q.shape
    k_len = k.shape[-2]
    offset = k_len - q_len
    out = torch.empty_like(q)
    lse = torch.empty(batch, heads, q_len)
    for q0 in range(0, q_len, block_q):
        q1 = min(q0 + block_q, q_len)
        row_max = torch.full((batch, heads, q1 - q0), -math.inf)
        row_sum = torch.zeros_like(row_max)
        acc = torch.zeros(batch, heads, q1 - q0, dim)
        k_end = min(k_len, q1 + offset) if is_causal and skip else k_len
        for k0 in range(0, k_end, block_k):
            k1 = min(k0 + block_k, k_len)
            scores = q[:, :, q0:q1] @ k[:, :, k0:k1].transpose(-2, -1) / math.sqrt(dim)
            if is_causal:
                rows = torch.arange(q0, q1)[:, None] + offset
                scores = scores.masked_fill(rows < torch.arange(k0, k1), -math.inf)
            new_max = torch.maximum(row_max, scores.amax(-1))
            probs = torch.exp(scores - new_max[..., None]).nan_to_num(0.0)
            correction = torch.exp(row_max - new_max) if rescale else torch.ones_like(row_max)
            row_sum = row_sum * correction + probs.sum(-1)
            acc = acc * correction[..., None] + probs @ v[:, :, k0:k1]
            row_max = new_max
        out[:, :, q0:q1] = acc / row_sum[..., None]
        lse[:, :, q0:q1] = row_max + row_sum.log()
    return out, lse


def flash_no_rescaling(q, k, v, is_causal=False, block_size_q=64, block_size_k=64):
    return _flash(q, k, v, is_causal, block_size_q, block_size_k, rescale=False)


def flash_no_block_skipping(q, k, v, is_causal=False, block_size_q=64, block_size_k=64):
    return _flash(q, k, v, is_causal, block_size_q, block_size_k, skip=False)


def flash_calls_sdpa(q, k, v, is_causal=False, block_size_q=64, block_size_k=64):
    out = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    return out, torch.zeros(q.shape[:-1])


def flash_materialises_scores(q, k, v, is_causal=False, block_size_q=64, block_size_k=64):
    scores = _scores(q, k, is_causal=is_causal)  # (B, H, T, S): the whole matrix
    return torch.softmax(scores, dim=-1) @ v, torch.logsumexp(scores, dim=-1)


def flash_infinite_loop(q, k, v, is_causal=False, block_size_q=64, block_size_k=64):
    start = 0
    while start < q.shape[-2]:  # forgot to advance start
        _ = q[:, :, start : start + block_size_q]
    return q, q


def flash_swallows_everything(q, k, v, is_causal=False, block_size_q=64, block_size_k=64):
    while True:  # retries forever, and a bare except hides every error
        try:  # noqa: SIM105
            time.sleep(0.01)
        except:  # noqa: E722
            pass


class FlashAttentionNaiveBackward(torch.autograd.Function):
    """Correct numbers, but the backward pass rebuilds the whole attention matrix."""

    @staticmethod
    def forward(ctx, q, k, v, is_causal=False, block_size_q=64, block_size_k=64):
        ctx.save_for_backward(q, k, v)
        ctx.is_causal = is_causal
        return _flash(q, k, v, is_causal, block_size_q, block_size_k)[0]

    @staticmethod
    def backward(ctx, grad_out):
        inputs = [x.detach().requires_grad_() for x in ctx.saved_tensors]
        with torch.enable_grad():
            scores = _scores(inputs[0], inputs[1], is_causal=ctx.is_causal)
            out = torch.softmax(scores, dim=-1) @ inputs[2]
            grads = torch.autograd.grad(out, inputs, grad_out)
        return (*grads, None, None, None)


def triton_forward_in_torch(q, k, v, is_causal=False, block_size_q=64, block_size_k=64):
    return _flash(q, k, v, is_causal, block_size_q, block_size_k)  # no kernel at all


# ------------------------------------------------- hostile: ending the process, leaking state


def softmax_exits(x, dim=-1):
    sys.exit("done")  # a script habit


def attention_os_exit(q, k, v, mask=None, is_causal=False):
    os._exit(3)  # would kill the grader (and the notebook's kernel) without a report


def attention_turns_gradients_off(q, k, v, mask=None, is_causal=False):
    torch.set_grad_enabled(False)  # "inference is faster", globally and never undone
    return torch.softmax(_scores(q, k, mask, is_causal), dim=-1) @ v


def rope_cos_sin_float64_default(positions, head_dim, base=10000.0, interleaved=False):
    torch.set_default_dtype(torch.float64)  # "more precision" for everyone after this call
    theta = base ** (-torch.arange(0, head_dim, 2, dtype=torch.get_default_dtype()) / head_dim)
    angles = positions.to(torch.get_default_dtype())[:, None] * theta
    angles = angles.repeat_interleave(2, -1) if interleaved else torch.cat([angles] * 2, -1)
    return angles.cos(), angles.sin()  # float64: the lab says float32


def _last_axis_softmax(x, dim=-1, **kwargs):
    shifted = x - x.amax(dim=-1, keepdim=True)
    return shifted.exp() / shifted.exp().sum(dim=-1, keepdim=True)


def softmax_patches_torch(x, dim=-1):
    torch.softmax = _last_axis_softmax  # the reference computed after the call used to be this
    return _last_axis_softmax(x)  # ignores `dim`


def attention_on_meta_device(q, k, v, mask=None, is_causal=False):
    torch.set_default_device("meta")  # e.g. a "cuda" default left from another notebook
    return torch.softmax(_scores(q, k, mask, is_causal), dim=-1) @ v + torch.zeros(())


def flash_disarms_the_timer(q, k, v, is_causal=False, block_size_q=64, block_size_k=64):
    signal.signal(signal.SIGALRM, signal.SIG_IGN)  # the grader's alarm would never ring
    while True:
        pass


def softmax_recursive(x, dim=-1):
    return softmax_recursive(x, dim)  # meant to call torch's


# ------------------------------------- broken: what the lab states but the old checks missed


def attention_causal_replaces_mask(q, k, v, mask=None, is_causal=False):
    if is_causal:
        mask = causal_mask(q.shape[-2], k.shape[-2])  # the caller's mask is lost
    return torch.softmax(_scores(q, k, mask), dim=-1) @ v


def attention_mask_replaces_causal(q, k, v, mask=None, is_causal=False):
    if mask is None and is_causal:  # with a mask, the causal flag is ignored
        mask = causal_mask(q.shape[-2], k.shape[-2])
    return torch.softmax(_scores(q, k, mask), dim=-1) @ v


split_heads_from_course = course_attention.split_heads  # the course's reference, as is


def merge_heads_calls_course(x):
    return course_attention.merge_heads(x)


def apply_rope_keys_at_zero(q, k, offset=0, *, base=10000.0, interleaved=False):
    positions = torch.arange(offset, offset + q.shape[-2])
    return _rope(q, positions, base, interleaved), _rope(k, positions - offset, base, interleaved)


def apply_rope_keys_default_base(q, k, offset=0, *, base=10000.0, interleaved=False):
    positions = torch.arange(offset, offset + q.shape[-2])
    return _rope(q, positions, base, interleaved), _rope(k, positions, 10000.0, interleaved)


def apply_rope_keys_float32(q, k, offset=0, *, base=10000.0, interleaved=False):
    positions = torch.arange(offset, offset + q.shape[-2])
    return _rope(q, positions, base, interleaved), _rope(k, positions, base, interleaved).float()


def flash_lse_in_input_dtype(q, k, v, is_causal=False, block_size_q=64, block_size_k=64):
    out, lse = _flash(q.float(), k.float(), v.float(), is_causal, block_size_q, block_size_k)
    return out.to(q.dtype), lse.to(q.dtype)  # the lab's table says lse is float32


class MultiHeadAttentionWrapsTorch(torch.nn.Module):
    def __init__(self, n_embd, n_head, kv_dim=None):
        super().__init__()
        self.inner = torch.nn.MultiheadAttention(n_embd, n_head, batch_first=True)

    def forward(self, query, key_value=None, attn_mask=None, is_causal=False):
        key_value = query if key_value is None else key_value
        return self.inner(query, key_value, key_value, attn_mask=attn_mask)[0]


# (id, part, submission, failing test (prefix), status, words the message must contain)
CASES = [
    ("wrong transpose", "attention", attention_transposed_output, "shape", "FAIL",
     ["shape (2, 3, 6, 5)", "expected (2, 3, 5, 6)"]),
    ("missing scale", "attention", attention_missing_scale, "hand-sized example", "FAIL",
     ["without the 1/sqrt(D) scale", "max abs error"]),
    ("mask inverted", "attention", attention_mask_inverted, "boolean mask", "FAIL",
     ["mask inverted", "True must mean *may attend*"]),
    ("softmax over the wrong axis", "softmax", softmax_wrong_axis, "hand-sized example", "FAIL",
     ["softmax over dim 0"]),
    ("unstable softmax overflowing", "softmax", softmax_unstable, "large scores", "FAIL",
     ["NaN", "subtract the row maximum"]),
    ("RoPE pairs mixed up", "rotate_interleaved", rotate_interleaved_mixed_up,
     "hand-sized example", "FAIL", ["layouts are mixed up"]),
    ("wrong offset", "apply_rope", apply_rope_ignores_offset, "position offset", "FAIL",
     ["the offset is ignored"]),
    ("flash without rescaling", "flash_forward", flash_no_rescaling, "several blocks", "FAIL",
     ["rescale", "exp(m_old - m_new)"]),
    ("flash calling SDPA", "flash_forward", flash_calls_sdpa, "shapes", "FORBIDDEN",
     ["must not call torch's scaled_dot_product_attention"]),
    ("flash materialising N x N", "flash_forward", flash_materialises_scores,
     "never builds the N x N matrix", "FAIL", ["materialised a tensor of shape", "1024, 1024)"]),
    ("NaN output", "attention", attention_all_masked_default, "finite values", "FAIL",
     ["NaN"]),
    ("infinite loop", "flash_forward", flash_infinite_loop, "shapes", "TIMEOUT",
     ["stopped after 1 s"]),
    ("infinite loop swallowing exceptions", "flash_forward", flash_swallows_everything, "shapes",
     "TIMEOUT", ["stopped after 1 s"]),
    ("exception", "attention", attention_raises, "shape", "ERROR",
     ["raised IndexError", "heads = q.shape[4]"]),
    ("wrong dtype", "attention", attention_float64, "dtype", "FAIL",
     ["dtype torch.float64, expected torch.float32"]),
    ("wrong device", "attention", attention_wrong_device, "dtype", "FAIL",
     ["is on meta, expected cpu"]),
    ("in-place mutation", "attention", attention_in_place, "shape", "FAIL",
     ["modified its input `q` in place"]),
    ("tuple instead of tensor", "attention", attention_returns_weights, "shape", "FAIL",
     ["should be a torch.Tensor, got a tuple of 2 items"]),
    ("attention calling SDPA", "attention", attention_calls_sdpa, "shape", "FORBIDDEN",
     ["must not call torch's scaled_dot_product_attention"]),
    ("heads split with view", "split_heads", split_heads_view, "values", "FAIL",
     ["x.view(B, H, T, D)"]),
    ("causal without skipping blocks", "flash_forward", flash_no_block_skipping,
     "causal skips", "FAIL", ["skip key blocks entirely above the diagonal"]),
    ("backward through the N x N matrix", "flash_backward", FlashAttentionNaiveBackward,
     "backward never builds", "FAIL", ["materialised a tensor"]),
    ("Triton part written in torch", "triton_forward", triton_forward_in_torch, "shapes",
     "FORBIDDEN", ["must compute inside the kernel"]),
    ("sys.exit in a graded function", "softmax", softmax_exits, "shape", "ERROR",
     ["called sys.exit('done')", "would end the grading process"]),
    ("os._exit in a graded function", "attention", attention_os_exit, "shape", "FORBIDDEN",
     ["called os._exit()", "would end the grading process"]),
    ("gradients turned off globally", "attention", attention_turns_gradients_off, "gradients",
     "FAIL", ["does not require grad"]),
    ("default dtype changed to float64", "rope_cos_sin", rope_cos_sin_float64_default,
     "shapes and dtype", "FAIL", ["dtype torch.float64, expected torch.float32"]),
    ("torch.softmax monkeypatched", "softmax", softmax_patches_torch, "random inputs", "FAIL",
     ["softmax(x, dim=0)", "Normalise along the `dim` argument"]),
    ("default device changed to meta", "attention", attention_on_meta_device, "shape", "ERROR",
     ["raised"]),
    ("timer disarmed", "flash_forward", flash_disarms_the_timer, "shapes", "FORBIDDEN",
     ["signal.signal()", "time limit"]),
    ("unbounded recursion", "softmax", softmax_recursive, "shape", "ERROR",
     ["raised RecursionError"]),
    ("causal mask replaces the mask", "attention", attention_causal_replaces_mask, "causal",
     "FAIL", ["the causal mask alone", "is_causal=True"]),
    ("mask replaces the causal flag", "attention", attention_mask_replaces_causal, "causal",
     "FAIL", ["`attn_mask` alone", "ignores is_causal"]),
    ("split_heads is the course's", "split_heads", split_heads_from_course, "shape",
     "FORBIDDEN", ["utils.attention.split_heads"]),
    ("merge_heads calls the course's", "merge_heads", merge_heads_calls_course, "shape",
     "FORBIDDEN", ["utils.attention.merge_heads"]),
    ("keys ignore the offset", "apply_rope", apply_rope_keys_at_zero, "position offset",
     "FAIL", ["rotated k", "k rotated at positions 0, 1, 2: the offset is ignored"]),
    ("keys ignore the base", "apply_rope", apply_rope_keys_default_base, "base", "FAIL",
     ["rotated k with base 500000", "k rotated with base 10000"]),
    ("keys returned in float32", "apply_rope", apply_rope_keys_float32, "bfloat16", "FAIL",
     ["k_rotated for bfloat16 k", "dtype torch.float32, expected torch.bfloat16"]),
    ("flash lse in bfloat16", "flash_forward", flash_lse_in_input_dtype, "bfloat16", "FAIL",
     ["lse for bfloat16 inputs has dtype torch.bfloat16, expected torch.float32"]),
    ("MHA wrapping torch's", "multi_head_attention", MultiHeadAttentionWrapsTorch, "layers",
     "FORBIDDEN", ["must not use torch.nn.MultiheadAttention"]),
]  # fmt: skip
