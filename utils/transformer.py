"""Transformer building blocks and whole models: the original encoder-decoder, GPT-2, BERT,
T5 and a Llama-style decoder, each configured by a small dataclass.

Shape letters: B batch, T target/query length, S source/key length, E model width
(``n_embd``), F feed-forward width, V vocabulary, H heads, D head dimension.

Masks follow the course convention (see :mod:`utils.attention`): ``attention_mask`` is a
(B, S) tensor, ``True`` (or 1) for real tokens and ``False`` (or 0) for padding. Every model
returns logits (or hidden states for the bare BERT encoder); losses are computed outside.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from utils.attention import KVCache, MultiHeadAttention
from utils.positional_encoding import (
    LearnedPositionalEmbedding,
    RelativePositionBias,
    RotaryEmbedding,
    SinusoidalPositionalEncoding,
)

# ---------------------------------------------------------------------------------------------
# Normalisation and feed-forward
# ---------------------------------------------------------------------------------------------


class LayerNorm(nn.Module):
    """LayerNorm (Ba et al. 2016) over the last dimension, with an optional bias (nanoGPT).

    (..., E) -> (..., E): subtract the mean, divide by the standard deviation, scale, shift.
    """

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """RMSNorm (Zhang and Sennrich 2019), also T5's ``T5LayerNorm``: no mean, no bias.

    (..., E) -> (..., E): ``weight * x / sqrt(mean(x^2) + eps)``, computed in float32.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x.float() * torch.rsqrt(variance + self.eps)).to(x.dtype)


ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,  # exact (erf) GELU: BERT
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # GPT-2's "gelu_new"
    "silu": F.silu,  # with gated=True: SwiGLU (Llama)
}


