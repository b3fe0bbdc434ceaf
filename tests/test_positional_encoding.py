"""utils.positional_encoding against closed forms, the papers and Hugging Face transformers."""

import math

import pytest
import torch
from torch.testing import assert_close
from transformers import LlamaConfig, T5Config
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
from transformers.models.t5.modeling_t5 import T5Attention

from utils.positional_encoding import (
    LearnedPositionalEmbedding,
    RelativePositionBias,
    RotaryEmbedding,
    SinusoidalPositionalEncoding,
    alibi_bias,
    alibi_slopes,
    relative_position_bucket,
    sinusoidal_encoding,
)

TOL = {"atol": 1e-5, "rtol": 1e-5}


# --- sinusoidal and learned absolute positions --------------------------------------------------


@pytest.mark.parametrize(("pos", "i"), [(0, 0), (1, 0), (3, 1), (17, 5), (42, 31), (99, 12)])
def test_sinusoidal_closed_form(pos, i):
    """PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] = cos(pos / 10000^(2i/d))."""
    dim = 64
    table = sinusoidal_encoding(100, dim)
    angle = pos / 10000 ** (2 * i / dim)
    assert table.shape == (100, dim)
    assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-5)
    assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-5)


def test_sinusoidal_other_base_and_odd_dim():
    table = sinusoidal_encoding(10, 8, base=100.0)
    assert table[7, 2].item() == pytest.approx(math.sin(7 / 100 ** (2 / 8)), abs=1e-6)
    with pytest.raises(ValueError, match="even n_embd, got 7"):
        sinusoidal_encoding(10, 7)


def test_sinusoidal_module_adds_rows_from_offset():
    module = SinusoidalPositionalEncoding(16, block_size=32)
    x = torch.randn(2, 5, 16)
    assert_close(module(x, offset=10), x + sinusoidal_encoding(32, 16)[10:15], **TOL)
    with pytest.raises(ValueError, match=r"positions 30..34 exceed block_size=32"):
        module(x, offset=30)


def test_learned_module_adds_rows_from_offset():
    torch.manual_seed(0)
    module = LearnedPositionalEmbedding(block_size=20, n_embd=8)
    x = torch.randn(3, 4, 8)
    assert_close(module(x, offset=7), x + module.embedding.weight[7:11], **TOL)
    with pytest.raises(ValueError, match=r"positions 18..21 exceed block_size=20"):
        module(x, offset=18)
    with pytest.raises(ValueError, match=r"positions -1..2 exceed"):
        module(x, offset=-1)


# --- RoPE ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("head_dim", "base", "offset"), [(16, 10000.0, 0), (32, 500000.0, 37)])
def test_rotary_matches_hugging_face_llama(head_dim, base, offset):
    heads, length = 3, 9
    config = LlamaConfig(
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        head_dim=head_dim,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": base},
    )
    hf_rotary = LlamaRotaryEmbedding(config)
    q, k = torch.randn(2, heads, length, head_dim), torch.randn(2, heads, length, head_dim)
    position_ids = torch.arange(offset, offset + length)[None].expand(2, -1)  # (B, T)
    cos, sin = hf_rotary(q, position_ids)
    expected_q, expected_k = apply_rotary_pos_emb(q, k, cos, sin)
    got_q, got_k = RotaryEmbedding(head_dim, base=base)(q, k, offset=offset)
    assert_close(got_q, expected_q, **TOL)
    assert_close(got_k, expected_k, **TOL)


def meta_llama_rotary(x, base: float, offset: int):
    """The complex-number form (Su et al. 2021; Meta's Llama reference code): pair features
    (2i, 2i+1) as a complex number and multiply by exp(i * position * theta_i). x: (B, H, T, D)."""
    dim, length = x.shape[-1], x.shape[-2]
    freqs = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = torch.outer(torch.arange(offset, offset + length, dtype=torch.float64), freqs)
    rotation = torch.polar(torch.ones_like(angles), angles)  # (T, D/2) unit complex numbers
    pairs = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * rotation).flatten(-2).float()


