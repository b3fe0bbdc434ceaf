"""Int8 weight quantization written out, and PyTorch's own dynamic int8 for comparison.

A float tensor w is stored as int8 codes q and a float ``scale`` (and an integer
``zero_point``), and read back as ``(q - zero_point) * scale``:

- absmax (symmetric): ``scale = max|w| / 127``, ``q = round(w / scale)`` in [-127, 127],
  zero point 0;
- zero-point (asymmetric, affine): ``scale = (max w - min w) / 255`` over a range that includes
  0, ``q = round(w / scale) + zero_point`` in [-128, 127].

Either way each element is off by at most ``scale / 2``. Per-tensor uses one scale for the
whole tensor, so one outlier coarsens every element; per-channel (``dim=0``: one scale per
output row of a Linear weight) confines it to its row (Dettmers et al. 2022 go further and
keep outlier *features* in float16). :func:`quantize_linear_layers` swaps a model's
``nn.Linear`` layers for :class:`Int8Linear` (int8 storage, dequantized on the fly: 4x smaller
weights, same float matmul); :func:`pytorch_dynamic_int8` is ``torch.ao``'s dynamic
quantization (int8 matmuls with activations quantized on the fly).
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

METHODS = ("absmax", "zeropoint")


def _check_weight(w: Tensor, dim: int | None) -> None:
    if not isinstance(w, Tensor):
        raise TypeError(f"w must be a torch.Tensor, got {type(w).__name__}")
    if not w.is_floating_point():
        raise ValueError(f"w must be a floating-point tensor, got dtype {w.dtype}")
    if dim is not None and not -w.dim() <= dim < w.dim():
        raise ValueError(f"dim must be None or in [{-w.dim()}, {w.dim()}), got {dim}")


def _reduce_dims(w: Tensor, dim: int | None) -> tuple[int, ...]:
    """Dimensions a statistic is taken over: all (per tensor) or all but ``dim``."""
    return tuple(d for d in range(w.dim()) if dim is None or d != dim % w.dim())


def absmax_quantize(w: Tensor, dim: int | None = None) -> tuple[Tensor, Tensor]:
    """Symmetric int8: ``q = round(w / scale)``, ``scale = max|w| / 127``.

    Args:
        w: float tensor, e.g. a Linear weight (out, in).
        dim: None for one scale for the whole tensor; ``0`` for one per output channel.

    Returns:
        q (int8, shape of w) and scale (float32, a scalar or w's shape with 1 everywhere but
        ``dim``, so that ``q * scale`` broadcasts).
    """
    _check_weight(w, dim)
    amax = w.detach().float().abs().amax(dim=_reduce_dims(w, dim), keepdim=dim is not None)
    scale = amax.clamp(min=torch.finfo(torch.float32).tiny) / 127
    q = torch.round(w.detach().float() / scale).clamp(-127, 127).to(torch.int8)
    return q, scale


def zeropoint_quantize(w: Tensor, dim: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric int8: ``q = round(w / scale) + zero_point`` in [-128, 127].

    The range ``[min(w, 0), max(w, 0)]`` (it always contains 0, so 0 is stored exactly) is
    spread over the 256 codes: ``scale = range / 255``, ``zero_point = round(-128 - min /
    scale)``. Arguments as :func:`absmax_quantize`.

    Returns:
        q (int8), scale (float32) and zero_point (int32), the last two shaped alike.
    """
    _check_weight(w, dim)
    w = w.detach().float()
    dims = _reduce_dims(w, dim)
    low = w.amin(dim=dims, keepdim=dim is not None).clamp(max=0)
    high = w.amax(dim=dims, keepdim=dim is not None).clamp(min=0)
    scale = ((high - low) / 255).clamp(min=torch.finfo(torch.float32).tiny)
    zero_point = torch.round(-128 - low / scale).clamp(-128, 127).to(torch.int32)
    q = (torch.round(w / scale) + zero_point).clamp(-128, 127).to(torch.int8)
    return q, scale, zero_point


def dequantize(q: Tensor, scale: Tensor, zero_point: Tensor | None = None) -> Tensor:
    """Float32 values ``(q - zero_point) * scale`` of int8 codes."""
    if q.dtype != torch.int8:
        raise ValueError(f"q must be int8, got {q.dtype}")
    values = q.float() if zero_point is None else q.float() - zero_point
    return values * scale


def quantize(w: Tensor, method: str = "absmax", dim: int | None = None):
    """``(q, scale, zero_point)`` of ``w`` by ``method`` (zero_point is None for absmax)."""
    if method == "absmax":
        return (*absmax_quantize(w, dim), None)
    if method == "zeropoint":
        return zeropoint_quantize(w, dim)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


class Int8Linear(nn.Module):
    """A Linear layer whose weight is stored as int8 codes plus scales (weight-only
    quantization); the bias stays float. (..., in) -> (..., out)."""

    def __init__(
        self, q: Tensor, scale: Tensor, zero_point: Tensor | None, bias: Tensor | None
    ) -> None:
        super().__init__()
        self.register_buffer("q", q)
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.out_features, self.in_features = q.shape

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, method: str = "absmax", per_channel: bool = True
    ) -> Int8Linear:
        return cls(*quantize(linear.weight, method, 0 if per_channel else None), linear.bias)

    @property
    def weight(self) -> Tensor:
        """The dequantized (out, in) float32 weight (an attribute, as on ``nn.Linear``)."""
        return dequantize(self.q, self.scale, self.zero_point)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        granularity = "per-channel" if self.scale.dim() else "per-tensor"
        kind = "absmax" if self.zero_point is None else "zero-point"
        return f"in={self.in_features}, out={self.out_features}, int8 {kind} {granularity}"


def quantize_linear_layers(
    model: nn.Module, method: str = "absmax", per_channel: bool = True
) -> nn.Module:
    """A copy of ``model`` with every ``nn.Linear`` replaced by :class:`Int8Linear` (a tied
    output layer gets its own int8 copy; embeddings and norms stay float)."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear.from_linear(child, method, per_channel))
    return model


def pytorch_dynamic_int8(model: nn.Module) -> nn.Module:
    """PyTorch's dynamic int8 quantization of every ``nn.Linear`` (a copy; CPU only): int8
    weights (per tensor) and int8 matmuls with activations quantized on the fly.

    ``torch.ao.quantization.quantize_dynamic`` still works in torch 2.13 but is deprecated
    (its warning points to the separate ``torchao`` package); the warnings are silenced here.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        model = torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8
        )
    return model
