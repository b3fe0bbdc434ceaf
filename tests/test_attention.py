"""utils.attention against PyTorch's own attention (float32, atol=1e-5 unless stated)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from utils.attention import (
    KVCache,
    MultiHeadAttention,
    causal_mask,
    merge_heads,
    scaled_dot_product_attention,
    split_heads,
)
from utils.positional_encoding import RotaryEmbedding

TOL = {"atol": 1e-5, "rtol": 1e-5}


def random_qkv(q_shape, k_shape, v_dim=None, seed=0):
    """Random q (q_shape), k (k_shape), v (k_shape with last dim v_dim) that require grad."""
    gen = torch.Generator().manual_seed(seed)
    v_shape = (*k_shape[:-1], v_dim or k_shape[-1])
    return [torch.randn(s, generator=gen).requires_grad_() for s in (q_shape, k_shape, v_shape)]


def assert_same_as_torch(q, k, v, ours_kwargs, torch_kwargs=None):
    """Outputs and gradients w.r.t. q, k, v of ours and F.scaled_dot_product_attention agree."""
    torch_kwargs = ours_kwargs if torch_kwargs is None else torch_kwargs
    grad_out = torch.randn(
        torch.broadcast_shapes(q.shape[:-2], k.shape[:-2]) + (q.shape[-2], v.shape[-1])
    )
    ours = scaled_dot_product_attention(q, k, v, **ours_kwargs)
    our_grads = torch.autograd.grad(ours, (q, k, v), grad_out)
    ref = F.scaled_dot_product_attention(q, k, v, **torch_kwargs)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    assert_close(ours, ref, **TOL)
    for ours_g, ref_g in zip(our_grads, ref_grads, strict=True):
        assert_close(ours_g, ref_g, **TOL)


# --- scaled_dot_product_attention ------------------------------------------------------------


def test_no_mask_matches_torch():
    q, k, v = random_qkv((2, 3, 5, 8), (2, 3, 7, 8), v_dim=6)
    assert_same_as_torch(q, k, v, {})


@pytest.mark.parametrize("mask_shape", [(5, 7), (2, 1, 5, 7), (2, 3, 5, 7), (1, 3, 1, 7)])
def test_boolean_mask_matches_torch(mask_shape):
    q, k, v = random_qkv((2, 3, 5, 8), (2, 3, 7, 8))
    mask = torch.rand(mask_shape, generator=torch.Generator().manual_seed(1)) > 0.3
    mask[..., 0] = True  # every query keeps at least one key (torch's math path NaNs otherwise)
    assert_same_as_torch(q, k, v, {"attn_mask": mask}, {"attn_mask": mask})


@pytest.mark.parametrize("mask_shape", [(5, 7), (2, 3, 5, 7)])
def test_additive_float_mask_matches_torch(mask_shape):
    q, k, v = random_qkv((2, 3, 5, 8), (2, 3, 7, 8))
    gen = torch.Generator().manual_seed(2)
    bias = torch.randn(mask_shape, generator=gen)
    bias = bias.masked_fill(torch.rand(mask_shape, generator=gen) > 0.7, float("-inf"))
    bias[..., 0] = 0.0
    assert_same_as_torch(q, k, v, {"attn_mask": bias}, {"attn_mask": bias})


def test_is_causal_square_matches_torch():
    q, k, v = random_qkv((2, 3, 6, 8), (2, 3, 6, 8))
    assert_same_as_torch(q, k, v, {"is_causal": True})


def test_is_causal_combined_with_boolean_mask():
    q, k, v = random_qkv((2, 2, 6, 4), (2, 2, 6, 4))
    padding = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])[:, None, None, :]
    explicit = padding & torch.ones(6, 6, dtype=torch.bool).tril()
    assert_same_as_torch(
        q, k, v, {"attn_mask": padding, "is_causal": True}, {"attn_mask": explicit}
    )


def test_custom_scale_matches_torch():
    q, k, v = random_qkv((2, 5, 8), (2, 7, 8))
    assert_same_as_torch(q, k, v, {"scale": 0.37})


def test_batch_broadcasting_matches_torch():
    # One set of keys/values shared by every batch element and head.
    q, k, v = random_qkv((4, 3, 5, 8), (1, 1, 7, 8))
    assert_same_as_torch(q, k, v, {})


def test_causal_is_bottom_right_aligned_when_queries_are_fewer():
    """With a KV cache, the T new queries are the last T positions of the S keys."""
    q, k, v = random_qkv((2, 3, 8), (2, 7, 8))
    explicit = torch.tensor(
        [[j <= 4 + i for j in range(7)] for i in range(3)]  # query i is at position S - T + i
    )
    assert torch.equal(causal_mask(3, 7), explicit)
    assert_same_as_torch(q, k, v, {"is_causal": True}, {"attn_mask": explicit})


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_fully_masked_rows_give_zeros_and_finite_gradients(kind):
    q, k, v = random_qkv((1, 4, 8), (1, 6, 8))
    allowed = torch.ones(4, 6, dtype=torch.bool)
    allowed[2] = False  # query 2 may see nothing
    mask = allowed if kind == "bool" else torch.zeros(4, 6).masked_fill(~allowed, float("-inf"))
    out, weights = scaled_dot_product_attention(q, k, v, mask, return_weights=True)
    assert torch.equal(out[0, 2], torch.zeros(8))
    assert torch.equal(weights[0, 2], torch.zeros(6))
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)
    # The other rows are untouched: same as attention over those queries alone.
    keep = [0, 1, 3]
    assert_close(out[:, keep], scaled_dot_product_attention(q[:, keep], k, v), **TOL)


def test_returned_weights_are_softmax_rows():
    q, k, v = random_qkv((2, 3, 5, 8), (2, 3, 7, 8))
    out, weights = scaled_dot_product_attention(q, k, v, is_causal=False, return_weights=True)
    assert weights.shape == (2, 3, 5, 7)
    assert_close(weights.sum(-1), torch.ones(2, 3, 5), **TOL)
    assert_close(weights, torch.softmax(q @ k.transpose(-2, -1) / 8**0.5, dim=-1), **TOL)
    assert_close(out, weights @ v, **TOL)


def test_dropout_zeroes_weights_and_rescales_the_rest():
    q, k, v = random_qkv((4, 4, 32, 16), (4, 4, 32, 16))
    p = 0.25
    _, clean = scaled_dot_product_attention(q, k, v, return_weights=True)
    torch.manual_seed(0)
    out, dropped = scaled_dot_product_attention(q, k, v, dropout_p=p, return_weights=True)
    zeroed = dropped == 0
    assert 0.2 < zeroed.float().mean().item() < 0.3  # 16384 Bernoulli(0.25) draws
    assert_close(dropped[~zeroed], clean[~zeroed] / (1 - p), **TOL)  # inverted dropout
    assert_close(out, dropped @ v, **TOL)
    torch.manual_seed(0)  # the same seed reproduces F.dropout's draw exactly
    assert torch.equal(dropped, F.dropout(clean, p=p, training=True))


def test_split_and_merge_heads_are_inverse():
    x = torch.randn(2, 5, 12)
    heads = split_heads(x, 3)
    assert heads.shape == (2, 3, 5, 4)
    assert torch.equal(heads[:, 1], x[..., 4:8])
    assert torch.equal(merge_heads(heads), x)


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        (
            (torch.randn(8), torch.randn(3, 8), torch.randn(3, 8)),
            {},
            ValueError,
            r"q must have shape",
        ),
        (
            (torch.randn(2, 8), torch.randn(3, 4), torch.randn(3, 4)),
            {},
            ValueError,
            r"same last dim",
        ),
        ((torch.randn(2, 8), torch.randn(3, 8), torch.randn(4, 8)), {}, ValueError, r"same length"),
        ((torch.ones(2, 8, dtype=torch.long),) * 3, {}, ValueError, r"q must be a floating.*int64"),
        (
            ([[1.0]], torch.randn(1, 1), torch.randn(1, 1)),
            {},
            TypeError,
            r"q must be a torch.Tensor",
        ),
        (
            (torch.randn(2, 2, 8), torch.randn(2, 3, 8).double(), torch.randn(2, 3, 8)),
            {},
            ValueError,
            r"share a dtype",
        ),
        (
            (torch.randn(2, 4, 8), torch.randn(3, 5, 8), torch.randn(3, 5, 8)),
            {},
            ValueError,
            r"batch dimensions .* do not broadcast",
        ),
        (
            (torch.randn(2, 4, 8), torch.randn(2, 5, 8), torch.randn(2, 5, 8)),
            {"attn_mask": torch.ones(4, 6, dtype=torch.bool)},
            ValueError,
            r"attn_mask of shape \(4, 6\) does not broadcast .* \(2, 4, 5\)",
        ),
        (
            (torch.randn(4, 8), torch.randn(5, 8), torch.randn(5, 8)),
            {"attn_mask": torch.ones(4, 5, dtype=torch.long)},
            ValueError,
            r"attn_mask must be bool .*int64",
        ),
        (
            (torch.randn(4, 8), torch.randn(5, 8), torch.randn(5, 8)),
            {"attn_mask": [[True] * 5] * 4},
            TypeError,
            r"attn_mask must be a torch.Tensor",
        ),
        (
            (torch.randn(4, 8), torch.randn(5, 8), torch.randn(5, 8)),
            {"dropout_p": 1.0},
            ValueError,
            r"dropout_p",
        ),
        (
            (torch.randn(6, 8), torch.randn(5, 8), torch.randn(5, 8)),
            {"is_causal": True},
            ValueError,
            r"query_len <= key_len, got 6 > 5",
        ),
    ],
)
def test_attention_bad_inputs_raise(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        scaled_dot_product_attention(*args, **kwargs)


# --- MultiHeadAttention vs torch.nn.MultiheadAttention -----------------------------------------


E, H, B, T = 16, 4, 2, 6


def torch_mha_and_ours(fused: bool, kv_dim: int | None = None):
    """A torch.nn.MultiheadAttention and our module with the same weights."""
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(E, H, batch_first=True, kdim=kv_dim, vdim=kv_dim).eval()
    ours = MultiHeadAttention(E, H, kv_dim=kv_dim, fused=fused).eval()
    with torch.no_grad():
        nn.init.normal_(ref.in_proj_bias)  # torch initialises biases to zero; make them count
        nn.init.normal_(ref.out_proj.bias)
        if kv_dim is None:
            w_q, w_k, w_v = ref.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = ref.q_proj_weight, ref.k_proj_weight, ref.v_proj_weight
        b_q, b_k, b_v = ref.in_proj_bias.chunk(3)
        if fused:
            ours.qkv.weight.copy_(ref.in_proj_weight)
            ours.qkv.bias.copy_(ref.in_proj_bias)
        else:
            for proj, w, b in (
                (ours.q_proj, w_q, b_q),
                (ours.k_proj, w_k, b_k),
                (ours.v_proj, w_v, b_v),
            ):
                proj.weight.copy_(w)
                proj.bias.copy_(b)
        ours.out_proj.load_state_dict(ref.out_proj.state_dict())
    return ref, ours


@pytest.mark.parametrize("fused", [False, True])
def test_mha_self_attention_matches_torch(fused):
    ref, ours = torch_mha_and_ours(fused)
    x = torch.randn(B, T, E, requires_grad=True)
    expected, _ = ref(x, x, x, need_weights=False)
    got = ours(x)
    assert_close(got, expected, **TOL)
    grad_ours, grad_ref = (torch.autograd.grad(y.square().sum(), x)[0] for y in (got, expected))
    assert_close(grad_ours, grad_ref, **TOL)


@pytest.mark.parametrize("fused", [False, True])
def test_mha_causal_matches_torch(fused):
    ref, ours = torch_mha_and_ours(fused)
    x = torch.randn(B, T, E)
    forbidden = ~torch.ones(T, T, dtype=torch.bool).tril()  # torch: True = may NOT attend
    expected, _ = ref(x, x, x, attn_mask=forbidden, need_weights=False)
    assert_close(ours(x, is_causal=True), expected, **TOL)
    assert_close(ours(x, attn_mask=~forbidden), expected, **TOL)


def test_mha_key_padding_matches_torch():
    ref, ours = torch_mha_and_ours(fused=False)
    x = torch.randn(B, T, E)
    real = torch.tensor([[True] * T, [True] * 3 + [False] * (T - 3)])  # ours: True = real token
    expected, _ = ref(x, x, x, key_padding_mask=~real, need_weights=False)  # torch: True = pad
    assert_close(ours(x, attention_mask=real), expected, **TOL)
    # Combined with an additive mask: padding becomes -inf and is added.
    bias = torch.randn(T, T)
    padding = torch.zeros(B, T).masked_fill(~real, float("-inf"))  # torch wants one mask type
    expected, _ = ref(x, x, x, attn_mask=bias, key_padding_mask=padding, need_weights=False)
    assert_close(ours(x, attn_mask=bias, attention_mask=real), expected, **TOL)


def test_mha_cross_attention_with_other_kv_dim_matches_torch():
    ref, ours = torch_mha_and_ours(fused=False, kv_dim=10)
    query, memory = torch.randn(B, T, E), torch.randn(B, 9, 10)
    real = torch.ones(B, 9, dtype=torch.bool)
    real[0, 7:] = False
    expected, _ = ref(query, memory, memory, key_padding_mask=~real, need_weights=False)
    assert_close(ours(query, memory, attention_mask=real), expected, **TOL)


def test_mha_fused_cross_attention_matches_torch():
    ref, ours = torch_mha_and_ours(fused=True)
    query, memory = torch.randn(B, T, E), torch.randn(B, 9, E)
    expected, _ = ref(query, memory, memory, need_weights=False)
    assert_close(ours(query, memory), expected, **TOL)


def test_mha_weights_match_torch_per_head_and_averaged():
    ref, ours = torch_mha_and_ours(fused=False)
    x = torch.randn(B, T, E)
    out, weights = ours(x, is_causal=True, need_weights=True)
    assert weights.shape == (B, H, T, T)
    forbidden = ~torch.ones(T, T, dtype=torch.bool).tril()
    _, averaged = ref(x, x, x, attn_mask=forbidden)  # torch averages over heads by default
    _, per_head = ref(x, x, x, attn_mask=forbidden, average_attn_weights=False)
    assert_close(weights.mean(dim=1), averaged, **TOL)
    assert_close(weights, per_head, **TOL)


def test_mha_dropout_only_in_training():
    torch.manual_seed(0)
    mha = MultiHeadAttention(E, H, dropout=0.5)
    x = torch.randn(B, T, E)
    mha.eval()
    assert torch.equal(mha(x), mha(x))
    mha.train()
    _, weights = mha(x, need_weights=True)
    assert (weights == 0).any()


# --- grouped-query attention and the KV cache --------------------------------------------------


def test_gqa_equals_mha_with_repeated_kv_heads():
    """GQA with H_kv heads == standard MHA whose K/V projections repeat each head H/H_kv times."""
    torch.manual_seed(0)
    heads, kv_heads, head_dim = 6, 2, 4
    gqa = MultiHeadAttention(24, heads, n_kv_head=kv_heads).eval()
    mha = MultiHeadAttention(24, heads).eval()
    repeat = heads // kv_heads
    with torch.no_grad():
        mha.q_proj.load_state_dict(gqa.q_proj.state_dict())
        mha.out_proj.load_state_dict(gqa.out_proj.state_dict())
        for src, dst in ((gqa.k_proj, mha.k_proj), (gqa.v_proj, mha.v_proj)):
            dst.weight.copy_(
                src.weight.view(kv_heads, head_dim, 24).repeat_interleave(repeat, 0).flatten(0, 1)
            )
            dst.bias.copy_(src.bias.view(kv_heads, head_dim).repeat_interleave(repeat, 0).flatten())
    x = torch.randn(B, T, 24)
    assert gqa.k_proj.weight.shape == (kv_heads * head_dim, 24)
    assert_close(gqa(x, is_causal=True), mha(x, is_causal=True), **TOL)


def test_gqa_matches_torch_enable_gqa():
    torch.manual_seed(0)
    gqa = MultiHeadAttention(32, 8, n_kv_head=2, bias=False).eval()
    x = torch.randn(B, T, 32)
    q = gqa.q_proj(x).view(B, T, 8, 4).transpose(1, 2)
    k = gqa.k_proj(x).view(B, T, 2, 4).transpose(1, 2)
    v = gqa.v_proj(x).view(B, T, 2, 4).transpose(1, 2)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert_close(gqa(x, is_causal=True), gqa.out_proj(merge_heads(ref)), **TOL)


@pytest.mark.parametrize(
    ("n_kv_head", "rotary", "chunks"),
    [(None, False, [1] * 7), (None, True, [1] * 7), (2, True, [3, 1, 2, 1])],
)
def test_kv_cache_step_by_step_equals_full_causal_forward(n_kv_head, rotary, chunks):
    torch.manual_seed(0)
    mha = MultiHeadAttention(
        E, H, n_kv_head=n_kv_head, rotary=RotaryEmbedding(E // H) if rotary else None
    ).eval()
    x = torch.randn(B, sum(chunks), E)
    full = mha(x, is_causal=True)
    cache, outputs, start = KVCache(), [], 0
    for size in chunks:
        outputs.append(mha(x[:, start : start + size], is_causal=True, kv_cache=cache))
        start += size
        assert len(cache) == start
    assert cache.k.shape == (B, n_kv_head or H, start, E // H)
    assert_close(torch.cat(outputs, dim=1), full, **TOL)


def test_kv_cache_with_attention_mask_covers_cached_keys():
    torch.manual_seed(0)
    mha = MultiHeadAttention(E, H).eval()
    x = torch.randn(B, 5, E)
    real = torch.tensor([[False, True, True, True, True], [True] * 5])  # left padding
    full = mha(x, attention_mask=real, is_causal=True)
    cache = KVCache()
    mha(x[:, :4], attention_mask=real[:, :4], is_causal=True, kv_cache=cache)
    last = mha(x[:, 4:], attention_mask=real, is_causal=True, kv_cache=cache)
    assert_close(last, full[:, 4:], **TOL)


def test_kv_cache_reorder_continues_the_chosen_rows():
    """After reorder(index), decoding row i continues the sequence of row index[i] (what
    beam search needs): equal to running the reordered sequences from scratch."""
    torch.manual_seed(0)
    mha = MultiHeadAttention(E, H).eval()
    x = torch.randn(3, 5, E)
    index = torch.tensor([2, 0, 2, 1])
    cache = KVCache()
    mha(x[:, :4], is_causal=True, kv_cache=cache)
    cache.reorder(index)
    step = mha(x[index, 4:], is_causal=True, kv_cache=cache)
    assert len(cache) == 5 and cache.k.shape[0] == 4
    assert_close(step, mha(x[index], is_causal=True)[:, 4:], **TOL)


# --- MultiHeadAttention bad inputs ---------------------------------------------------------------


def test_mha_constructor_errors():
    with pytest.raises(ValueError, match=r"n_embd=10 is not divisible by n_head=4"):
        MultiHeadAttention(10, 4)
    with pytest.raises(ValueError, match=r"n_head=6 is not divisible by n_kv_head=4"):
        MultiHeadAttention(24, 6, n_kv_head=4)
    with pytest.raises(ValueError, match=r"fused=True needs kv_dim == n_embd"):
        MultiHeadAttention(16, 4, kv_dim=8, fused=True)


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        ((torch.randn(B, T, 8),), {}, ValueError, r"query must be \(B, T, 16\), got \(2, 6, 8\)"),
        ((torch.randn(T, E),), {}, ValueError, r"query must be \(B, T, 16\), got \(6, 16\)"),
        (
            (torch.ones(B, T, E, dtype=torch.int32),),
            {},
            ValueError,
            r"query must be a floating.*int32",
        ),
        (
            (torch.randn(B, T, E), torch.randn(B, 4, 8)),
            {},
            ValueError,
            r"key_value must be \(B, S, 16\)",
        ),
        (
            (torch.randn(B, T, E), torch.randn(3, 4, E)),
            {},
            ValueError,
            r"batch sizes differ: 2 vs 3",
        ),
        (
            (torch.randn(B, T, E),),
            {"attention_mask": torch.ones(B, T + 1, dtype=torch.bool)},
            ValueError,
            r"attention_mask must be a bool tensor of shape \(B, S\) = \(2, 6\).*\(2, 7\)",
        ),
        (
            (torch.randn(B, T, E),),
            {"attention_mask": torch.ones(B, T)},
            ValueError,
            r"attention_mask must be a bool tensor.*torch.float32",
        ),
        (
            (torch.randn(B, T, E),),
            {"attention_mask": [[True] * T] * B},
            TypeError,
            r"attention_mask must be a torch",
        ),
        (
            (torch.randn(B, T, E),),
            {"attn_mask": torch.ones(T, T + 2, dtype=torch.bool)},
            ValueError,
            r"attn_mask of shape \(6, 8\) does not broadcast",
        ),
    ],
)
def test_mha_bad_inputs_raise(args, kwargs, error, match):
    mha = MultiHeadAttention(E, H)
    with pytest.raises(error, match=match):
        mha(*args, **kwargs)
