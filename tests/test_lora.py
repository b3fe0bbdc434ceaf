"""utils.lora against ``peft``'s LoRA on the same Hugging Face model, and against closed forms.

Reference: ``peft`` 0.21.2 (a test-time dependency only). Our A/B get peft's values (B made
non-zero), then outputs and the gradients w.r.t. A and B must agree to ``atol=1e-5`` (float32:
the same matmuls, so the differences are rounding only). Merged vs unmerged: ``atol=1e-5``.
At initialisation (B = 0) the wrapped model equals the base model bit for bit.
"""

import copy
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_hf_models import hf_bert, hf_llama
from torch import nn

from utils.lora import (
    LoRALinear,
    apply_lora,
    load_adapter,
    lora_layers,
    lora_state_dict,
    merge_lora,
    save_adapter,
    trainable_parameters,
)
from utils.training import TrainConfig, Trainer
from utils.transformer import (
    GPT,
    T5,
    Bert,
    BertConfig,
    GPTConfig,
    Llama,
    LlamaConfig,
    T5Config,
)

ATOL = 1e-5


def peft_and_ours(base: nn.Module, targets, rank=4, alpha=8.0, dropout=0.0, seed=1):
    """peft's LoRA and ours on two copies of ``base``; peft's B set to random values, and
    both A and B copied into ours. Returns (peft model, our model, name map ours -> peft)."""
    reference = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets),
    )
    ours = apply_lora(copy.deepcopy(base), targets, rank=rank, alpha=alpha, dropout=dropout)
    reference_parameters = dict(reference.named_parameters())
    names = {}
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, layer in lora_layers(ours).items():
            for factor in ("A", "B"):
                peft_name = f"base_model.model.{name}.lora_{factor}.default.weight"
                if factor == "B":
                    reference_parameters[peft_name].normal_(0.0, 0.1)
                getattr(layer, f"lora_{factor}").copy_(reference_parameters[peft_name])
                names[f"{name}.lora_{factor}"] = peft_name
    return reference, ours, names


def test_lora_linear_matches_the_formula_and_init():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    torch.manual_seed(3)
    layer = LoRALinear(base, rank=2, alpha=3.0)
    torch.manual_seed(3)
    expected_a = nn.init.kaiming_uniform_(torch.empty(2, 6), a=math.sqrt(5))  # peft's init
    torch.testing.assert_close(layer.lora_A, expected_a, rtol=0, atol=0)
    assert torch.equal(layer.lora_B, torch.zeros(5, 2))
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 3, 6)
    expected = base(x) + x @ layer.lora_A.T @ layer.lora_B.T * (3.0 / 2)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=ATOL)
    assert not base.weight.requires_grad and layer.lora_A.requires_grad