class FeedForward(nn.Module):
    """Position-wise feed-forward network: (B, T, E) -> (B, T, E).

    Plain: ``fc_out(act(fc_in(x)))``. Gated (GLU family, Shazeer 2020):
    ``fc_out(act(fc_gate(x)) * fc_in(x))``; ``activation="silu", gated=True`` is SwiGLU.
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        activation: str = "gelu",
        gated: bool = False,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.activation, self.act = activation, ACTIVATIONS[activation]
        self.fc_gate = nn.Linear(dim, hidden, bias=bias) if gated else None
        self.fc_in = nn.Linear(dim, hidden, bias=bias)
        self.fc_out = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.fc_gate is None:
            return self.fc_out(self.act(self.fc_in(x)))
        return self.fc_out(self.act(self.fc_gate(x)) * self.fc_in(x))


# ---------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------


@dataclass
class BlockConfig:
    """Everything a Transformer block needs; the model configs below produce one.

    ``pre_norm=True`` normalises the input of each sublayer (``x + f(norm(x))``, GPT-2, T5,
    Llama); ``False`` normalises after the residual sum (``norm(x + f(x))``, the original
    Transformer and BERT).
    """

    n_embd: int
    n_head: int
    ffn_dim: int
    n_kv_head: int | None = None
    head_dim: int | None = None
    activation: str = "gelu"
    gated: bool = False
    norm: str = "layernorm"  # or "rmsnorm"
    norm_eps: float = 1e-5
    pre_norm: bool = True
    bias: bool = True
    dropout: float = 0.0
    fused_qkv: bool = False
    attn_scale: float | None = None  # None: 1/sqrt(D); T5: 1.0


def make_norm(config: BlockConfig) -> nn.Module:
    """The normalisation layer a block config asks for."""
    if config.norm == "layernorm":
        return LayerNorm(config.n_embd, config.norm_eps, bias=config.bias)
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, config.norm_eps)
    raise ValueError(f"norm must be 'layernorm' or 'rmsnorm', got {config.norm!r}")


def _attention(config: BlockConfig, rotary: nn.Module | None = None) -> MultiHeadAttention:
    return MultiHeadAttention(
        config.n_embd,
        config.n_head,
        num_kv_heads=config.n_kv_head,
        bias=config.bias,
        dropout=config.dropout,
        fused=config.fused_qkv,
        rotary=rotary,
        head_dim=config.head_dim,
        scale=config.attn_scale,
    )


def _feed_forward(config: BlockConfig) -> FeedForward:
    return FeedForward(config.n_embd, config.ffn_dim, config.activation, config.gated, config.bias)


def sublayer_connection(
    x: Tensor, norm: nn.Module, sublayer, dropout: nn.Module, pre_norm: bool
) -> Tensor:
    """Residual connection around ``sublayer`` (B, T, E) -> (B, T, E).

    Pre-LN: ``x + dropout(sublayer(norm(x)))``; post-LN: ``norm(x + dropout(sublayer(x)))``.
    """
    if pre_norm:
        return x + dropout(sublayer(norm(x)))
    return norm(x + dropout(sublayer(x)))


class EncoderBlock(nn.Module):
    """Self-attention then feed-forward, each with a residual connection: (B, T, E) -> (B, T, E).

    Bidirectional by default; with ``is_causal=True`` it is the decoder-only block
    (see :class:`DecoderOnlyBlock`). ``rotary`` is an optional shared RoPE module.
    """

    def __init__(self, config: BlockConfig, rotary: nn.Module | None = None) -> None:
        super().__init__()
        self.pre_norm = config.pre_norm
        self.attn_norm, self.attn = make_norm(config), _attention(config, rotary)
        self.ffn_norm, self.ffn = make_norm(config), _feed_forward(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: Tensor,
        *,
        attn_mask: Tensor | None = None,
        key_mask: Tensor | None = None,
        is_causal: bool = False,
        kv_cache: KVCache | None = None,
    ) -> Tensor:
        """x (B, T, E); attn_mask broadcastable to (B, H, T, S) (bool or additive bias);
        key_mask (B, S) bool, True = real token; kv_cache for incremental decoding."""

        def attend(h: Tensor) -> Tensor:
            return self.attn(
                h, attn_mask=attn_mask, key_mask=key_mask, is_causal=is_causal, kv_cache=kv_cache
            )

        x = sublayer_connection(x, self.attn_norm, attend, self.dropout, self.pre_norm)
        return sublayer_connection(x, self.ffn_norm, self.ffn, self.dropout, self.pre_norm)


class DecoderOnlyBlock(EncoderBlock):
    """The GPT/Llama block: masked (causal) self-attention then feed-forward."""

    def forward(self, x: Tensor, *, is_causal: bool = True, **kwargs) -> Tensor:
        return super().forward(x, is_causal=is_causal, **kwargs)


class DecoderBlock(nn.Module):
    """Masked self-attention, cross-attention to the encoder output, feed-forward.

    (B, T, E) and memory (B, S, E) -> (B, T, E).
    """

    def __init__(self, config: BlockConfig) -> None:
        super().__init__()
        self.pre_norm = config.pre_norm
        self.self_attn_norm, self.self_attn = make_norm(config), _attention(config)
        self.cross_attn_norm, self.cross_attn = make_norm(config), _attention(config)
        self.ffn_norm, self.ffn = make_norm(config), _feed_forward(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: Tensor,
        memory: Tensor,
        *,
        self_attn_mask: Tensor | None = None,
        key_mask: Tensor | None = None,
        memory_mask: Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> Tensor:
        """x (B, T, E) target states; memory (B, S, E) encoder output;
        self_attn_mask broadcastable to (B, H, T, T_total) (e.g. T5's position bias);
        key_mask (B, T_total) target padding; memory_mask (B, S) source padding."""

        def self_attend(h: Tensor) -> Tensor:
            return self.self_attn(
                h, attn_mask=self_attn_mask, key_mask=key_mask, is_causal=True, kv_cache=kv_cache
            )

        def cross_attend(h: Tensor) -> Tensor:
            return self.cross_attn(h, memory, key_mask=memory_mask)

        x = sublayer_connection(x, self.self_attn_norm, self_attend, self.dropout, self.pre_norm)
        x = sublayer_connection(x, self.cross_attn_norm, cross_attend, self.dropout, self.pre_norm)
        return sublayer_connection(x, self.ffn_norm, self.ffn, self.dropout, self.pre_norm)


# ---------------------------------------------------------------------------------------------
# Shared helpers for the models
# ---------------------------------------------------------------------------------------------


def _check_ids(idx: Tensor, name: str = "idx") -> None:
    if not isinstance(idx, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(idx).__name__}")
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer token ids, got dtype {idx.dtype}")
    if idx.dim() != 2:
        raise ValueError(f"{name} must have shape (B, T), got {tuple(idx.shape)}")


def _key_mask(attention_mask: Tensor | None, batch: int, length: int, name: str) -> Tensor | None:
    """Validate a (B, S) padding mask (bool, or 0/1 integers) and return it as bool."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(attention_mask).__name__}")
    if attention_mask.is_floating_point() or attention_mask.is_complex():
        raise ValueError(f"{name} must be bool or 0/1 integers, got dtype {attention_mask.dtype}")
    if attention_mask.shape != (batch, length):
        raise ValueError(
            f"{name} must have shape (B, S_total) = {(batch, length)} (cached + new tokens), "
            f"got {tuple(attention_mask.shape)}"
        )
    return attention_mask.bool()


