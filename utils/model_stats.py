"""Where the parameters and the compute of a Transformer live, from its config alone.

Models are built on PyTorch's ``meta`` device: parameters have shapes but no storage, so
counting the 6.7 billion parameters of ``LlamaConfig()`` takes milliseconds and no memory.

FLOPs per token follow Kaplan et al. (2020) and nanoGPT's ``estimate_mfu``: a forward pass
costs 2 FLOPs (one multiply, one add) per weight of every matrix multiplication, plus
2 * 2 * T * (H * D) per attention layer for the scores ``Q K^T`` and the weighted sum
``A V`` over a context of T tokens; training (forward + backward) costs three times that,
which gives the familiar ``6 N + 12 L T E``. Norms, softmax, biases and embedding look-ups
are left out (a few per cent at most).
"""

from __future__ import annotations

import torch
from torch import nn

from utils.attention import MultiHeadAttention
from utils.transformer import (
    GPT,
    T5,
    Bert,
    BertConfig,
    FeedForward,
    GPTConfig,
    LayerNorm,
    Llama,
    LlamaConfig,
    RMSNorm,
    T5Config,
    Transformer,
    TransformerConfig,
)

MODEL_FOR_CONFIG = {
    GPTConfig: GPT,
    LlamaConfig: Llama,
    BertConfig: Bert,
    T5Config: T5,
    TransformerConfig: Transformer,
}

# module type -> the part of the model it belongs to (first match, outermost module wins)
_PARTS = (
    (MultiHeadAttention, "attention"),
    (FeedForward, "feed-forward"),
    (LayerNorm | RMSNorm, "norms"),
    (nn.Embedding, "embeddings"),
)


def build_on_meta(config) -> nn.Module:
    """The model for ``config`` (any config of :mod:`utils.transformer`) on the meta device:
    shapes only, no memory."""
    if type(config) not in MODEL_FOR_CONFIG:
        names = [c.__name__ for c in MODEL_FOR_CONFIG]
        raise TypeError(f"config must be one of {names}, got {type(config).__name__}")
    with torch.device("meta"):
        return MODEL_FOR_CONFIG[type(config)](config)


def _as_model(config_or_model) -> nn.Module:
    if isinstance(config_or_model, nn.Module):
        return config_or_model
    return build_on_meta(config_or_model)


def _part_of(name: str, parts: dict[str, str]) -> str:
    """The part of the outermost categorised module containing the module ``name``."""
    prefix = ""
    for piece in name.split("."):
        prefix = f"{prefix}.{piece}" if prefix else piece
        if prefix in parts:
            return parts[prefix]
    return "output and other"


def _module_parts(model: nn.Module) -> dict[str, str]:
    return {
        name: next(part for kind, part in _PARTS if isinstance(module, kind))
        for name, module in model.named_modules()
        if any(isinstance(module, kind) for kind, _ in _PARTS)
    }


def count_parameters(config_or_model) -> int:
    """Number of distinct parameters (tied weights counted once) of a model or a config."""
    return sum(p.numel() for p in _as_model(config_or_model).parameters())


def parameter_breakdown(config_or_model) -> dict[str, int]:
    """Parameters by part: attention, feed-forward, norms, embeddings (token, position,
    segment and relative-bias tables), and output and other (untied output layers, BERT's
    pooler). Tied weights count once, under embeddings. Sums to :func:`count_parameters`."""
    model = _as_model(config_or_model)
    parts = _module_parts(model)
    counts = dict.fromkeys([part for _, part in _PARTS] + ["output and other"], 0)
    for name, param in model.named_parameters():
        counts[_part_of(name.rsplit(".", 1)[0], parts)] += param.numel()
    return counts


def flops_breakdown(config_or_model, context: int) -> dict[str, int]:
    """Forward FLOPs per token with ``context`` tokens attended to, by part: attention
    projections, attention scores (Q K^T and A V), feed-forward, output layer."""
    if context < 1:
        raise ValueError(f"context must be a positive number of tokens, got {context}")
    model = _as_model(config_or_model)
    parts = _module_parts(model)
    flops = dict.fromkeys(
        ["attention projections", "attention scores", "feed-forward", "output layer"], 0
    )
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            part = _part_of(name, parts)
            key = {"attention": "attention projections", "feed-forward": "feed-forward"}
            flops[key.get(part, "output layer")] += 2 * module.in_features * module.out_features
        if isinstance(module, MultiHeadAttention):
            flops["attention scores"] += 2 * 2 * context * module.n_head * module.head_dim
    return flops


def flops_per_token(config_or_model, context: int, training: bool = True) -> int:
    """FLOPs to process one token: forward only, or forward + backward (3x) for training.
    For GPT-2 this is ``6 N + 12 L T E`` with N the weights of all matrix multiplications."""
    return (3 if training else 1) * sum(flops_breakdown(config_or_model, context).values())