@pytest.mark.parametrize(
    "make, targets",
    [
        (hf_llama, ["q_proj", "v_proj"]),
        (hf_llama, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
        (hf_bert, ["query", "value", "attention.output.dense"]),
    ],
)
def test_same_outputs_and_gradients_as_peft(make, targets):
    reference, ours, names = peft_and_ours(make(), targets)
    ids = torch.randint(3, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    out_ref = reference(input_ids=ids).logits if make is hf_llama else reference(ids)[0]
    out = ours(input_ids=ids).logits if make is hf_llama else ours(ids)[0]
    torch.testing.assert_close(out, out_ref, rtol=0, atol=ATOL)
    weights = torch.randn_like(out)  # a random linear functional of the outputs
    (out * weights).sum().backward()
    (out_ref * weights).sum().backward()
    reference_parameters = dict(reference.named_parameters())
    for name, parameter in ours.named_parameters():
        if name in names:
            expected = reference_parameters[names[name]].grad
            torch.testing.assert_close(parameter.grad, expected, rtol=0, atol=ATOL)
        else:
            assert parameter.grad is None, name


def test_same_dropout_as_peft_in_training_mode():
    """Dropout on the LoRA input only, drawn in the same order: same numbers under one seed."""
    reference, ours, _ = peft_and_ours(hf_llama(), ["q_proj", "v_proj"], dropout=0.3)
    reference.train(), ours.train()
    ids = torch.randint(3, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(5)
    out_ref = reference(input_ids=ids).logits
    torch.manual_seed(5)
    out = ours(input_ids=ids).logits
    torch.testing.assert_close(out, out_ref, rtol=0, atol=ATOL)
    ours.eval()
    assert not torch.allclose(ours(input_ids=ids).logits, out, atol=1e-3)  # dropout was on


def test_at_init_the_wrapped_model_is_the_base_model_exactly():
    base = hf_llama()
    wrapped = apply_lora(copy.deepcopy(base), ["q_proj", "v_proj", "down_proj"], rank=4)
    ids = torch.randint(3, 64, (2, 10))
    assert torch.equal(wrapped(input_ids=ids).logits, base(input_ids=ids).logits)


def test_merge_unmerge_and_merge_lora():
    _, ours, _ = peft_and_ours(hf_llama(), ["q_proj", "v_proj", "up_proj"])
    ids = torch.randint(3, 64, (2, 10))
    layer = ours.model.layers[0].self_attn.q_proj
    weight = layer.base.weight.detach().clone()
    with torch.no_grad():
        unmerged = ours(input_ids=ids).logits
        for m in lora_layers(ours).values():
            m.merge()
        torch.testing.assert_close(ours(input_ids=ids).logits, unmerged, rtol=0, atol=ATOL)
        torch.testing.assert_close(
            layer.base.weight, weight + layer.lora_B @ layer.lora_A * layer.scaling
        )
        for m in lora_layers(ours).values():
            m.unmerge()
        torch.testing.assert_close(layer.base.weight, weight, rtol=0, atol=1e-6)
        torch.testing.assert_close(ours(input_ids=ids).logits, unmerged, rtol=0, atol=ATOL)
        with pytest.raises(RuntimeError, match="not merged"):
            layer.unmerge()
        merged = merge_lora(ours)
        assert not lora_layers(merged)
        assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
        torch.testing.assert_close(merged(input_ids=ids).logits, unmerged, rtol=0, atol=ATOL)


def test_only_adapters_and_named_extras_get_gradients():
    model = apply_lora(hf_llama(), ["q_proj", "v_proj"], rank=2, trainable=["norm", "lm_head"])
    model(input_ids=torch.randint(3, 64, (2, 10))).logits.square().mean().backward()
    for name, parameter in model.named_parameters():
        expected = name.endswith(("lora_A", "lora_B")) or name in (
            "model.norm.weight",
            "lm_head.weight",
        )
        assert parameter.requires_grad == expected, name
        assert (parameter.grad is not None) == expected, name
    count = trainable_parameters(model)
    # 2 layers x 2 targets x rank 2 x (32 in + out: 32 for q, 16 for v) + norm 32 + head 64*32
    assert count.trainable == 2 * 2 * (32 + 32) + 2 * 2 * (32 + 16) + 32 + 64 * 32
    assert count.total == sum(p.numel() for p in hf_llama().parameters()) + 2 * 2 * (64 + 48)
    assert math.isclose(count.percent, 100 * count.trainable / count.total)
    assert "trainable" in str(count)


def test_save_and_load_adapter_round_trip(tmp_path):
    ours = apply_lora(hf_llama(), ["q_proj", "v_proj"], trainable=["norm"])
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.2)
    path = tmp_path / "adapter.safetensors"
    save_adapter(ours, path)
    saved = lora_state_dict(ours)
    assert set(saved) == {n for n, p in ours.named_parameters() if p.requires_grad}
    assert path.stat().st_size < 4 * sum(t.numel() for t in saved.values()) + 4096
    restored = load_adapter(hf_llama(), path)
    ids = torch.randint(3, 64, (2, 10))
    assert torch.equal(restored(input_ids=ids).logits, ours(input_ids=ids).logits)
    assert trainable_parameters(restored) == trainable_parameters(ours)
    with pytest.raises(ValueError, match="lacks the model's adapter tensors"):
        load_adapter(apply_lora(hf_llama(), ["q_proj", "v_proj", "o_proj"]), path)
    with pytest.raises(ValueError, match="not parameters of the model"):
        load_adapter(apply_lora(hf_llama(), ["q_proj"]), path)


def course_models():
    torch.manual_seed(0)
    small = dict(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=16)
    t5 = dict(vocab_size=40, n_embd=16, head_dim=8, ffn_dim=24, n_encoder_layer=1,
              n_decoder_layer=1, n_head=2, num_buckets=8, max_distance=8, dropout=0.0)  # fmt: skip
    return {
        "gpt": (GPT(GPTConfig(**small)), ["attn.qkv", "fc_out"], 4),
        "llama": (Llama(LlamaConfig(**small, ffn_dim=24)), ["q_proj", "v_proj", "fc_gate"], 6),
        "bert": (Bert(BertConfig(**small, ffn_dim=24, dropout=0.0)), ["q_proj", "v_proj"], 4),
        "t5": (T5(T5Config(**t5)), ["q_proj", "v_proj"], 6),  # self-, cross-attention
    }


@pytest.mark.parametrize("name", ["gpt", "llama", "bert", "t5"])
def test_applies_to_each_course_model(name):
    base, targets, expected_layers = course_models()[name]
    base.eval()
    model = apply_lora(copy.deepcopy(base), targets, rank=2, alpha=4)
    assert len(lora_layers(model)) == expected_layers
    ids = torch.randint(0, 40, (2, 8))
    run = (lambda m: m(ids, ids)) if name == "t5" else (lambda m: m(ids))
    assert torch.equal(run(model), run(base))
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_()
    changed = run(model)
    assert not torch.allclose(changed, run(base), atol=1e-3)
    changed.square().mean().backward()
    assert all((p.grad is not None) == p.requires_grad for p in model.parameters())
    assert all(
        n.endswith(("lora_A", "lora_B")) for n, p in model.named_parameters() if p.grad is not None
    )
    with torch.no_grad():
        torch.testing.assert_close(run(merge_lora(model)), changed, rtol=0, atol=ATOL)


def test_trainable_names_reach_tied_parameters():
    model = apply_lora(course_models()["gpt"][0], ["attn.qkv"], trainable=["lm_head"])
    assert model.wte.weight.requires_grad  # lm_head.weight is wte.weight (tied)
    assert not model.wpe.embedding.weight.requires_grad


def test_trainer_changes_only_the_adapter_weights():
    torch.manual_seed(0)
    base = GPT(GPTConfig(vocab_size=20, block_size=8, n_layer=2, n_head=2, n_embd=16))
    model = apply_lora(copy.deepcopy(base), ["attn.qkv", "attn.out_proj"], rank=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = torch.randint(0, 20, (4, 9), generator=torch.Generator().manual_seed(0))
    config = TrainConfig(max_iters=5, lr=1e-2, warmup_iters=0, eval_interval=0, progress=False)
    trainer = Trainer(model, config, lambda: (data[:, :-1], data[:, 1:]))
    optimized = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert optimized == {id(p) for p in model.parameters() if p.requires_grad}
    history = trainer.fit()
    assert history.train_loss[-1] < history.train_loss[0]
    for name, parameter in model.named_parameters():
        changed = not torch.equal(parameter, before[name])
        assert changed == name.endswith(("lora_A", "lora_B")), name


def test_bad_inputs_raise_named_errors():
    linear = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(linear, rank=0, alpha=1.0)
    with pytest.raises(ValueError, match="alpha"):
        LoRALinear(linear, rank=2, alpha=-1.0)
    with pytest.raises(ValueError, match="dropout"):
        LoRALinear(linear, rank=2, alpha=1.0, dropout=1.0)
    with pytest.raises(TypeError, match="base"):
        LoRALinear(nn.Conv1d(4, 4, 1), rank=2, alpha=1.0)
    with pytest.raises(ValueError, match=r"\['query_proj'\] match no module.*q_proj"):
        apply_lora(hf_llama(), ["query_proj"])
    with pytest.raises(TypeError, match="targets"):
        apply_lora(hf_llama(), "q_proj")
    with pytest.raises(TypeError, match="self_attn.*not an nn.Linear"):
        apply_lora(hf_llama(), ["self_attn"])
    with pytest.raises(ValueError, match=r"trainable names \['classifier'\]"):
        apply_lora(hf_llama(), ["q_proj"], trainable=["classifier"])
    model = apply_lora(hf_llama(), ["q_proj"])
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, ["v_proj"])
    with pytest.raises(ValueError, match="no LoRA layers"):
        lora_state_dict(hf_llama())
