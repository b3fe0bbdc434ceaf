"""Copy weights from Hugging Face ``transformers`` models into the models of
:mod:`utils.transformer` (GPT-2, Llama, BERT, BERT-MLM, T5).

Every copy is strict both ways: each parameter of ours is written exactly once with a tensor
of the same shape, and each parameter of the Hugging Face model is used, so a layout or
configuration mismatch raises a ``ValueError`` instead of leaving weights silently random::

    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, ...))
    ours = from_hf(hf)                    # build from the config and copy
    load_from_hf(ours, hf)                # or copy into an existing model
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict

import torch
from torch import Tensor, nn

from utils.transformer import (
    GPT,
    T5,
    Bert,
    BertConfig,
    BertForMaskedLM,
    GPTConfig,
    Llama,
    LlamaConfig,
    T5Config,
)

# ---------------------------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------------------------


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"unsupported Hugging Face configuration: {message}")


def gpt_config_from_hf(hf) -> GPTConfig:
    """``transformers.GPT2Config`` -> :class:`GPTConfig`."""
    _require(hf.activation_function == "gelu_new", f"activation {hf.activation_function!r}")
    _require(hf.n_inner in (None, 4 * hf.n_embd), f"n_inner={hf.n_inner} (ours is 4 * n_embd)")
    _require(hf.scale_attn_weights and not hf.scale_attn_by_inverse_layer_idx, "attention scale")
    _require(not hf.reorder_and_upcast_attn, "reorder_and_upcast_attn")
    return GPTConfig(
        vocab_size=hf.vocab_size,
        block_size=hf.n_positions,
        n_layer=hf.n_layer,
        n_head=hf.n_head,
        n_embd=hf.n_embd,
        dropout=hf.resid_pdrop,
        norm_eps=hf.layer_norm_epsilon,
    )


def llama_config_from_hf(hf) -> LlamaConfig:
    """``transformers.LlamaConfig`` -> :class:`LlamaConfig`."""
    rope = hf.rope_parameters or {}
    _require(rope.get("rope_type", "default") == "default", f"rope scaling {rope}")
    _require(hf.hidden_act == "silu", f"activation {hf.hidden_act!r}")
    _require(hf.attention_bias == hf.mlp_bias, "attention_bias != mlp_bias (ours has one flag)")
    return LlamaConfig(
        vocab_size=hf.vocab_size,
        block_size=hf.max_position_embeddings,
        n_layer=hf.num_hidden_layers,
        n_head=hf.num_attention_heads,
        n_kv_head=hf.num_key_value_heads,
        n_embd=hf.hidden_size,
        ffn_dim=hf.intermediate_size,
        head_dim=hf.head_dim,
        rope_theta=rope.get("rope_theta", 10000.0),
        norm_eps=hf.rms_norm_eps,
        tie_embeddings=hf.tie_word_embeddings,
        bias=hf.attention_bias,
        dropout=hf.attention_dropout,
    )


def bert_config_from_hf(hf) -> BertConfig:
    """``transformers.BertConfig`` -> :class:`BertConfig` (``pooler`` left at True)."""
    _require(hf.hidden_act == "gelu", f"activation {hf.hidden_act!r}")
    _require(getattr(hf, "position_embedding_type", "absolute") == "absolute", "relative positions")
    return BertConfig(
        vocab_size=hf.vocab_size,
        block_size=hf.max_position_embeddings,
        n_layer=hf.num_hidden_layers,
        n_head=hf.num_attention_heads,
        n_embd=hf.hidden_size,
        ffn_dim=hf.intermediate_size,
        type_vocab_size=hf.type_vocab_size,
        dropout=hf.hidden_dropout_prob,
        norm_eps=hf.layer_norm_eps,
    )


_T5_ACTIVATIONS = {"relu": "relu", "gelu_new": "gelu_tanh", "gelu": "gelu", "silu": "silu"}


def t5_config_from_hf(hf) -> T5Config:
    """``transformers.T5Config`` -> :class:`T5Config`."""
    _require(hf.dense_act_fn in _T5_ACTIVATIONS, f"activation {hf.dense_act_fn!r}")
    return T5Config(
        vocab_size=hf.vocab_size,
        n_embd=hf.d_model,
        head_dim=hf.d_kv,
        ffn_dim=hf.d_ff,
        n_encoder_layer=hf.num_layers,
        n_decoder_layer=hf.num_decoder_layers,
        n_head=hf.num_heads,
        num_buckets=hf.relative_attention_num_buckets,
        max_distance=hf.relative_attention_max_distance,
        dropout=hf.dropout_rate,
        norm_eps=hf.layer_norm_epsilon,
        activation=_T5_ACTIVATIONS[hf.dense_act_fn],
        gated=hf.is_gated_act,
        scale_decoder_outputs=hf.scale_decoder_outputs,
    )


_CONFIG_FROM_HF = {
    "gpt2": gpt_config_from_hf,
    "llama": llama_config_from_hf,
    "bert": bert_config_from_hf,
    "t5": t5_config_from_hf,
}


def config_from_hf(hf_config) -> GPTConfig | LlamaConfig | BertConfig | T5Config:
    """Our config for a Hugging Face config of model type gpt2, llama, bert or t5."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in _CONFIG_FROM_HF:
        raise ValueError(f"model_type must be one of {sorted(_CONFIG_FROM_HF)}, got {model_type!r}")
    return _CONFIG_FROM_HF[model_type](hf_config)


