"""utils.flash_attention against utils.attention, torch's SDPA, torch.logsumexp and autograd.

Tolerances: float32 atol=1e-5 (rtol=1e-5) against a float64 reference; bfloat16 atol=2e-2
(8 mantissa bits: inputs are rounded to ~4e-3 relative, and outputs of size ~1 are compared).
The Triton kernel runs under Triton's interpreter on CPU (``use_triton_interpreter``, called
by conftest.py) with large blocks and small sizes.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from utils.attention import scaled_dot_product_attention
from utils.flash_attention import (
    FlashAttentionFunction,
    flash_attention,
    flash_attention_backward,
    flash_attention_forward,
    triton_flash_attention_forward,
)
from utils.memory import TensorMemoryTracker, measure_peak_memory

F32 = dict(atol=1e-5, rtol=1e-5)
X32 = torch.zeros(1, 1, 4, 8)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tile ops run much faster on one thread when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_qkv(t, s, d=16, dv=None, b=2, h=3, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, t, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, h, s, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, h, s, dv or d, generator=gen, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def reference_lse(q, k, is_causal=False):
    scores = q.double() @ k.double().transpose(-2, -1) / math.sqrt(q.shape[-1])
    if is_causal:
        t, s = scores.shape[-2:]
        keep = torch.ones(t, s, dtype=torch.bool).tril(s - t)
        scores = scores.masked_fill(~keep, -math.inf)
    return torch.logsumexp(scores, dim=-1)


SHAPES = [(1, 1), (64, 64), (100, 100), (130, 37), (37, 130), (257, 200)]


@pytest.mark.parametrize(
    "t,s,is_causal",
    [(t, s, False) for t, s in SHAPES] + [(t, s, True) for t, s in SHAPES if t <= s],
)
def test_forward_matches_reference(t, s, is_causal):
    q, k, v = make_qkv(t, s, d=16, dv=24)
    out, lse = flash_attention_forward(
        q, k, v, is_causal=is_causal, block_size_q=32, block_size_k=16
    )
    expected = scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=is_causal)
    assert out.dtype == torch.float32 and out.shape == (2, 3, t, 24)
    torch.testing.assert_close(out, expected.float(), **F32)
    assert lse.dtype == torch.float32 and lse.shape == (2, 3, t)
    torch.testing.assert_close(lse, reference_lse(q, k, is_causal).float(), **F32)


@pytest.mark.parametrize("is_causal", [False, True])
def test_forward_matches_torch_sdpa(is_causal):
    q, k, v = make_qkv(200, 200, d=32)  # torch's causal mask is top-left: equal to ours for T == S
    out, _ = flash_attention_forward(q, k, v, is_causal=is_causal)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    torch.testing.assert_close(out, expected, **F32)


def test_block_size_invariance():
    q, k, v = make_qkv(150, 150)
    outs = [
        flash_attention_forward(q, k, v, is_causal=True, block_size_q=bq, block_size_k=bk)
        for bq, bk in [(1, 1), (7, 5), (16, 64), (64, 16), (256, 256)]
    ]
    for out, lse in outs[1:]:
        torch.testing.assert_close(out, outs[0][0], **F32)
        torch.testing.assert_close(lse, outs[0][1], **F32)


def test_large_scores_are_stable():
    q, k, v = make_qkv(70, 70)
    out, lse = flash_attention_forward(q * 300, k * 300, v, block_size_q=16, block_size_k=16)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    expected = scaled_dot_product_attention(q.double() * 300, k.double() * 300, v.double())
    torch.testing.assert_close(out, expected.float(), **F32)
    torch.testing.assert_close(lse, reference_lse(q * 300, k * 300).float(), rtol=1e-5, atol=1e-2)


def test_scale_argument():
    q, k, v = make_qkv(40, 50)
    out, _ = flash_attention_forward(q, k, v, scale=0.5, block_size_q=16, block_size_k=16)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, scale=0.5), **F32)


def test_bfloat16_within_stated_tolerance():
    q, k, v = make_qkv(100, 100, dtype=torch.bfloat16)
    out, lse = flash_attention_forward(q, k, v, is_causal=True, block_size_q=32, block_size_k=32)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    expected = scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    torch.testing.assert_close(out.double(), expected, atol=2e-2, rtol=0)


@pytest.mark.parametrize("t,s,is_causal", [(100, 100, False), (100, 100, True), (37, 90, True)])
def test_backward_matches_autograd_of_reference(t, s, is_causal):
    q, k, v = (x.requires_grad_() for x in make_qkv(t, s, d=16, dv=8))
    grad_out = torch.randn(2, 3, t, 8, generator=torch.Generator().manual_seed(1))
    flash_attention(q, k, v, is_causal, 32, 16).backward(grad_out)
    ours = [x.grad for x in (q, k, v)]
    ref_inputs = [x.detach().double().requires_grad_() for x in (q, k, v)]
    scaled_dot_product_attention(*ref_inputs, is_causal=is_causal).backward(grad_out.double())
    for got, ref_input in zip(ours, ref_inputs, strict=True):
        torch.testing.assert_close(got, ref_input.grad.float(), **F32)


def test_backward_gradcheck_float64():
    inputs = [x[:1, :1].requires_grad_() for x in make_qkv(11, 13, d=4, dtype=torch.float64)]
    assert torch.autograd.gradcheck(lambda q, k, v: flash_attention(q, k, v, False, 4, 3), inputs)
    inputs = [x[:1, :1].requires_grad_() for x in make_qkv(9, 13, d=4, dtype=torch.float64)]
    assert torch.autograd.gradcheck(lambda q, k, v: flash_attention(q, k, v, True, 4, 3), inputs)


def test_function_saves_lse_not_weights():
    q, k, v = (x.requires_grad_() for x in make_qkv(96, 96))
    out = FlashAttentionFunction.apply(q, k, v, True, 32, 32, None)
    saved = [tuple(x.shape) for x in out.grad_fn.saved_tensors]
    assert saved == [(2, 3, 96, 16)] * 4 + [(2, 3, 96)]


def test_backward_function_matches_autograd_wrapper():
    q, k, v = make_qkv(50, 60)
    out, lse = flash_attention_forward(q, k, v)
    grad_out = torch.ones_like(out)
    grads = flash_attention_backward(grad_out, q, k, v, out, lse, block_size_q=8, block_size_k=64)
    inputs = [x.clone().requires_grad_() for x in (q, k, v)]
    flash_attention(*inputs).backward(grad_out)
    for got, x in zip(grads, inputs, strict=True):
        torch.testing.assert_close(got, x.grad, **F32)


def test_never_builds_the_score_matrix():
    q, k, v = make_qkv(1024, 1024, d=32, b=1, h=2)
    with TensorMemoryTracker(inputs=(q, k, v)) as tracker:
        flash_attention_forward(q, k, v, is_causal=True)
    numel, shape, _ = tracker.largest
    assert numel <= q.numel(), f"largest tensor {shape}"  # output-sized, never 1024 x 1024
    with TensorMemoryTracker(inputs=(q, k, v)) as naive:
        scaled_dot_product_attention(q, k, v)
    assert naive.largest[0] == 2 * 1024 * 1024  # the tracker does see the score matrices


def test_peak_memory_is_a_small_fraction_of_naive():
    q, k, v = make_qkv(2048, 2048, d=64, b=1, h=1)
    _, flash_peak = measure_peak_memory(flash_attention_forward, q, k, v)
    _, naive_peak = measure_peak_memory(scaled_dot_product_attention, q, k, v)
    assert naive_peak >= 2 * 2048 * 2048 * 4  # scores and weights, float32
    assert flash_peak <= naive_peak / 8


def test_causal_skips_masked_blocks():
    q, k, v = make_qkv(256, 256, b=1, h=1)
    counts = []
    for is_causal in (False, True):
        with TensorMemoryTracker() as tracker:
            flash_attention_forward(q, k, v, is_causal=is_causal, block_size_q=32, block_size_k=32)
        counts.append(tracker.op_counts["exp"])
    # 8 x 8 blocks, two exps each; causal visits the 36 blocks on or below the diagonal
    assert counts == [2 * 64, 2 * 36]


@pytest.mark.parametrize(
    "args,error",
    [
        ((torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.zeros(2, 3, 4)), "shape \\(B, H"),
        ((torch.zeros(1, 1, 4, 8), torch.zeros(1, 1, 4, 6), torch.zeros(1, 1, 4, 8)), "head dim"),
        ((torch.zeros(1, 1, 4, 8), torch.zeros(1, 1, 5, 8), torch.zeros(1, 1, 4, 8)), "length"),
        ((X32, X32.double(), X32), "dtype"),
        ((torch.zeros(1, 1, 4, 8, dtype=torch.long),) * 3, "floating-point"),
    ],
)
def test_bad_input_raises_value_error(args, error):
    with pytest.raises(ValueError, match=error):
        flash_attention_forward(*args)


def test_bad_input_types_and_options():
    x = torch.zeros(1, 1, 4, 8)
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        flash_attention_forward(x.tolist(), x, x)
    with pytest.raises(ValueError, match="T <= S"):
        flash_attention_forward(torch.zeros(1, 1, 5, 8), x, x, is_causal=True)
    with pytest.raises(ValueError, match="block_size_k"):
        flash_attention_forward(x, x, x, block_size_k=0)
    with pytest.raises(ValueError, match="power of two"):
        triton_flash_attention_forward(x, x, x, block_size_q=48)


@pytest.mark.parametrize(
    "t,s,d,is_causal", [(100, 100, 16, False), (100, 100, 16, True), (40, 150, 24, True)]
)
def test_triton_kernel_under_interpreter(t, s, d, is_causal):
    q, k, v = make_qkv(t, s, d=d, b=1, h=2)
    out, lse = triton_flash_attention_forward(
        q, k, v, is_causal=is_causal, block_size_q=64, block_size_k=64
    )
    expected = scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=is_causal)
    torch.testing.assert_close(out, expected.float(), **F32)
    torch.testing.assert_close(lse, reference_lse(q, k, is_causal).float(), **F32)


def test_triton_kernel_float16():
    q, k, v = make_qkv(64, 64, b=1, h=1, dtype=torch.float16)
    out, _ = triton_flash_attention_forward(q, k, v, block_size_q=64, block_size_k=64)
    assert out.dtype == torch.float16
    expected = scaled_dot_product_attention(q.double(), k.double(), v.double())
    torch.testing.assert_close(out.double(), expected, atol=2e-3, rtol=0)  # float16: 11 bits