def _cache_length(kv_caches: list[KVCache] | None, n_layer: int) -> int:
    """Number of tokens already cached (0 without caches); checks one cache per layer."""
    if kv_caches is None:
        return 0
    if len(kv_caches) != n_layer or not all(isinstance(c, KVCache) for c in kv_caches):
        raise ValueError(f"kv_caches must be a list of {n_layer} KVCache (one per layer)")
    return len(kv_caches[0])


def _check_length(total: int, block_size: int) -> None:
    if total > block_size:
        raise ValueError(f"sequence length {total} exceeds block_size={block_size}")


def init_weights(model: nn.Module, std: float = 0.02, residual_layers: int | None = None) -> None:
    """GPT-2/nanoGPT initialisation: normal(0, std) for linear and embedding weights, zero
    biases; with ``residual_layers=L`` the projections that write into the residual stream
    (``attn.out_proj``, ``ffn.fc_out``) use std / sqrt(2 L) (Radford et al. 2019)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear | nn.Embedding):
            scaled = residual_layers and name.endswith(("out_proj", "fc_out"))
            module_std = std / math.sqrt(2 * residual_layers) if scaled else std
            nn.init.normal_(module.weight, 0.0, module_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)


# ---------------------------------------------------------------------------------------------
# GPT-2
# ---------------------------------------------------------------------------------------------


@dataclass
class GPTConfig:
    """GPT-2 small by default (124M parameters)."""

    vocab_size: int = 50257
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    layer_norm_eps: float = 1e-5

    def block_config(self) -> BlockConfig:
        return BlockConfig(
            self.n_embd, self.n_head, 4 * self.n_embd, activation="gelu_tanh",
            norm_eps=self.layer_norm_eps, bias=self.bias, dropout=self.dropout, fused_qkv=True,
        )  # fmt: skip


class GPT(nn.Module):
    """GPT-2 (Radford et al. 2019): learned positions, pre-LN decoder-only blocks, a final
    LayerNorm and an output layer tied to the token embedding."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = LearnedPositionalEmbedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        block = config.block_config()
        self.blocks = nn.ModuleList(DecoderOnlyBlock(block) for _ in range(config.n_layer))
        self.ln_f = make_norm(block)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying
        init_weights(self, residual_layers=config.n_layer)

    def new_kv_caches(self) -> list[KVCache]:
        return [KVCache() for _ in self.blocks]

    def forward(
        self,
        idx: Tensor,
        *,
        attention_mask: Tensor | None = None,
        kv_caches: list[KVCache] | None = None,
    ) -> Tensor:
        """idx (B, T) token ids -> logits (B, T, V).

        attention_mask (B, S_total), True = real token, S_total = cached + T.
        kv_caches: one KVCache per layer (``new_kv_caches()``); positions continue from
        the cache length, and the caches grow by T.
        """
        _check_ids(idx)
        offset = _cache_length(kv_caches, self.config.n_layer)
        key_mask = _key_mask(attention_mask, idx.shape[0], offset + idx.shape[1], "attention_mask")
        x = self.drop(self.wpe(self.wte(idx), offset=offset))
        caches = kv_caches or [None] * self.config.n_layer
        for block, cache in zip(self.blocks, caches, strict=True):
            x = block(x, key_mask=key_mask, kv_cache=cache)
        return self.lm_head(self.ln_f(x))