# ---------------------------------------------------------------------------------------------
# Parameter name maps: yield (our name, Hugging Face name, transform)
# ---------------------------------------------------------------------------------------------

Pairs = Iterator[tuple[str, str, Callable[[Tensor], Tensor] | None]]


def _transposed(t: Tensor) -> Tensor:
    return t.t()  # GPT-2's Conv1D stores (in, out); nn.Linear stores (out, in)


def _gpt_pairs(model: GPT) -> Pairs:
    yield "wte.weight", "transformer.wte.weight", None
    yield "wpe.embedding.weight", "transformer.wpe.weight", None
    for i in range(model.config.n_layer):
        ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
        for kind in ("weight", "bias"):
            yield f"{ours}attn_norm.{kind}", f"{theirs}ln_1.{kind}", None
            yield f"{ours}ffn_norm.{kind}", f"{theirs}ln_2.{kind}", None
            transform = _transposed if kind == "weight" else None
            yield f"{ours}attn.qkv.{kind}", f"{theirs}attn.c_attn.{kind}", transform
            yield f"{ours}attn.out_proj.{kind}", f"{theirs}attn.c_proj.{kind}", transform
            yield f"{ours}ffn.fc_in.{kind}", f"{theirs}mlp.c_fc.{kind}", transform
            yield f"{ours}ffn.fc_out.{kind}", f"{theirs}mlp.c_proj.{kind}", transform
    for kind in ("weight", "bias"):
        yield f"ln_f.{kind}", f"transformer.ln_f.{kind}", None


def _llama_pairs(model: Llama) -> Pairs:
    kinds = ("weight", "bias") if model.config.bias else ("weight",)
    yield "wte.weight", "model.embed_tokens.weight", None
    for i in range(model.config.n_layer):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        yield f"{ours}attn_norm.weight", f"{theirs}input_layernorm.weight", None
        yield f"{ours}ffn_norm.weight", f"{theirs}post_attention_layernorm.weight", None
        for kind in kinds:
            for name in ("q_proj", "k_proj", "v_proj"):
                yield f"{ours}attn.{name}.{kind}", f"{theirs}self_attn.{name}.{kind}", None
            yield f"{ours}attn.out_proj.{kind}", f"{theirs}self_attn.o_proj.{kind}", None
            yield f"{ours}ffn.fc_gate.{kind}", f"{theirs}mlp.gate_proj.{kind}", None
            yield f"{ours}ffn.fc_in.{kind}", f"{theirs}mlp.up_proj.{kind}", None
            yield f"{ours}ffn.fc_out.{kind}", f"{theirs}mlp.down_proj.{kind}", None
    yield "ln_f.weight", "model.norm.weight", None
    if not model.config.tie_embeddings:
        yield "lm_head.weight", "lm_head.weight", None


