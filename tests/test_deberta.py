"""utils.deberta: the disentangled attention on a hand-worked case and basic properties."""

import math

import pytest
import torch

from utils.deberta import DisentangledSelfAttention, relative_distance_index


def test_relative_distance_index_hand_case():
    # k = 2: i - j clipped to [-2, 1], shifted by 2
    expected = torch.tensor([[2, 1, 0, 0], [3, 2, 1, 0], [3, 3, 2, 1], [3, 3, 3, 2]])
    assert torch.equal(relative_distance_index(4, 2), expected)
    with pytest.raises(ValueError, match="max_distance"):
        relative_distance_index(4, 0)


def hand_module() -> DisentangledSelfAttention:
    """E = D = H = 1, k = 1, every projection the identity, relative embeddings (0.5, -1)."""
    module = DisentangledSelfAttention(1, 1, max_distance=1, bias=False)
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(1.0)
        module.relative.weight.copy_(torch.tensor([[0.5], [-1.0]]))
    return module


def test_hand_worked_scores_and_output():
    """x = (1, 2); d(0,0) = d(1,0) = d(1,1) = 1, d(0,1) = 0, so with P = (0.5, -1):
    A[0,0] = 1*1 + 1*P1 + 1*P1 = -1      A[0,1] = 1*2 + 1*P0 + 2*P1 = 0.5
    A[1,0] = 2*1 + 2*P1 + 1*P0 = 0.5     A[1,1] = 2*2 + 2*P1 + 2*P1 = 0
    all divided by sqrt(3 D) = sqrt(3)."""
    module, x = hand_module(), torch.tensor([[[1.0], [2.0]]])
    expected = torch.tensor([[-1.0, 0.5], [0.5, 0.0]]) / math.sqrt(3)
    torch.testing.assert_close(module.scores(x)[0, 0], expected, atol=1e-6, rtol=0)
    weights = torch.softmax(expected, dim=-1)
    out, w = module(x, need_weights=True)
    torch.testing.assert_close(w[0, 0], weights, atol=1e-6, rtol=0)
    torch.testing.assert_close(out[0, :, 0], weights @ torch.tensor([1.0, 2.0]), atol=1e-6, rtol=0)


def test_without_position_terms_it_is_plain_attention():
    """Zero relative embeddings and biases: only content-to-content remains, scaled by
    1/sqrt(3D) instead of 1/sqrt(D): equal to SDPA with that scale."""
    torch.manual_seed(0)
    module = DisentangledSelfAttention(8, 2, max_distance=3, bias=False)
    with torch.no_grad():
        module.relative.weight.zero_()
    x = torch.randn(2, 5, 8)
    q = module.q_proj(x).view(2, 5, 2, 4).transpose(1, 2)
    k = module.k_proj(x).view(2, 5, 2, 4).transpose(1, 2)
    v = module.v_proj(x).view(2, 5, 2, 4).transpose(1, 2)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=1 / math.sqrt(12))
    expected = module.out_proj(ref.transpose(1, 2).reshape(2, 5, 8))
    torch.testing.assert_close(module(x), expected, atol=1e-5, rtol=0)


def test_attention_mask_and_bad_input():
    module = hand_module()
    x = torch.tensor([[[1.0], [2.0]]])
    out, w = module(x, attention_mask=torch.tensor([[True, False]]), need_weights=True)
    torch.testing.assert_close(w[0, 0], torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    with pytest.raises(ValueError, match="attention_mask must be bool"):
        module(x, attention_mask=torch.ones(1, 2))
    with pytest.raises(ValueError, match="x must be a float tensor"):
        module(torch.ones(2, 1, dtype=torch.long))