# ---------------------------------------------------------------------------------------------
# Llama
# ---------------------------------------------------------------------------------------------


@dataclass
class LlamaConfig:
    """A Llama-style decoder; the defaults are Llama 2 7B's (Touvron et al. 2023)."""

    vocab_size: int = 32000
    block_size: int = 4096
    n_layer: int = 32
    n_head: int = 32
    n_kv_head: int | None = None  # None: n_head (no grouping)
    n_embd: int = 4096
    ffn_dim: int = 11008
    head_dim: int | None = None  # None: n_embd // n_head
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    bias: bool = False
    dropout: float = 0.0

    def block_config(self) -> BlockConfig:
        return BlockConfig(
            self.n_embd, self.n_head, self.ffn_dim, n_kv_head=self.n_kv_head,
            head_dim=self.head_dim, activation="silu", gated=True, norm="rmsnorm",
            norm_eps=self.norm_eps, bias=self.bias, dropout=self.dropout,
        )  # fmt: skip


class Llama(nn.Module):
    """A Llama-style decoder: RMSNorm, SwiGLU feed-forward, rotary positions (RoPE) and
    grouped-query attention (``n_kv_head`` key/value heads shared by ``n_head`` queries)."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        block = config.block_config()
        head_dim = config.head_dim or config.n_embd // config.n_head
        self.rotary = RotaryEmbedding(head_dim, base=config.rope_theta)
        self.embed = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            DecoderOnlyBlock(block, rotary=self.rotary) for _ in range(config.n_layer)
        )
        self.norm = make_norm(block)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        init_weights(self)

    def new_kv_caches(self) -> list[KVCache]:
        return [KVCache() for _ in self.blocks]

    def forward(
        self,
        idx: Tensor,
        *,
        attention_mask: Tensor | None = None,
        kv_caches: list[KVCache] | None = None,
    ) -> Tensor:
        """idx (B, T) token ids -> logits (B, T, V); same mask and cache rules as :class:`GPT`."""
        _check_ids(idx)
        offset = _cache_length(kv_caches, self.config.n_layer)
        _check_length(offset + idx.shape[1], self.config.block_size)
        key_mask = _key_mask(attention_mask, idx.shape[0], offset + idx.shape[1], "attention_mask")
        x = self.drop(self.embed(idx))
        caches = kv_caches or [None] * self.config.n_layer
        for block, cache in zip(self.blocks, caches, strict=True):
            x = block(x, key_mask=key_mask, kv_cache=cache)
        return self.lm_head(self.norm(x))


# ---------------------------------------------------------------------------------------------
# BERT
# ---------------------------------------------------------------------------------------------


@dataclass
class BertConfig:
    """A BERT-style encoder; the defaults are BERT-base's (Devlin et al. 2019)."""

    vocab_size: int = 30522
    block_size: int = 512
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    ffn_dim: int = 3072
    type_vocab_size: int = 2
    dropout: float = 0.1
    layer_norm_eps: float = 1e-12
    pooler: bool = True

    def block_config(self) -> BlockConfig:
        return BlockConfig(
            self.n_embd, self.n_head, self.ffn_dim, activation="gelu", norm_eps=self.layer_norm_eps,
            pre_norm=False, dropout=self.dropout,
        )  # fmt: skip