@pytest.mark.parametrize("offset", [0, 5, 123])
def test_rotary_interleaved_matches_complex_multiplication(offset):
    q, k = torch.randn(2, 4, 7, 16), torch.randn(2, 4, 7, 16)
    got_q, got_k = RotaryEmbedding(16, interleaved=True)(q, k, offset=offset)
    assert_close(got_q, meta_llama_rotary(q, 10000.0, offset), **TOL)
    assert_close(got_k, meta_llama_rotary(k, 10000.0, offset), **TOL)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rotary_scores_depend_only_on_relative_position(interleaved):
    """<R(m) q, R(n) k> is the same for every (m + s, n + s)."""
    rotary = RotaryEmbedding(32, interleaved=interleaved)
    q, k = torch.randn(12, 32), torch.randn(12, 32)
    reference = rotary.rotate(q) @ rotary.rotate(k).T  # (T, S): query at i, key at j
    for shift in (1, 7, 50, 200):
        shifted = rotary.rotate(q, offset=shift) @ rotary.rotate(k, offset=shift).T
        # float32 angles at position ~200 carry ~1e-5 rad of rounding and scores are ~|q||k|
        # ~ 32, so the error grows to ~4e-5 here: atol=1e-4 instead of 1e-5.
        assert_close(shifted, reference, atol=1e-4, rtol=1e-5)
    # Control: moving only the queries changes the relative positions, hence the scores.
    moved = rotary.rotate(q, offset=7) @ rotary.rotate(k).T
    assert (moved - reference).abs().max() > 1.0


def test_rotary_preserves_norm_and_position_zero_is_identity():
    rotary = RotaryEmbedding(8)
    x = torch.randn(3, 5, 8)
    assert_close(rotary.rotate(x).norm(dim=-1), x.norm(dim=-1), **TOL)
    assert_close(rotary.rotate(x)[:, 0], x[:, 0], **TOL)


def test_rotary_bad_inputs_raise():
    with pytest.raises(ValueError, match="even head_dim, got 7"):
        RotaryEmbedding(7)
    with pytest.raises(ValueError, match=r"expected last dimension 8, got \(2, 3, 6\)"):
        RotaryEmbedding(8).rotate(torch.randn(2, 3, 6))


# --- relative positions: T5 buckets and ALiBi ---------------------------------------------------


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize(("num_buckets", "max_distance"), [(32, 128), (16, 40)])
def test_relative_position_bucket_matches_t5(bidirectional, num_buckets, max_distance):
    offsets = torch.arange(-300, 301)
    expected = T5Attention._relative_position_bucket(
        offsets, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
    )
    got = relative_position_bucket(offsets, bidirectional, num_buckets, max_distance)
    assert torch.equal(got, expected)
    assert got.min() >= 0 and got.max() == num_buckets - 1


@pytest.mark.parametrize(("is_decoder", "offset"), [(False, 0), (True, 3)])
def test_relative_position_bias_matches_t5_compute_bias(is_decoder, offset):
    config = T5Config(
        d_model=16,
        d_kv=4,
        num_heads=4,
        relative_attention_num_buckets=16,
        relative_attention_max_distance=32,
        is_decoder=is_decoder,
    )
    t5 = T5Attention(config, has_relative_attention_bias=True, layer_idx=0)
    ours = RelativePositionBias(4, num_buckets=16, max_distance=32, bidirectional=not is_decoder)
    ours.bias.weight.data.copy_(t5.relative_attention_bias.weight)
    expected = t5.compute_bias(5, 40, past_seen_tokens=offset)
    got = ours(5, 40, offset=offset)
    assert got.shape == (1, 4, 5, 40)
    assert_close(got, expected, **TOL)


def alibi_paper_slopes(n: int) -> list[float]:
    """get_slopes from the ALiBi authors' repository (ofirpress/attention_with_linear_biases)."""

    def power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + alibi_paper_slopes(2 * closest)[0::2][: n - closest]


def test_alibi_slopes_for_eight_heads_are_the_papers():
    expected = torch.tensor([1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64, 1 / 128, 1 / 256])
    assert_close(alibi_slopes(8), expected, **TOL)


@pytest.mark.parametrize("n_head", [1, 2, 6, 12, 16, 20, 24])
def test_alibi_slopes_match_reference_rule(n_head):
    assert_close(alibi_slopes(n_head), torch.tensor(alibi_paper_slopes(n_head)), **TOL)


def test_alibi_slopes_for_twelve_heads_by_hand():
    """8 heads' slopes, then every other slope of the 16-head sequence 2^(-k/2)."""
    by_hand = [2.0 ** -(i + 1) for i in range(8)] + [2.0**-0.5, 2.0**-1.5, 2.0**-2.5, 2.0**-3.5]
    assert_close(alibi_slopes(12), torch.tensor(by_hand), **TOL)


def test_alibi_bias_is_minus_slope_times_distance():
    bias = alibi_bias(4, query_len=3, key_len=6)  # queries are positions 3, 4, 5
    slopes = alibi_slopes(4)
    assert bias.shape == (1, 4, 3, 6)
    for h in range(4):
        for i in range(3):
            for j in range(3 + i + 1):  # the keys a causal query sees
                assert bias[0, h, i, j].item() == pytest.approx(
                    -slopes[h].item() * (3 + i - j), abs=1e-6
                )
