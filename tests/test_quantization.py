"""utils.quantization against PyTorch's fake-quantization kernels, hand-worked codes, the
scale/2 error bound, and the float model's outputs."""

import pytest
import torch
from torch import nn

from utils.memory import state_dict_bytes
from utils.quantization import (
    Int8Linear,
    absmax_quantize,
    dequantize,
    pytorch_dynamic_int8,
    quantize,
    quantize_linear_layers,
    zeropoint_quantize,
)
from utils.transformer import GPT, GPTConfig


def weight(seed: int = 0) -> torch.Tensor:
    """A (16, 32) Linear-like weight whose rows have very different ranges (one outlier)."""
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(16, 32, generator=generator) * torch.logspace(-2, 0, 16)[:, None]
    w[3, 7] = 4.0
    return w


def test_hand_worked_codes():
    w = torch.tensor([-1.0, 0.0, 0.5, 2.0])
    q, scale = absmax_quantize(w)
    assert scale.item() == pytest.approx(2 / 127)
    # -1 / (2/127) = -63.5 rounds half to even: -64; 0.5 / (2/127) = 31.75 -> 32
    assert q.tolist() == [-64, 0, 32, 127] and q.dtype == torch.int8
    q, scale, zero_point = zeropoint_quantize(w)
    # range [-1, 2] over 255 steps; zero point round(-128 + 85) = -43
    assert scale.item() == pytest.approx(3 / 255) and zero_point.item() == -43
    assert q.tolist() == [-128, -43, -1, 127]  # 0.5 / scale = 42.5 -> 42 (half to even)
    torch.testing.assert_close(dequantize(q, scale, zero_point)[1], torch.tensor(0.0))


@pytest.mark.parametrize("dim", [None, 0])
def test_absmax_matches_pytorch_fake_quantize(dim):
    w = weight()
    q, scale = absmax_quantize(w, dim)
    if dim is None:
        expected = torch.fake_quantize_per_tensor_affine(w, scale.item(), 0, -127, 127)
    else:
        zeros = torch.zeros(16, dtype=torch.int32)
        expected = torch.fake_quantize_per_channel_affine(w, scale.flatten(), zeros, 0, -127, 127)
    # PyTorch multiplies by 1/scale where we divide by scale: equal codes, same dequantization
    torch.testing.assert_close(dequantize(q, scale), expected, atol=1e-7, rtol=0)


@pytest.mark.parametrize("dim", [None, 0])
def test_zeropoint_matches_pytorch_fake_quantize(dim):
    w = weight(1) + 0.3  # an asymmetric range
    q, scale, zero_point = zeropoint_quantize(w, dim)
    if dim is None:
        expected = torch.fake_quantize_per_tensor_affine(
            w, scale.item(), int(zero_point), -128, 127
        )
    else:
        expected = torch.fake_quantize_per_channel_affine(
            w, scale.flatten(), zero_point.flatten(), 0, -128, 127
        )
    torch.testing.assert_close(dequantize(q, scale, zero_point), expected, atol=1e-7, rtol=0)


@pytest.mark.parametrize("method", ["absmax", "zeropoint"])
@pytest.mark.parametrize("dim", [None, 0])
def test_error_is_at_most_half_a_step(method, dim):
    w = weight(2)
    q, scale, zero_point = quantize(w, method, dim)
    error = (dequantize(q, scale, zero_point) - w).abs()
    bound = (scale / 2).expand_as(w)
    assert (error <= bound * (1 + 1e-5) + 1e-9).all()
    assert error.max() > 0.3 * bound.max()  # the bound is tight, not vacuous


def test_per_channel_confines_the_outlier_to_its_row():
    w = weight()

    def row_relative_error(dim):
        return (dequantize(*absmax_quantize(w, dim)) - w).norm(dim=1) / w.norm(dim=1)

    per_tensor, per_channel = row_relative_error(None), row_relative_error(0)
    assert (per_channel < 0.02).all()  # every row keeps ~7 significant bits
    # one step of 4/127 for all: most weights of the rows of std 0.01-0.014 round to zero
    assert (per_tensor[:3] > 0.5).all() and per_tensor[3] < 0.02


def test_bad_inputs():
    with pytest.raises(ValueError, match="floating"):
        absmax_quantize(torch.arange(4))
    with pytest.raises(ValueError, match="dim"):
        zeropoint_quantize(torch.randn(3, 3), dim=2)
    with pytest.raises(TypeError, match="torch.Tensor"):
        absmax_quantize([1.0, 2.0])
    with pytest.raises(ValueError, match="method"):
        quantize(torch.randn(3), "nf4")
    with pytest.raises(ValueError, match="int8"):
        dequantize(torch.zeros(3), torch.tensor(1.0))


@pytest.mark.parametrize("method", ["absmax", "zeropoint"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_int8_linear_is_close_to_the_float_layer(method, per_channel):
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    layer = Int8Linear.from_linear(linear, method, per_channel)
    x = torch.randn(10, 64)
    q, scale, zero_point = quantize(linear.weight, method, 0 if per_channel else None)
    torch.testing.assert_close(layer.weight, dequantize(q, scale, zero_point))
    # each weight is off by <= scale/2, so each output by <= sum_i |x_i| * scale/2
    bound = x.abs().sum(-1, keepdim=True) * scale.reshape(1, -1) / 2
    assert ((layer(x) - linear(x)).abs() <= bound + 1e-6).all()


def gpt_and_input():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=64)).eval()
    return model, torch.randint(50, (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("quantizer", ["ours", "pytorch"])
def test_quantized_gpt_outputs_close_to_float(quantizer):
    model, idx = gpt_and_input()
    if quantizer == "ours":
        quantized = quantize_linear_layers(model)
        n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
        assert sum(isinstance(m, Int8Linear) for m in quantized.modules()) == n_linear
        assert not any(isinstance(m, nn.Linear) for m in quantized.modules())
    else:
        quantized = pytorch_dynamic_int8(model)
    with torch.no_grad():
        logits, q_logits = model(idx), quantized(idx)
    # measured relative errors: 0.7 % (ours, int8 weights), 1.8 % (PyTorch's, int8 weights
    # and int8 activations); the bounds leave about 2x margin
    bound = 0.015 if quantizer == "ours" else 0.04
    assert (q_logits - logits).norm() < bound * logits.norm()
    assert (q_logits.argmax(-1) == logits.argmax(-1)).float().mean() > 0.95
    assert any(isinstance(m, nn.Linear) for m in model.modules())  # the original is untouched


def test_int8_state_dict_is_about_four_times_smaller():
    model = nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 256))
    float_bytes = state_dict_bytes(model)
    assert float_bytes > 2 * 256 * 256 * 4
    for quantized in (quantize_linear_layers(model), pytorch_dynamic_int8(model)):
        ratio = float_bytes / state_dict_bytes(quantized)
        assert 3.5 < ratio < 4.0, ratio  # int8 weights; biases, scales and headers stay