class Bert(nn.Module):
    """BERT encoder: token + position + segment embeddings, LayerNorm, post-LN blocks, and
    (if ``config.pooler``) the pooler ``tanh(W h_[CLS] + b)``."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        block = config.block_config()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = LearnedPositionalEmbedding(config.block_size, config.n_embd)
        self.wtt = nn.Embedding(config.type_vocab_size, config.n_embd)
        self.ln_emb = make_norm(block)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(EncoderBlock(block) for _ in range(config.n_layer))
        self.pooler = nn.Linear(config.n_embd, config.n_embd) if config.pooler else None
        init_weights(self)

    def forward(
        self,
        idx: Tensor,
        *,
        token_type_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
    ) -> Tensor:
        """idx (B, T) -> hidden states (B, T, E); token_type_ids (B, T) segment ids (default
        0); attention_mask (B, T), True = real token."""
        _check_ids(idx)
        key_mask = _key_mask(attention_mask, *idx.shape, "attention_mask")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(idx)
        _check_ids(token_type_ids, "token_type_ids")
        if token_type_ids.shape != idx.shape:
            raise ValueError(
                f"token_type_ids must have the shape of idx {tuple(idx.shape)}, "
                f"got {tuple(token_type_ids.shape)}"
            )
        x = self.drop(self.ln_emb(self.wpe(self.wte(idx) + self.wtt(token_type_ids))))
        for block in self.blocks:
            x = block(x, key_mask=key_mask)
        return x

    def pool(self, hidden: Tensor) -> Tensor:
        """(B, T, E) hidden states -> (B, E) pooled [CLS] vector (for sentence tasks)."""
        if self.pooler is None:
            raise ValueError("this Bert was built with pooler=False")
        return torch.tanh(self.pooler(hidden[:, 0]))


class BertForMaskedLM(nn.Module):
    """BERT with its masked-language-model head: dense, GELU, LayerNorm, then an output layer
    tied to the token embedding plus a per-token bias. Returns logits (B, T, V)."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.bert = Bert(replace(config, pooler=False))
        self.transform = nn.Linear(config.n_embd, config.n_embd)
        self.transform_norm = make_norm(config.block_config())
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size)
        self.lm_head.weight = self.bert.wte.weight
        init_weights(self)

    def forward(
        self,
        idx: Tensor,
        *,
        token_type_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
    ) -> Tensor:
        """idx (B, T) -> logits (B, T, V); arguments as :meth:`Bert.forward`."""
        hidden = self.bert(idx, token_type_ids=token_type_ids, attention_mask=attention_mask)
        return self.lm_head(self.transform_norm(F.gelu(self.transform(hidden))))


# ---------------------------------------------------------------------------------------------
# Encoder-decoder models: the original Transformer and T5
# ---------------------------------------------------------------------------------------------


class _EncoderDecoder(nn.Module):
    """What the two encoder-decoder models share: ``encode``, ``decode`` and ``forward``.

    Subclasses set ``config``, ``encoder``/``decoder`` (ModuleLists), ``encoder_norm``/
    ``decoder_norm`` (or None) and implement ``embed_source``, ``embed_target``,
    ``encoder_bias``, ``decoder_bias`` and ``project``.
    """

    encoder: nn.ModuleList
    decoder: nn.ModuleList
    encoder_norm: nn.Module | None
    decoder_norm: nn.Module | None

    def new_kv_caches(self) -> list[KVCache]:
        """One self-attention cache per decoder layer (cross-attention is recomputed)."""
        return [KVCache() for _ in self.decoder]

    def encode(self, src: Tensor, *, src_mask: Tensor | None = None) -> Tensor:
        """src (B, S) token ids -> memory (B, S, E); src_mask (B, S), True = real token."""
        _check_ids(src, "src")
        key_mask = _key_mask(src_mask, *src.shape, "src_mask")
        x = self.embed_source(src)
        bias = self.encoder_bias(src.shape[1])
        for block in self.encoder:
            x = block(x, attn_mask=bias, key_mask=key_mask)
        return x if self.encoder_norm is None else self.encoder_norm(x)

    def decode(
        self,
        tgt: Tensor,
        memory: Tensor,
        *,
        tgt_mask: Tensor | None = None,
        src_mask: Tensor | None = None,
        kv_caches: list[KVCache] | None = None,
    ) -> Tensor:
        """tgt (B, T) ids and memory (B, S, E) -> logits (B, T, V).

        tgt_mask (B, T_total) and src_mask (B, S): True = real token. With ``kv_caches``
        the target positions continue from the cache length."""
        _check_ids(tgt, "tgt")
        offset = _cache_length(kv_caches, len(self.decoder))
        key_mask = _key_mask(tgt_mask, tgt.shape[0], offset + tgt.shape[1], "tgt_mask")
        memory_mask = _key_mask(src_mask, *memory.shape[:2], "src_mask")
        x = self.embed_target(tgt, offset)
        bias = self.decoder_bias(tgt.shape[1], offset)
        caches = kv_caches or [None] * len(self.decoder)
        for block, cache in zip(self.decoder, caches, strict=True):
            x = block(
                x, memory, self_attn_mask=bias, key_mask=key_mask, memory_mask=memory_mask,
                kv_cache=cache,
            )  # fmt: skip
        x = x if self.decoder_norm is None else self.decoder_norm(x)
        return self.project(x)

    def forward(
        self,
        src: Tensor,
        tgt: Tensor,
        *,
        src_mask: Tensor | None = None,
        tgt_mask: Tensor | None = None,
    ) -> Tensor:
        """src (B, S) and tgt (B, T) token ids -> logits (B, T, V) (teacher forcing)."""
        memory = self.encode(src, src_mask=src_mask)
        return self.decode(tgt, memory, tgt_mask=tgt_mask, src_mask=src_mask)