def _bert_pairs(model: Bert, ours: str = "", theirs: str = "") -> Pairs:
    emb = f"{theirs}embeddings."
    yield f"{ours}wte.weight", f"{emb}word_embeddings.weight", None
    yield f"{ours}wpe.embedding.weight", f"{emb}position_embeddings.weight", None
    yield f"{ours}wtt.weight", f"{emb}token_type_embeddings.weight", None
    for kind in ("weight", "bias"):
        yield f"{ours}ln_emb.{kind}", f"{emb}LayerNorm.{kind}", None
    for i in range(model.config.n_layer):
        block, layer = f"{ours}blocks.{i}.", f"{theirs}encoder.layer.{i}."
        for kind in ("weight", "bias"):
            for name, hf_name in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
                yield f"{block}attn.{name}.{kind}", f"{layer}attention.self.{hf_name}.{kind}", None
            yield f"{block}attn.out_proj.{kind}", f"{layer}attention.output.dense.{kind}", None
            yield f"{block}attn_norm.{kind}", f"{layer}attention.output.LayerNorm.{kind}", None
            yield f"{block}ffn.fc_in.{kind}", f"{layer}intermediate.dense.{kind}", None
            yield f"{block}ffn.fc_out.{kind}", f"{layer}output.dense.{kind}", None
            yield f"{block}ffn_norm.{kind}", f"{layer}output.LayerNorm.{kind}", None
    if model.pooler is not None:
        for kind in ("weight", "bias"):
            yield f"{ours}pooler.{kind}", f"{theirs}pooler.dense.{kind}", None


def _bert_mlm_pairs(model: BertForMaskedLM) -> Pairs:
    yield from _bert_pairs(model.bert, "bert.", "bert.")
    head = "cls.predictions."
    for kind in ("weight", "bias"):
        yield f"transform.{kind}", f"{head}transform.dense.{kind}", None
        yield f"transform_norm.{kind}", f"{head}transform.LayerNorm.{kind}", None
    yield "lm_head.bias", f"{head}bias", None


def _t5_pairs(model: T5) -> Pairs:
    yield "wte.weight", "shared.weight", None
    for stack in ("encoder", "decoder"):
        first = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        yield f"{stack}_position.bias.weight", first, None
        yield f"{stack}_ln_f.weight", f"{stack}.final_layer_norm.weight", None
        for i in range(len(getattr(model, stack))):
            ours, theirs = f"{stack}.{i}.", f"{stack}.block.{i}.layer."
            attentions = (
                [("attn", "0.SelfAttention")]
                if stack == "encoder"
                else [("self_attn", "0.SelfAttention"), ("cross_attn", "1.EncDecAttention")]
            )
            for name, sub in attentions:
                yield f"{ours}{name}_norm.weight", f"{theirs}{sub[0]}.layer_norm.weight", None
                for proj in ("q", "k", "v"):
                    yield f"{ours}{name}.{proj}_proj.weight", f"{theirs}{sub}.{proj}.weight", None
                yield f"{ours}{name}.out_proj.weight", f"{theirs}{sub}.o.weight", None
            ffn = f"{theirs}{len(attentions)}."
            yield f"{ours}ffn_norm.weight", f"{ffn}layer_norm.weight", None
            yield f"{ours}ffn.fc_out.weight", f"{ffn}DenseReluDense.wo.weight", None
            if model.config.gated:
                yield f"{ours}ffn.fc_gate.weight", f"{ffn}DenseReluDense.wi_0.weight", None
                yield f"{ours}ffn.fc_in.weight", f"{ffn}DenseReluDense.wi_1.weight", None
            else:
                yield f"{ours}ffn.fc_in.weight", f"{ffn}DenseReluDense.wi.weight", None


# our model class -> (Hugging Face classes it copies from, name map)
_PAIRS = {
    GPT: (("GPT2LMHeadModel",), _gpt_pairs),
    Llama: (("LlamaForCausalLM",), _llama_pairs),
    Bert: (("BertModel",), _bert_pairs),
    BertForMaskedLM: (("BertForMaskedLM",), _bert_mlm_pairs),
    T5: (("T5ForConditionalGeneration",), _t5_pairs),
}
_OURS_FOR_HF = {hf_name: ours for ours, (hf_names, _) in _PAIRS.items() for hf_name in hf_names}

