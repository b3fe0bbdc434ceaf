"""utils.transformer against PyTorch built-ins (nn.LayerNorm, nn.RMSNorm, nn.Transformer and
its layers), closed forms, and itself run two ways (KV-cached vs full). The Hugging Face
equality tests are in test_hf_weights.py. Tolerance: float32, atol=1e-5 unless stated."""

import math

import pytest
import torch
from torch import nn

from utils.attention import KVCache, MultiHeadAttention
from utils.transformer import (
    GPT,
    T5,
    BlockConfig,
    DecoderBlock,
    EncoderBlock,
    FeedForward,
    GPTConfig,
    LayerNorm,
    Llama,
    LlamaConfig,
    RMSNorm,
    T5Config,
    Transformer,
    TransformerConfig,
    capture_attention,
)

ATOL = 1e-5


def close(actual, expected, atol=ATOL):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


# ---------------------------------------------------------------------------------------------
# Components
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm_matches_torch(bias):
    ours, ref = LayerNorm(16, eps=1e-6, bias=bias), nn.LayerNorm(16, eps=1e-6, bias=bias)
    with torch.no_grad():
        ref.weight.normal_()
        ours.weight.copy_(ref.weight)
        if bias:
            ref.bias.normal_()
            ours.bias.copy_(ref.bias)
    x = torch.randn(3, 5, 16) * 4 + 2
    close(ours(x), ref(x))


def test_rms_norm_matches_torch_and_hand_case():
    ours, ref = RMSNorm(8, eps=1e-6), nn.RMSNorm(8, eps=1e-6)
    with torch.no_grad():
        ref.weight.normal_()
        ours.weight.copy_(ref.weight)
    x = torch.randn(2, 4, 8)
    close(ours(x), ref(x))
    # hand-worked: x = (3, 4): rms = sqrt((9 + 16) / 2) = sqrt(12.5)
    unit = RMSNorm(2, eps=0.0)
    close(unit(torch.tensor([3.0, 4.0])), torch.tensor([3.0, 4.0]) / math.sqrt(12.5))


def test_feed_forward_activations_closed_form():
    x = torch.randn(2, 3, 8)
    gelu_tanh = FeedForward(8, 16, "gelu_tanh")
    h = gelu_tanh.fc_in(x)
    # GPT-2's "gelu_new", written out as in the original TensorFlow code
    expected = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
    close(gelu_tanh(x), gelu_tanh.fc_out(expected))
    swiglu = FeedForward(8, 16, "silu", gated=True, bias=False)
    gate = swiglu.fc_gate(x)
    close(swiglu(x), swiglu.fc_out(gate * torch.sigmoid(gate) * swiglu.fc_in(x)))


def test_feed_forward_rejects_unknown_activation():
    with pytest.raises(ValueError, match="activation must be one of"):
        FeedForward(8, 16, "tanh")


def test_block_rejects_unknown_norm():
    with pytest.raises(ValueError, match="norm must be"):
        EncoderBlock(BlockConfig(8, 2, 16, norm="batchnorm"))


# ---------------------------------------------------------------------------------------------
# Blocks and the encoder-decoder against torch.nn.Transformer
# ---------------------------------------------------------------------------------------------


def _copy_attention(ours, ref: nn.MultiheadAttention) -> None:
    w_q, w_k, w_v = ref.in_proj_weight.chunk(3)
    b_q, b_k, b_v = ref.in_proj_bias.chunk(3)
    for proj, w, b in ((ours.q_proj, w_q, b_q), (ours.k_proj, w_k, b_k), (ours.v_proj, w_v, b_v)):
        proj.weight.copy_(w)
        proj.bias.copy_(b)
    ours.out_proj.load_state_dict(ref.out_proj.state_dict())


@torch.no_grad()
def _copy_encoder_layer(ours: EncoderBlock, ref: nn.TransformerEncoderLayer) -> None:
    _copy_attention(ours.attn, ref.self_attn)
    ours.ffn.fc_in.load_state_dict(ref.linear1.state_dict())
    ours.ffn.fc_out.load_state_dict(ref.linear2.state_dict())
    ours.attn_norm.load_state_dict(ref.norm1.state_dict())
    ours.ffn_norm.load_state_dict(ref.norm2.state_dict())