@dataclass
class TransformerConfig:
    """The original encoder-decoder (Vaswani et al. 2017); defaults are the base model's."""

    src_vocab_size: int = 37000
    tgt_vocab_size: int = 37000
    block_size: int = 1024
    n_encoder_layer: int = 6
    n_decoder_layer: int = 6
    n_head: int = 8
    n_embd: int = 512
    ffn_dim: int = 2048
    dropout: float = 0.1
    pre_norm: bool = False  # the paper: post-LN
    norm_eps: float = 1e-5
    activation: str = "relu"
    tie_embeddings: bool = True  # target embedding = output layer (one shared vocabulary)

    def block_config(self) -> BlockConfig:
        return BlockConfig(
            self.n_embd, self.n_head, self.ffn_dim, activation=self.activation,
            norm_eps=self.norm_eps, pre_norm=self.pre_norm, dropout=self.dropout,
        )  # fmt: skip


class EncoderDecoderTransformer(_EncoderDecoder):
    """The original Transformer: embeddings scaled by sqrt(E) plus sinusoidal positions,
    an encoder stack, a decoder stack with cross-attention, and a linear output layer.
    With ``pre_norm=True`` each stack ends with a LayerNorm (as ``torch.nn.Transformer``)."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        block = config.block_config()
        self.src_embed = nn.Embedding(config.src_vocab_size, config.n_embd)
        self.tgt_embed = nn.Embedding(config.tgt_vocab_size, config.n_embd)
        self.position = SinusoidalPositionalEncoding(config.n_embd, config.block_size)
        self.drop = nn.Dropout(config.dropout)
        self.encoder = nn.ModuleList(EncoderBlock(block) for _ in range(config.n_encoder_layer))
        self.decoder = nn.ModuleList(DecoderBlock(block) for _ in range(config.n_decoder_layer))
        self.encoder_norm = make_norm(block) if config.pre_norm else None
        self.decoder_norm = make_norm(block) if config.pre_norm else None
        self.lm_head = nn.Linear(config.n_embd, config.tgt_vocab_size, bias=False)
        init_weights(self)
        if config.tie_embeddings:
            self.lm_head.weight = self.tgt_embed.weight

    def _embed(self, embedding: nn.Embedding, ids: Tensor, offset: int = 0) -> Tensor:
        x = embedding(ids) * math.sqrt(self.config.n_embd)
        return self.drop(self.position(x, offset=offset))

    def embed_source(self, src: Tensor) -> Tensor:
        return self._embed(self.src_embed, src)

    def embed_target(self, tgt: Tensor, offset: int = 0) -> Tensor:
        return self._embed(self.tgt_embed, tgt, offset)

    def encoder_bias(self, length: int) -> None:
        return None

    def decoder_bias(self, length: int, offset: int) -> None:
        return None

    def project(self, x: Tensor) -> Tensor:
        return self.lm_head(x)


@dataclass
class T5Config:
    """A T5-style encoder-decoder (Raffel et al. 2020); the defaults are T5-small's."""

    vocab_size: int = 32128
    n_embd: int = 512
    head_dim: int = 64
    ffn_dim: int = 2048
    n_encoder_layer: int = 6
    n_decoder_layer: int = 6
    n_head: int = 8
    num_buckets: int = 32
    max_distance: int = 128
    dropout: float = 0.1
    norm_eps: float = 1e-6
    activation: str = "relu"  # T5 v1.1: "gelu_tanh" with gated=True
    gated: bool = False
    scale_decoder_outputs: bool = True  # multiply by E^-0.5 before the tied output layer

    def block_config(self) -> BlockConfig:
        return BlockConfig(
            self.n_embd, self.n_head, self.ffn_dim, head_dim=self.head_dim,
            activation=self.activation, gated=self.gated, norm="rmsnorm", norm_eps=self.norm_eps,
            bias=False, dropout=self.dropout, attn_scale=1.0,
        )  # fmt: skip


