"""Transformer building blocks and whole models: the original encoder-decoder, GPT-2, BERT,
T5 and a Llama-style decoder, each configured by a small dataclass.

Shape letters: B batch, T target/query length, S source/key length, E model width
(``n_embd``), F feed-forward width (``ffn_dim``), V vocabulary, H heads (``n_head``), D head
dimension (``head_dim``).

Masks follow the course convention (see :mod:`utils.attention`): a padding mask
(``attention_mask``; ``src_``/``tgt_attention_mask`` in the encoder-decoders) is a (B, S)
tensor, ``True`` (or 1) for real tokens and ``False`` (or 0) for padding; an attention pattern
(``attn_mask``) is bool (True = may attend) or added to the scores. Every model returns logits
(or hidden states for the bare BERT encoder); losses are computed outside.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from utils import checks
from utils.attention import KVCache, MultiHeadAttention
from utils.layers import FeedForward, LayerNorm, RMSNorm
from utils.positional_encoding import (
    LearnedPositionalEmbedding,
    RelativePositionBias,
    RotaryEmbedding,
    SinusoidalPositionalEncoding,
)

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
        n_kv_head=config.n_kv_head,
        bias=config.bias,
        dropout=config.dropout,
        fused=config.fused_qkv,
        rotary=rotary,
        head_dim=config.head_dim,
        scale=config.attn_scale,
    )


def _feed_forward(config: BlockConfig) -> FeedForward:
    return FeedForward(config.n_embd, config.ffn_dim, config.activation, config.gated, config.bias)


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
        attention_mask: Tensor | None = None,
        is_causal: bool = False,
        kv_cache: KVCache | None = None,
    ) -> Tensor:
        """x (B, T, E); attn_mask broadcastable to (B, H, T, S) (bool or additive bias);
        attention_mask (B, S) bool, True = real token; kv_cache for incremental decoding."""
        masks = dict(attn_mask=attn_mask, attention_mask=attention_mask, kv_cache=kv_cache)
        if self.pre_norm:  # GPT-2, T5, Llama: x + f(norm(x))
            x = x + self.dropout(self.attn(self.attn_norm(x), is_causal=is_causal, **masks))
            x = x + self.dropout(self.ffn(self.ffn_norm(x)))
        else:  # the original Transformer, BERT: norm(x + f(x))
            x = self.attn_norm(x + self.dropout(self.attn(x, is_causal=is_causal, **masks)))
            x = self.ffn_norm(x + self.dropout(self.ffn(x)))
        return x


class DecoderOnlyBlock(EncoderBlock):
    """The GPT/Llama block: the same layers, causal self-attention by default."""

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
        attn_mask: Tensor | None = None,
        tgt_attention_mask: Tensor | None = None,
        src_attention_mask: Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> Tensor:
        """x (B, T, E) target states; memory (B, S, E) encoder output; attn_mask: the
        self-attention pattern, broadcastable to (B, H, T, T_total) (e.g. T5's position bias);
        tgt_attention_mask (B, T_total) and src_attention_mask (B, S): padding, True = real."""
        masks = dict(attn_mask=attn_mask, attention_mask=tgt_attention_mask, kv_cache=kv_cache)
        if self.pre_norm:  # x + f(norm(x))
            x = x + self.dropout(self.self_attn(self.self_attn_norm(x), is_causal=True, **masks))
            h = self.cross_attn_norm(x)
            x = x + self.dropout(self.cross_attn(h, memory, attention_mask=src_attention_mask))
            x = x + self.dropout(self.ffn(self.ffn_norm(x)))
        else:  # norm(x + f(x))
            x = self.self_attn_norm(x + self.dropout(self.self_attn(x, is_causal=True, **masks)))
            h = self.cross_attn(x, memory, attention_mask=src_attention_mask)
            x = self.cross_attn_norm(x + self.dropout(h))
            x = self.ffn_norm(x + self.dropout(self.ffn(x)))
        return x


# ---------------------------------------------------------------------------------------------
# Initialisation
# ---------------------------------------------------------------------------------------------


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
    block_size: int = 1024  # longest sequence (learned positions)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768  # model width E; the feed-forward width is 4 E
    dropout: float = 0.0
    bias: bool = True  # biases in the linear layers and LayerNorms
    norm_eps: float = 1e-5

    def block_config(self) -> BlockConfig:
        """GPT-2's block: pre-LN, tanh-GELU MLP of width 4 E, fused (E, 3E) qkv projection."""
        return BlockConfig(
            n_embd=self.n_embd,
            n_head=self.n_head,
            ffn_dim=4 * self.n_embd,
            activation="gelu_tanh",
            norm_eps=self.norm_eps,
            bias=self.bias,
            dropout=self.dropout,
            fused_qkv=True,
        )


class GPT(nn.Module):
    """GPT-2 (Radford et al. 2019): learned positions, pre-LN decoder-only blocks, a final
    LayerNorm and an output layer tied to the token embedding."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        block = config.block_config()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # token embedding
        self.wpe = LearnedPositionalEmbedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(DecoderOnlyBlock(block) for _ in range(config.n_layer))
        self.ln_f = make_norm(block)  # final norm
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying
        init_weights(self, residual_layers=config.n_layer)

    def new_kv_caches(self) -> list[KVCache]:
        return new_kv_caches(self.blocks)

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
        offset, attention_mask = check_decoder_inputs(self, idx, attention_mask, kv_caches)
        x = self.drop(self.wpe(self.wte(idx), offset=offset))  # (B, T, E)
        with checks.trusted():
            for block, cache in zip(
                self.blocks, kv_caches or [None] * len(self.blocks), strict=True
            ):
                x = block(x, attention_mask=attention_mask, kv_cache=cache)
        return self.lm_head(self.ln_f(x))  # (B, T, V)


def new_kv_caches(blocks: nn.ModuleList) -> list[KVCache]:
    """One empty self-attention :class:`KVCache` per block."""
    return [KVCache() for _ in blocks]


def check_decoder_inputs(
    model: nn.Module, idx: Tensor, attention_mask: Tensor | None, kv_caches: list | None
) -> tuple[int, Tensor | None]:
    """The boundary checks of a decoder-only model's ``forward``: token ids, one cache per
    block, the padding mask; returns (cache length, bool attention_mask (B, S_total))."""
    checks.token_ids(idx)
    offset = checks.cache_length(kv_caches, len(model.blocks))
    total = offset + idx.shape[1]
    return offset, checks.padding_mask(attention_mask, idx.shape[0], total, "attention_mask")


# ---------------------------------------------------------------------------------------------
# Llama: what differs from GPT-2
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
        """Llama's block: RMSNorm, SwiGLU feed-forward, grouped-query attention, no biases."""
        return BlockConfig(
            n_embd=self.n_embd,
            n_head=self.n_head,
            ffn_dim=self.ffn_dim,
            n_kv_head=self.n_kv_head,
            head_dim=self.head_dim,
            activation="silu",
            gated=True,
            norm="rmsnorm",
            norm_eps=self.norm_eps,
            bias=self.bias,
            dropout=self.dropout,
        )


class Llama(nn.Module):
    """A Llama-style decoder. It differs from :class:`GPT` in RMSNorm, the SwiGLU
    feed-forward, rotary positions (RoPE, applied to q and k inside attention instead of a
    position embedding) and grouped-query attention (``n_kv_head`` key/value heads)."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        block = config.block_config()
        head_dim = config.head_dim or config.n_embd // config.n_head
        self.rotary = RotaryEmbedding(head_dim, base=config.rope_theta)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # token embedding
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            DecoderOnlyBlock(block, rotary=self.rotary) for _ in range(config.n_layer)
        )
        self.ln_f = make_norm(block)  # final norm
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        init_weights(self)

    def new_kv_caches(self) -> list[KVCache]:
        return new_kv_caches(self.blocks)

    def forward(
        self,
        idx: Tensor,
        *,
        attention_mask: Tensor | None = None,
        kv_caches: list[KVCache] | None = None,
    ) -> Tensor:
        """idx (B, T) token ids -> logits (B, T, V); same mask and cache rules as :class:`GPT`."""
        offset, attention_mask = check_decoder_inputs(self, idx, attention_mask, kv_caches)
        checks.sequence_length(offset + idx.shape[1], self.config.block_size)  # GPT: in wpe
        x = self.drop(self.wte(idx))  # (B, T, E); positions: RoPE inside attention
        with checks.trusted():
            for block, cache in zip(
                self.blocks, kv_caches or [None] * len(self.blocks), strict=True
            ):
                x = block(x, attention_mask=attention_mask, kv_cache=cache)
        return self.lm_head(self.ln_f(x))  # (B, T, V)


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
    type_vocab_size: int = 2  # segments (sentence A / B)
    dropout: float = 0.1
    norm_eps: float = 1e-12
    pooler: bool = True

    def block_config(self) -> BlockConfig:
        """BERT's block: post-LN (``norm(x + f(x))``), exact-GELU feed-forward."""
        return BlockConfig(
            n_embd=self.n_embd,
            n_head=self.n_head,
            ffn_dim=self.ffn_dim,
            activation="gelu",
            norm_eps=self.norm_eps,
            pre_norm=False,
            dropout=self.dropout,
        )


class Bert(nn.Module):
    """BERT encoder: token + position + segment embeddings, LayerNorm, post-LN blocks, and
    (if ``config.pooler``) the pooler ``tanh(W h_[CLS] + b)``."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        block = config.block_config()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # token embedding
        self.wpe = LearnedPositionalEmbedding(config.block_size, config.n_embd)
        self.wtt = nn.Embedding(config.type_vocab_size, config.n_embd)  # segment embedding
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
        checks.token_ids(idx)
        attention_mask = checks.padding_mask(attention_mask, *idx.shape, "attention_mask")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(idx)
        checks.token_ids(token_type_ids, "token_type_ids")
        if token_type_ids.shape != idx.shape:
            raise ValueError(
                f"token_type_ids must have the shape of idx {tuple(idx.shape)}, "
                f"got {tuple(token_type_ids.shape)}"
            )
        x = self.drop(self.ln_emb(self.wpe(self.wte(idx) + self.wtt(token_type_ids))))
        with checks.trusted():
            for block in self.blocks:
                x = block(x, attention_mask=attention_mask)
        return x  # (B, T, E)

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


class EncoderDecoder(nn.Module):
    """What the original Transformer and T5 share: ``encode`` runs the encoder stack over the
    source, ``decode`` runs the decoder stack over the target, attending to the encoder output.

    A model built on it creates ``encoder`` and ``decoder`` (lists of :class:`EncoderBlock`
    and :class:`DecoderBlock`) and ``encoder_ln_f``, and says what is its own: how ids become
    embeddings and a self-attention pattern (``embed_source``, ``embed_target``) and how the
    decoder output becomes logits (``output``).
    """

    def new_kv_caches(self) -> list[KVCache]:
        """One self-attention cache per decoder layer (cross-attention is recomputed)."""
        return new_kv_caches(self.decoder)

    def encode(self, src: Tensor, *, src_attention_mask: Tensor | None = None) -> Tensor:
        """src (B, S) token ids -> memory (B, S, E); src_attention_mask (B, S), True = real."""
        checks.token_ids(src, "src")
        src_attention_mask = checks.padding_mask(
            src_attention_mask, *src.shape, "src_attention_mask"
        )
        x, attn_mask = self.embed_source(src)  # (B, S, E); attn_mask: pattern or None
        with checks.trusted():
            for block in self.encoder:
                x = block(x, attn_mask=attn_mask, attention_mask=src_attention_mask)
        return self.encoder_ln_f(x)

    def decode(
        self,
        tgt: Tensor,
        memory: Tensor,
        *,
        tgt_attention_mask: Tensor | None = None,
        src_attention_mask: Tensor | None = None,
        kv_caches: list[KVCache] | None = None,
    ) -> Tensor:
        """tgt (B, T) ids and memory (B, S, E) -> logits (B, T, V).

        tgt_attention_mask (B, T_total) and src_attention_mask (B, S): True = real token.
        With ``kv_caches`` the target positions continue from the cache length."""
        checks.token_ids(tgt, "tgt")
        offset = checks.cache_length(kv_caches, len(self.decoder))
        total = offset + tgt.shape[1]
        masks = {  # the (B, T_total) and (B, S) bool padding masks
            "tgt_attention_mask": checks.padding_mask(
                tgt_attention_mask, len(tgt), total, "tgt_attention_mask"
            ),
            "src_attention_mask": checks.padding_mask(
                src_attention_mask, *memory.shape[:2], "src_attention_mask"
            ),
        }
        x, attn_mask = self.embed_target(tgt, offset)  # (B, T, E); attn_mask: pattern or None
        with checks.trusted():
            for block, cache in zip(
                self.decoder, kv_caches or [None] * len(self.decoder), strict=True
            ):
                x = block(x, memory, attn_mask=attn_mask, **masks, kv_cache=cache)
        return self.output(x)  # (B, T, V)

    def forward(
        self,
        src: Tensor,
        tgt: Tensor,
        *,
        src_attention_mask: Tensor | None = None,
        tgt_attention_mask: Tensor | None = None,
    ) -> Tensor:
        """src (B, S) and tgt (B, T) token ids -> logits (B, T, V) (teacher forcing)."""
        memory = self.encode(src, src_attention_mask=src_attention_mask)
        return self.decode(
            tgt,
            memory,
            tgt_attention_mask=tgt_attention_mask,
            src_attention_mask=src_attention_mask,
        )


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
            n_embd=self.n_embd,
            n_head=self.n_head,
            ffn_dim=self.ffn_dim,
            activation=self.activation,
            norm_eps=self.norm_eps,
            pre_norm=self.pre_norm,
            dropout=self.dropout,
        )


class Transformer(EncoderDecoder):
    """The original Transformer: embeddings scaled by sqrt(E) plus sinusoidal positions,
    an encoder stack, a decoder stack with cross-attention, and a linear output layer.
    With ``pre_norm=True`` each stack ends with a LayerNorm (as ``torch.nn.Transformer``)."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        block = config.block_config()
        self.src_wte = nn.Embedding(config.src_vocab_size, config.n_embd)  # token embeddings
        self.tgt_wte = nn.Embedding(config.tgt_vocab_size, config.n_embd)
        self.wpe = SinusoidalPositionalEncoding(config.n_embd, config.block_size)
        self.drop = nn.Dropout(config.dropout)
        self.encoder = nn.ModuleList(EncoderBlock(block) for _ in range(config.n_encoder_layer))
        self.decoder = nn.ModuleList(DecoderBlock(block) for _ in range(config.n_decoder_layer))
        self.encoder_ln_f = make_norm(block) if config.pre_norm else nn.Identity()
        self.decoder_ln_f = make_norm(block) if config.pre_norm else nn.Identity()
        self.lm_head = nn.Linear(config.n_embd, config.tgt_vocab_size, bias=False)
        init_weights(self)
        if config.tie_embeddings:
            self.lm_head.weight = self.tgt_wte.weight

    def embed(self, wte: nn.Embedding, ids: Tensor, offset: int = 0) -> Tensor:
        """(B, T) ids -> (B, T, E): ``wte(ids) * sqrt(E)`` plus sinusoidal positions."""
        x = wte(ids) * math.sqrt(self.config.n_embd)
        return self.drop(self.wpe(x, offset=offset))

    def embed_source(self, src: Tensor) -> tuple[Tensor, None]:
        return self.embed(self.src_wte, src), None  # positions are in the embeddings

    def embed_target(self, tgt: Tensor, offset: int) -> tuple[Tensor, None]:
        return self.embed(self.tgt_wte, tgt, offset), None

    def output(self, x: Tensor) -> Tensor:
        return self.lm_head(self.decoder_ln_f(x))


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
        """T5's block: pre-norm RMSNorm, no biases, unscaled attention scores."""
        return BlockConfig(
            n_embd=self.n_embd,
            n_head=self.n_head,
            ffn_dim=self.ffn_dim,
            head_dim=self.head_dim,
            activation=self.activation,
            gated=self.gated,
            norm="rmsnorm",
            norm_eps=self.norm_eps,
            bias=False,
            dropout=self.dropout,
            attn_scale=1.0,
        )


class T5(EncoderDecoder):
    """T5. What differs from :class:`Transformer`: one shared embedding, no absolute
    positions but a learned relative position bias (computed once per stack and added to
    every layer's unscaled attention scores), RMSNorm, pre-norm blocks without biases, and
    decoder outputs scaled by E^-0.5 before the output layer tied to the embedding."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.config = config
        block = config.block_config()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # shared by both stacks
        self.drop = nn.Dropout(config.dropout)
        buckets = {"num_buckets": config.num_buckets, "max_distance": config.max_distance}
        self.encoder_position = RelativePositionBias(config.n_head, bidirectional=True, **buckets)
        self.decoder_position = RelativePositionBias(config.n_head, bidirectional=False, **buckets)
        self.encoder = nn.ModuleList(EncoderBlock(block) for _ in range(config.n_encoder_layer))
        self.decoder = nn.ModuleList(DecoderBlock(block) for _ in range(config.n_decoder_layer))
        self.encoder_ln_f, self.decoder_ln_f = make_norm(block), make_norm(block)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        init_weights(self)

    def embed_source(self, src: Tensor) -> tuple[Tensor, Tensor]:
        """(B, S) ids -> embeddings (B, S, E) and the position bias (1, H, S, S)."""
        return self.drop(self.wte(src)), self.encoder_position(src.shape[1], src.shape[1])

    def embed_target(self, tgt: Tensor, offset: int) -> tuple[Tensor, Tensor]:
        """(B, T) ids -> embeddings (B, T, E) and the position bias (1, H, T, offset + T)."""
        length = tgt.shape[1]
        bias = self.decoder_position(length, offset + length, offset=offset)
        return self.drop(self.wte(tgt)), bias

    def output(self, x: Tensor) -> Tensor:
        x = self.drop(self.decoder_ln_f(x))
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