@torch.no_grad()
def _copy_decoder_layer(ours: DecoderBlock, ref: nn.TransformerDecoderLayer) -> None:
    _copy_attention(ours.self_attn, ref.self_attn)
    _copy_attention(ours.cross_attn, ref.multihead_attn)
    ours.ffn.fc_in.load_state_dict(ref.linear1.state_dict())
    ours.ffn.fc_out.load_state_dict(ref.linear2.state_dict())
    ours.self_attn_norm.load_state_dict(ref.norm1.state_dict())
    ours.cross_attn_norm.load_state_dict(ref.norm2.state_dict())
    ours.ffn_norm.load_state_dict(ref.norm3.state_dict())


def _randomise_norms(module: nn.Module) -> None:
    """Give every LayerNorm non-trivial weights so that copying them is actually tested."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)


SMALL = TransformerConfig(
    src_vocab_size=23, tgt_vocab_size=19, block_size=32, n_encoder_layer=2, n_decoder_layer=2,
    n_head=4, n_embd=32, ffn_dim=48, dropout=0.0, tie_embeddings=False,
)  # fmt: skip


def _torch_layers(pre_norm: bool):
    kwargs = dict(dim_feedforward=48, dropout=0.0, batch_first=True, norm_first=pre_norm)
    return nn.TransformerEncoderLayer(32, 4, **kwargs), nn.TransformerDecoderLayer(32, 4, **kwargs)


@pytest.mark.parametrize("pre_norm", [False, True])
def test_blocks_match_torch_layers(pre_norm):
    ref_enc, ref_dec = _torch_layers(pre_norm)
    _randomise_norms(ref_enc)
    _randomise_norms(ref_dec)
    ref_enc.eval(), ref_dec.eval()
    block = SMALL.block_config()
    block.pre_norm = pre_norm
    enc, dec = EncoderBlock(block).eval(), DecoderBlock(block).eval()
    _copy_encoder_layer(enc, ref_enc)
    _copy_decoder_layer(dec, ref_dec)
    src, tgt = torch.randn(2, 7, 32), torch.randn(2, 5, 32)
    src_real = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    with torch.no_grad():
        memory = enc(src, attention_mask=src_real)
        ref_memory = ref_enc(src, src_key_padding_mask=~src_real)
        # torch's fast path may zero padded positions: compare the real ones only
        close(memory[src_real], ref_memory[src_real])
        causal = nn.Transformer.generate_square_subsequent_mask(5)
        out = dec(tgt, memory, src_attention_mask=src_real)
        ref_out = ref_dec(tgt, memory, tgt_mask=causal, memory_key_padding_mask=~src_real)
    close(out, ref_out)


def _reference_stack(model: Transformer):
    """torch.nn.Transformer (pre-LN: it always ends each stack with a LayerNorm) or, for the
    paper's post-LN, nn.TransformerEncoder/Decoder with norm=None: nn.Transformer would add
    a final LayerNorm that the original Transformer does not have."""
    config = model.config
    enc_layer, dec_layer = _torch_layers(config.pre_norm)
    if config.pre_norm:
        ref = nn.Transformer(
            32, 4, config.n_encoder_layer, config.n_decoder_layer, 48, dropout=0.0,
            batch_first=True, norm_first=True,
        )  # fmt: skip
        encoder, decoder = ref.encoder, ref.decoder
        _randomise_norms(ref)
        with torch.no_grad():
            model.encoder_ln_f.load_state_dict(encoder.norm.state_dict())
            model.decoder_ln_f.load_state_dict(decoder.norm.state_dict())
    else:
        encoder = nn.TransformerEncoder(
            enc_layer, config.n_encoder_layer, enable_nested_tensor=False
        )
        decoder = nn.TransformerDecoder(dec_layer, config.n_decoder_layer)
        _randomise_norms(encoder)
        _randomise_norms(decoder)
    for ours, theirs in zip(model.encoder, encoder.layers, strict=True):
        _copy_encoder_layer(ours, theirs)
    for ours, theirs in zip(model.decoder, decoder.layers, strict=True):
        _copy_decoder_layer(ours, theirs)
    return encoder.eval(), decoder.eval()


@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")
@pytest.mark.parametrize("pre_norm", [False, True])
def test_encoder_decoder_matches_torch_transformer(pre_norm):
    model = Transformer(TransformerConfig(**{**vars(SMALL), "pre_norm": pre_norm}))
    model.eval()
    encoder, decoder = _reference_stack(model)
    src, tgt = torch.randint(0, 23, (2, 9)), torch.randint(0, 19, (2, 6))
    src_real = torch.ones(2, 9, dtype=torch.bool)
    src_real[1, 6:] = False
    with torch.no_grad():
        logits = model(src, tgt, src_attention_mask=src_real)
        memory = encoder(model.embed(model.src_wte, src), src_key_padding_mask=~src_real)
        causal = nn.Transformer.generate_square_subsequent_mask(6)
        hidden = decoder(
            model.embed(model.tgt_wte, tgt),
            memory,
            tgt_mask=causal,
            memory_key_padding_mask=~src_real,
        )
        close(logits, model.lm_head(hidden))
        close(model.encode(src, src_attention_mask=src_real)[src_real], memory[src_real])


def test_encoder_decoder_embeddings_are_scaled_and_sinusoidal():
    model = Transformer(SMALL).eval()
    tgt = torch.randint(0, 19, (1, 5))
    position = torch.arange(5.0)[:, None]
    angle = position / 10000 ** (torch.arange(0, 32, 2) / 32)
    table = torch.stack([angle.sin(), angle.cos()], dim=-1).flatten(-2)  # sin, cos interleaved
    expected = model.tgt_wte(tgt) * math.sqrt(32) + table
    close(model.embed(model.tgt_wte, tgt), expected)


def _check_incremental(model, run_full, run_step, length: int, rows=None):
    """Feeding tokens in chunks through KV caches gives the full forward's logits (B, T, V);
    ``rows`` (B, T) bool selects the positions to compare."""
    full = run_full()
    caches = model.new_kv_caches()
    pieces = [run_step(start, stop, caches) for start, stop in ((0, 3), (3, 4), (4, length))]
    incremental = torch.cat(pieces, dim=1)
    if rows is not None:
        full, incremental = full[rows], incremental[rows]
    close(incremental, full)
    assert all(len(c) == length for c in caches)


@pytest.mark.parametrize("model_name", ["gpt", "llama"])
def test_kv_cache_matches_full_forward(model_name):
    if model_name == "gpt":
        model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16))
    else:
        config = LlamaConfig(
            vocab_size=50, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=16,
            ffn_dim=24, rope_theta=500.0,
        )  # fmt: skip
        model = Llama(config)
    model.eval()
    idx = torch.randint(0, 50, (2, 9))
    real = torch.ones(2, 9, dtype=torch.bool)
    real[1, :2] = False  # left padding: rows of padded queries are not compared (all masked)
    with torch.no_grad():
        _check_incremental(
            model,
            lambda: model(idx, attention_mask=real),
            lambda a, b, caches: model(idx[:, a:b], attention_mask=real[:, :b], kv_caches=caches),
            9,
            rows=real,
        )


def test_encoder_decoder_and_t5_kv_cache_matches_full_decode():
    torch.manual_seed(1)
    config = T5Config(
        vocab_size=40, n_embd=16, head_dim=4, ffn_dim=24, n_encoder_layer=2, n_decoder_layer=2,
        n_head=4, num_buckets=8, max_distance=6,
    )  # fmt: skip
    t5 = T5(config).eval()
    seq2seq = Transformer(SMALL).eval()
    for model, vocab in ((t5, 19), (seq2seq, 19)):
        src, tgt = torch.randint(0, vocab, (2, 7)), torch.randint(0, vocab, (2, 10))
        with torch.no_grad():
            memory = model.encode(src)
            _check_incremental(
                model,
                lambda model=model, memory=memory, tgt=tgt: model.decode(tgt, memory),
                lambda a, b, caches, model=model, memory=memory, tgt=tgt: model.decode(
                    tgt[:, a:b], memory, kv_caches=caches
                ),
                10,
            )


def test_decoder_only_models_are_causal():
    model = GPT(GPTConfig(vocab_size=30, block_size=16, n_layer=2, n_head=2, n_embd=16)).eval()
    idx = torch.randint(0, 30, (1, 8))
    changed = idx.clone()
    changed[0, 5:] = (changed[0, 5:] + 1) % 30
    with torch.no_grad():
        a, b = model(idx), model(changed)
    close(a[:, :5], b[:, :5])
    assert (a[:, 5:] - b[:, 5:]).abs().max() > 1e-3


def test_gpt_init_and_tying():
    config = GPTConfig(vocab_size=1000, block_size=64, n_layer=8, n_head=4, n_embd=256)
    model = GPT(config)
    assert model.lm_head.weight is model.wte.weight
    # normal(0, 0.02) everywhere, 0.02 / sqrt(2 * 8) = 0.005 on residual projections;
    # 65k samples: the sample std is within 2% of the true one with overwhelming probability
    out_proj, qkv = model.blocks[3].attn.out_proj.weight, model.blocks[3].attn.qkv.weight
    assert abs(out_proj.std().item() / (0.02 / 4) - 1) < 0.02
    assert abs(model.blocks[0].ffn.fc_out.weight.std().item() / (0.02 / 4) - 1) < 0.02
    assert abs(qkv.std().item() / 0.02 - 1) < 0.02
    assert model.blocks[0].attn.qkv.bias.abs().max() == 0


def test_llama_tied_and_untied():
    small = dict(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=8, ffn_dim=12)
    tied, untied = Llama(LlamaConfig(**small, tie_embeddings=True)), Llama(LlamaConfig(**small))
    assert tied.lm_head.weight is tied.wte.weight
    assert untied.lm_head.weight is not untied.wte.weight
    n_tied, n_untied = (sum(p.numel() for p in m.parameters()) for m in (tied, untied))
    assert n_untied - n_tied == 20 * 8


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m: m(torch.rand(1, 4)), "integer token ids"),
        (lambda m: m(torch.zeros(4, dtype=torch.long)), r"shape \(B, T\)"),
        (lambda m: m(torch.zeros(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 3)), "bool"),
        (
            lambda m: m(
                torch.zeros(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 3).bool()
            ),
            r"\(B, S_total\) = \(1, 4\)",
        ),
        (lambda m: m(torch.zeros(1, 17, dtype=torch.long)), "block_size=16"),
        (lambda m: m(torch.zeros(1, 2, dtype=torch.long), kv_caches=[KVCache()]), "2 KVCache"),
    ],
)
def test_gpt_rejects_bad_input(call, message):
    model = GPT(GPTConfig(vocab_size=30, block_size=16, n_layer=2, n_head=2, n_embd=16))
    with pytest.raises((ValueError, TypeError), match=message):
        call(model)


def test_llama_rejects_too_long_input():
    model = Llama(LlamaConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=8,
                              ffn_dim=12))  # fmt: skip
    with pytest.raises(ValueError, match="exceeds block_size=8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_capture_attention_rows_are_causal_distributions():
    model = GPT(GPTConfig(vocab_size=30, block_size=16, n_layer=2, n_head=2, n_embd=16)).eval()
    with torch.no_grad(), capture_attention(model) as weights:
        model(torch.randint(0, 30, (1, 6)))
    assert sorted(weights) == ["blocks.0.attn", "blocks.1.attn"]
    w = weights["blocks.1.attn"]
    assert w.shape == (1, 2, 6, 6)
    close(w.sum(-1), torch.ones(1, 2, 6))
    assert w.triu(1).abs().max() == 0
    with torch.no_grad(), capture_attention(model), pytest.raises(ValueError, match="kv_cache"):
        model(torch.randint(0, 30, (1, 6)), kv_caches=model.new_kv_caches())


def test_multi_head_attention_scale_option_matches_torch():
    """utils.attention.MultiHeadAttention(scale=1.0) (T5's unscaled scores) == PyTorch SDPA."""
    attention = MultiHeadAttention(16, 4, bias=False, scale=1.0).eval()
    x = torch.randn(2, 5, 16)
    q, k, v = (
        proj(x).view(2, 5, 4, 4).transpose(1, 2)
        for proj in (attention.q_proj, attention.k_proj, attention.v_proj)
    )
    ref = nn.functional.scaled_dot_product_attention(q, k, v, scale=1.0)
    close(attention(x), attention.out_proj(ref.transpose(1, 2).reshape(2, 5, 16)))