class T5(_EncoderDecoder):
    """T5: one shared embedding, no absolute positions; instead a learned relative position
    bias (computed once per stack and added to every layer's unscaled attention scores),
    RMSNorm, pre-norm blocks without biases, and an output layer tied to the embedding."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.config = config
        block = config.block_config()
        self.shared = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        buckets = {"num_buckets": config.num_buckets, "max_distance": config.max_distance}
        self.encoder_position = RelativePositionBias(config.n_head, bidirectional=True, **buckets)
        self.decoder_position = RelativePositionBias(config.n_head, bidirectional=False, **buckets)
        self.encoder = nn.ModuleList(EncoderBlock(block) for _ in range(config.n_encoder_layer))
        self.decoder = nn.ModuleList(DecoderBlock(block) for _ in range(config.n_decoder_layer))
        self.encoder_norm, self.decoder_norm = make_norm(block), make_norm(block)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.shared.weight
        init_weights(self)

    def embed_source(self, src: Tensor) -> Tensor:
        return self.drop(self.shared(src))

    def embed_target(self, tgt: Tensor, offset: int = 0) -> Tensor:
        return self.drop(self.shared(tgt))

    def encoder_bias(self, length: int) -> Tensor:
        return self.encoder_position(length, length)  # (1, H, S, S)

    def decoder_bias(self, length: int, offset: int) -> Tensor:
        return self.decoder_position(length, offset + length, offset=offset)  # (1, H, T, T_total)

    def project(self, x: Tensor) -> Tensor:
        x = self.drop(x)
        if self.config.scale_decoder_outputs:
            x = x * self.config.n_embd**-0.5
        return self.lm_head(x)


# ---------------------------------------------------------------------------------------------
# Looking inside
# ---------------------------------------------------------------------------------------------


@contextmanager
def capture_attention(model: nn.Module) -> Iterator[dict[str, Tensor]]:
    """Record the attention weights of every :class:`MultiHeadAttention` in ``model``.

    Inside the ``with`` block each forward call stores ``weights[name] = (B, H, T, S)``
    (recomputed with ``need_weights=True``; do not use together with KV caches)::

        with capture_attention(model) as weights:
            model(idx)
        weights["blocks.0.attn"]
    """
    weights: dict[str, Tensor] = {}

    def make_hook(name: str):
        def hook(module: MultiHeadAttention, args, kwargs, output):
            if kwargs.get("kv_cache") is not None:
                raise ValueError("capture_attention cannot be used with kv_cache")
            weights[name] = module.forward(*args, **kwargs, need_weights=True)[1].detach()

        return hook

    handles = [
        module.register_forward_hook(make_hook(name), with_kwargs=True)
        for name, module in model.named_modules()
        if isinstance(module, MultiHeadAttention)
    ]
    try:
        yield weights
    finally:
        for handle in handles:
            handle.remove()