# ---------------------------------------------------------------------------------------------
# Copying
# ---------------------------------------------------------------------------------------------


def copy_parameters(model: nn.Module, tensors: dict[str, Tensor]) -> nn.Module:
    """Write ``tensors`` (our parameter name -> tensor) into ``model``, strictly.

    Tied parameters appear once, under their first name in ``model.named_parameters()``.
    Raises ValueError naming missing or unknown parameters and any shape mismatch.
    """
    params = dict(model.named_parameters())
    missing = sorted(params.keys() - tensors.keys())
    unknown = sorted(tensors.keys() - params.keys())
    if missing or unknown:
        raise ValueError(f"parameter names differ: missing {missing}, unknown {unknown}")
    wrong = [
        f"{name}: ours {tuple(params[name].shape)}, given {tuple(t.shape)}"
        for name, t in tensors.items()
        if params[name].shape != t.shape
    ]
    if wrong:
        raise ValueError("shape mismatch (configs differ?): " + "; ".join(wrong))
    with torch.no_grad():
        for name, t in tensors.items():
            params[name].copy_(t)
    return model


def _matching_config_fields(ours, theirs) -> None:
    """Raise if two configs differ in any field that changes the function computed."""
    ignored = {"dropout", "pooler"}  # dropout is off in eval; the pooler is checked by names
    diffs = [
        f"{key}: ours {value!r}, Hugging Face {asdict(theirs)[key]!r}"
        for key, value in asdict(ours).items()
        if key not in ignored and value != asdict(theirs)[key]
    ]
    if diffs:
        raise ValueError("config mismatch with the Hugging Face model: " + "; ".join(diffs))


def load_from_hf(model: nn.Module, hf_model: nn.Module) -> nn.Module:
    """Copy the weights of ``hf_model`` into ``model`` (in place) and return ``model``.

    Supported pairs: GPT <- GPT2LMHeadModel, Llama <- LlamaForCausalLM, Bert <- BertModel,
    BertForMaskedLM <- BertForMaskedLM, T5 <- T5ForConditionalGeneration. Raises ValueError
    if the configs differ, if a parameter of either model is left unused, or on any shape
    mismatch; TypeError for an unsupported pair.
    """
    if type(model) not in _PAIRS:
        raise TypeError(f"model must be one of {[c.__name__ for c in _PAIRS]}, got {type(model)}")
    hf_names, pairs = _PAIRS[type(model)]
    if type(hf_model).__name__ not in hf_names:
        raise TypeError(
            f"{type(model).__name__} copies from {hf_names}, got {type(hf_model).__name__}"
        )
    _matching_config_fields(model.config, config_from_hf(hf_model.config))
    source = dict(hf_model.named_parameters())
    tensors, used = {}, set()
    for ours, theirs, transform in pairs(model):
        if theirs not in source:
            raise ValueError(f"Hugging Face model has no parameter {theirs!r} (for {ours!r})")
        tensor = source[theirs].detach()
        tensors[ours] = transform(tensor) if transform else tensor
        used.add(theirs)
    unused = sorted(source.keys() - used)
    if unused:
        raise ValueError(f"Hugging Face parameters with no counterpart in ours: {unused}")
    return copy_parameters(model, tensors)


def from_hf(hf_model: nn.Module) -> nn.Module:
    """Build our model from ``hf_model.config``, copy the weights, and match its train/eval
    mode. (B)ert gets a pooler exactly when the Hugging Face model has one."""
    name = type(hf_model).__name__
    if name not in _OURS_FOR_HF:
        raise TypeError(f"hf_model must be one of {sorted(_OURS_FOR_HF)}, got {name}")
    config = config_from_hf(hf_model.config)
    if isinstance(config, BertConfig):
        config.pooler = getattr(hf_model, "pooler", None) is not None
    model = _OURS_FOR_HF[name](config)
    load_from_hf(model, hf_model)
    return model.train(hf_model.training)
