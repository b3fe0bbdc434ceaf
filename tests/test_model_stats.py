"""utils.model_stats: parameter counts from configs on the meta device against Hugging Face
models (also built on the meta device) and against allocated models; FLOPs against the
closed form 2 (12 L E^2 + V E) + 4 L T E for GPT-2."""

import pytest
import torch
import transformers as tf

from utils.model_stats import (
    build_on_meta,
    count_parameters,
    flops_breakdown,
    flops_per_token,
    parameter_breakdown,
)
from utils.transformer import (
    GPT,
    BertConfig,
    GPTConfig,
    LlamaConfig,
    T5Config,
    TransformerConfig,
)


def hf_count(model_class, config) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in model_class(config).parameters())


def test_gpt2_small_has_124_439_808_parameters():
    assert count_parameters(GPTConfig()) == 124_439_808
    assert count_parameters(GPTConfig()) == hf_count(tf.GPT2LMHeadModel, tf.GPT2Config())


@pytest.mark.parametrize(
    "ours, hf_class, hf_config",
    [
        (BertConfig(), tf.BertModel, tf.BertConfig),  # BERT-base with its pooler
        (LlamaConfig(), tf.LlamaForCausalLM, tf.LlamaConfig),  # Llama 2 7B layout
        (T5Config(), tf.T5ForConditionalGeneration, tf.T5Config),  # T5-small
    ],
    ids=["bert-base", "llama-7b", "t5-small"],
)
def test_counts_match_hugging_face(ours, hf_class, hf_config):
    assert count_parameters(ours) == hf_count(hf_class, hf_config())


def test_meta_model_allocates_nothing_and_counts_like_a_real_one():
    config = GPTConfig(vocab_size=100, block_size=16, n_layer=2, n_head=2, n_embd=16)
    meta = build_on_meta(config)
    assert all(p.is_meta for p in meta.parameters())
    assert count_parameters(config) == sum(p.numel() for p in GPT(config).parameters())


@pytest.mark.parametrize("config", [GPTConfig(), BertConfig(), T5Config(), TransformerConfig()])
def test_breakdown_sums_to_total(config):
    parts = parameter_breakdown(config)
    assert sum(parts.values()) == count_parameters(config)
    assert min(parts["attention"], parts["feed-forward"], parts["embeddings"]) > 0


def test_gpt2_breakdown_closed_form():
    L, E, V, T = 12, 768, 50257, 1024
    parts = parameter_breakdown(GPTConfig())
    assert parts["attention"] == L * (4 * E * E + 4 * E)
    assert parts["feed-forward"] == L * (8 * E * E + 5 * E)
    assert parts["embeddings"] == V * E + T * E
    assert parts["norms"] == (2 * L + 1) * 2 * E


def test_gpt2_flops_closed_form():
    L, E, V, T = 12, 768, 50257, 1024
    flops = flops_breakdown(GPTConfig(), context=T)
    assert flops == {
        "attention projections": 2 * L * 4 * E * E,
        "attention scores": 4 * L * T * E,
        "feed-forward": 2 * L * 8 * E * E,
        "output layer": 2 * V * E,
    }
    matmul_weights = L * 12 * E * E + V * E
    assert flops_per_token(GPTConfig(), T) == 6 * matmul_weights + 12 * L * T * E
    assert flops_per_token(GPTConfig(), T, training=False) * 3 == flops_per_token(GPTConfig(), T)


def test_bad_arguments():
    with pytest.raises(TypeError, match="config must be one of"):
        count_parameters(tf.GPT2Config())
    with pytest.raises(ValueError, match="context must be a positive"):
        flops_per_token(GPTConfig(), 0)
