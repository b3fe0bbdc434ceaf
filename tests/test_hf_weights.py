"""Our models with weights copied from randomly initialised Hugging Face models (small
configs, no downloads) give the same outputs: float32, atol=1e-5, eval mode, eager attention.
Also: the copy helpers are strict (every parameter written, shapes and configs checked)."""

import pytest
import torch
import transformers as tf
from torch import nn

from utils.hf_weights import config_from_hf, copy_parameters, from_hf, load_from_hf
from utils.transformer import GPT, Bert, GPTConfig, Llama

ATOL = 1e-5
VOCAB = 101
TOKENS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)


def close(actual, expected):
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def hf_gpt2(**overrides):
    config = tf.GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4,
        attn_implementation="eager", **{**TOKENS, **overrides},
    )  # fmt: skip
    return tf.GPT2LMHeadModel(config).eval()


def hf_llama(**overrides):
    config = tf.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=56, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
        attn_implementation="eager", **{**TOKENS, **overrides},
    )  # fmt: skip
    return tf.LlamaForCausalLM(config).eval()


def hf_bert_config():
    return tf.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=32, attn_implementation="eager",
        pad_token_id=0,
    )  # fmt: skip


def hf_t5(**overrides):
    config = tf.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3,
        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=12,
        decoder_start_token_id=0, attn_implementation="eager", **overrides,
    )  # fmt: skip
    return tf.T5ForConditionalGeneration(config).eval()


def padded_mask() -> torch.Tensor:
    """Row 0 right-padded (last 3 tokens), row 1 left-padded (first 2 tokens); length 12."""
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[0, 9:] = False
    mask[1, :2] = False
    return mask


# ---------------------------------------------------------------------------------------------
# Equality with the Hugging Face models
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def test_gpt_matches_gpt2_lm_head_model():
    hf = hf_gpt2()
    ours = from_hf(hf)
    idx = torch.randint(0, VOCAB, (2, 12))
    close(ours(idx), hf(idx).logits)


@pytest.mark.parametrize("make_hf", [hf_gpt2, hf_llama], ids=["gpt2", "llama"])
@torch.no_grad()
def test_decoders_match_with_padding_mask(make_hf):
    """With a padding mask both models ignore padded keys and number positions 0..T-1
    regardless of padding, so every query that sees at least one real key agrees. A
    left-padded pad query sees only padded keys (causal mask): we return zeros from its
    attention while Hugging Face averages over the masked keys (its mask adds the most
    negative float instead of -inf); those rows are meaningless and not compared."""
    hf = make_hf()
    ours = from_hf(hf)
    idx, mask = torch.randint(0, VOCAB, (2, 12)), padded_mask()
    sees_a_real_key = mask.cumsum(dim=1) > 0
    logits = ours(idx, attention_mask=mask)
    expected = hf(idx, attention_mask=mask.long()).logits
    close(logits[sees_a_real_key], expected[sees_a_real_key])
    assert sees_a_real_key.sum() == 22  # only the two left-padded rows are left out


@pytest.mark.parametrize("tied", [False, True])
@torch.no_grad()
def test_llama_matches_llama_for_causal_lm(tied):
    hf = hf_llama(tie_word_embeddings=tied)
    ours = from_hf(hf)
    assert ours.config.n_kv_head == 2 < ours.config.n_head
    assert ours.config.rope_theta == 500.0 and ours.config.tie_embeddings == tied
    idx = torch.randint(0, VOCAB, (2, 20))
    close(ours(idx), hf(idx).logits)


@torch.no_grad()
def test_bert_matches_bert_model_and_mlm_head():
    hf_config = hf_bert_config()
    idx, mask = torch.randint(0, VOCAB, (2, 12)), padded_mask()
    segments = (torch.arange(12) >= 6).long().expand(2, 12)
    inputs = dict(token_type_ids=segments, attention_mask=mask)
    hf_inputs = dict(token_type_ids=segments, attention_mask=mask.long())

    hf_encoder = tf.BertModel(hf_config).eval()
    encoder = from_hf(hf_encoder)
    hf_out = hf_encoder(idx, **hf_inputs)
    close(encoder(idx, **inputs), hf_out.last_hidden_state)  # padded positions included
    close(encoder.pool(encoder(idx, **inputs)), hf_out.pooler_output)

    hf_mlm = tf.BertForMaskedLM(hf_config).eval()
    mlm = from_hf(hf_mlm)
    close(mlm(idx, **inputs), hf_mlm(idx, **hf_inputs).logits)


@pytest.mark.parametrize("variant", ["t5", "t5-v1.1"])
@torch.no_grad()
def test_t5_matches_t5_for_conditional_generation(variant):
    """Sources of 20 tokens with 8 buckets and max_distance 12 use the exact, logarithmic and
    beyond-max-distance buckets; v1.1 is gated GELU without the output rescaling."""
    extra = {"feed_forward_proj": "gated-gelu", "tie_word_embeddings": False}
    hf = hf_t5(**(extra if variant == "t5-v1.1" else {}))
    ours = from_hf(hf)
    assert ours.config.scale_decoder_outputs == (variant == "t5")
    src, tgt = torch.randint(0, VOCAB, (2, 20)), torch.randint(0, VOCAB, (2, 15))
    real = torch.ones(2, 20, dtype=torch.bool)
    real[1, 14:] = False
    expected = hf(input_ids=src, attention_mask=real.long(), decoder_input_ids=tgt).logits
    close(ours(src, tgt, src_attention_mask=real), expected)


# ---------------------------------------------------------------------------------------------
# The helpers themselves
# ---------------------------------------------------------------------------------------------


def test_every_parameter_is_written():
    """Fill ours with NaN first: after the copy no NaN is left, and each tensor equals its
    Hugging Face source (transposed for GPT-2's Conv1D)."""
    hf = hf_gpt2()
    ours = GPT(config_from_hf(hf.config))
    with torch.no_grad():
        for p in ours.parameters():
            p.fill_(float("nan"))
    load_from_hf(ours, hf)
    assert not any(p.isnan().any() for p in ours.parameters())
    close(ours.blocks[1].attn.qkv.weight, hf.transformer.h[1].attn.c_attn.weight.t())
    close(ours.blocks[0].ffn.fc_out.bias, hf.transformer.h[0].mlp.c_proj.bias)


def test_copy_parameters_is_strict():
    model = nn.Sequential(nn.Linear(3, 2))
    good = {"0.weight": torch.ones(2, 3), "0.bias": torch.ones(2)}
    copy_parameters(model, good)
    close(model[0].weight, torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"missing \['0.bias'\]"):
        copy_parameters(model, {"0.weight": torch.ones(2, 3)})
    with pytest.raises(ValueError, match=r"unknown \['1.weight'\]"):
        copy_parameters(model, {**good, "1.weight": torch.ones(1)})
    with pytest.raises(ValueError, match=r"0.weight: ours \(2, 3\), given \(3, 2\)"):
        copy_parameters(model, {**good, "0.weight": torch.ones(3, 2)})


def test_config_mismatch_is_reported():
    hf = hf_gpt2()
    config = config_from_hf(hf.config)
    config.n_head = 2  # same shapes, different function: must be caught by the config check
    with pytest.raises(ValueError, match="n_head: ours 2, Hugging Face 4"):
        load_from_hf(GPT(config), hf)
    with pytest.raises(ValueError, match="n_layer"):
        load_from_hf(GPT(GPTConfig(VOCAB, block_size=32, n_layer=3, n_head=4, n_embd=32)), hf)


def test_unsupported_pairs_and_configs():
    hf = hf_gpt2()
    with pytest.raises(TypeError, match="Llama copies from"):
        load_from_hf(Llama(config_from_hf(hf_llama().config)), hf)
    with pytest.raises(TypeError, match="hf_model must be one of"):
        from_hf(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="activation 'relu'"):
        config_from_hf(tf.GPT2Config(activation_function="relu"))
    with pytest.raises(ValueError, match="model_type must be one of"):
        config_from_hf(tf.RobertaConfig())


def test_unused_hugging_face_parameters_are_reported():
    hf = hf_gpt2()
    hf.transformer.extra = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=r"no counterpart in ours: \['transformer.extra'\]"):
        from_hf(hf)


def test_bert_pooler_follows_the_hugging_face_model():
    with_pooler = from_hf(tf.BertModel(hf_bert_config()))
    without = from_hf(tf.BertModel(hf_bert_config(), add_pooling_layer=False))
    assert isinstance(with_pooler, Bert) and with_pooler.pooler is not None
    assert without.pooler is None
    with pytest.raises(ValueError, match="pooler=False"):
        without.pool(torch.zeros(1, 2, 32))
