"""utils.dpo against trl 1.16.0's DPO loss, a hand-worked example and the formula's limits.

Reference: ``trl.DPOTrainer._compute_loss`` (loss_type "sigmoid", standard reverse-KL DPO),
called unbound on a small object with the attributes it reads, on a tiny Hugging Face Llama
patched with trl's own fused LM head (its per-token log-probabilities are trl's, not ours).
Loss and rewards must agree to 1e-6, sequence log-probabilities to 1e-5 (float32 sums of
about ten log-probabilities of magnitude ~4 computed tile-wise by trl), policy gradients to
1e-5.
"""

import copy
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from tiny_hf_models import hf_llama
from trl import DPOTrainer
from trl.trainer.utils import add_fused_lm_head

from utils.dpo import (
    DPOLoss,
    PolicyWithReference,
    dpo_loss,
    pad_pairs,
    preference_pair,
    sequence_logprobs,
)
from utils.lora import apply_lora
from utils.objectives import IGNORE_INDEX
from utils.sft import PLAIN, LengthBuckets
from utils.tokenization import CharTokenizer
from utils.training import TrainConfig, Trainer
from utils.transformer import GPT, GPTConfig

LOG2 = math.log(2.0)


def random_pairs(pairs=3, length=12, seed=0):
    """x (2B, T): prompts shared by a chosen and a rejected answer of different lengths, right
    padding; y: labels (IGNORE_INDEX on prompt and padding)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(2 * pairs, length, dtype=torch.long)
    y = torch.full_like(x, IGNORE_INDEX)
    for i in range(pairs):
        prompt = torch.randint(3, 64, (int(torch.randint(2, 5, (1,), generator=g)),), generator=g)
        for row in (i, i + pairs):
            answer = torch.randint(
                3, 64, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g
            )
            n = len(prompt) + len(answer)
            x[row, :n] = torch.cat([prompt, answer])
            y[row, len(prompt) : n] = answer
    return x, y


def trl_dpo(policy, reference, x, y, beta):
    """trl's loss and logged metrics for the batch [chosen; rejected]."""
    policy, reference = copy.deepcopy(policy), copy.deepcopy(reference)
    add_fused_lm_head(policy, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    add_fused_lm_head(reference)
    completion_mask = (y != IGNORE_INDEX).long()
    with torch.no_grad():
        ref_logps = reference(input_ids=x, labels=y, fused_lm_head=True).log_probs.sum(1)
    ref_chosen, ref_rejected = ref_logps.chunk(2)
    inputs = {"input_ids": x, "attention_mask": (x != 0).long(), "completion_mask": completion_mask,
              "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}  # fmt: skip
    trainer = SimpleNamespace(
        model=policy, beta=beta, loss_types=["sigmoid"], loss_weights=[1.0], ld_alpha=None,
        f_divergence_type="reverse_kl", precompute_ref_logps=True, aux_loss_enabled=False,
        use_weighting=False, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1,
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t,
                                    gather_for_metrics=lambda t: t),
    )  # fmt: skip
    policy.train()  # _compute_loss logs under "train"
    loss = DPOTrainer._compute_loss(trainer, policy, inputs, return_outputs=False)
    logps = policy(input_ids=x, labels=y, fused_lm_head=True).log_probs.sum(1)
    return loss, trainer._metrics["train"], policy, logps.detach(), ref_logps


def test_same_loss_rewards_and_gradients_as_trl():
    policy, reference = hf_llama(0), hf_llama(1)
    x, y = random_pairs()
    beta = 0.3
    loss_trl, metrics, trl_policy, trl_logps, trl_ref_logps = trl_dpo(policy, reference, x, y, beta)
    model = PolicyWithReference(copy.deepcopy(policy), copy.deepcopy(reference)).train()
    loss_fn = DPOLoss(beta)
    loss = loss_fn(model(x), y)
    assert math.isclose(loss.item(), loss_trl.item(), abs_tol=1e-6)
    result = loss_fn.last
    logged = {"rewards/chosen": result.chosen_rewards.mean(), "rewards/margins": result.margin,
              "rewards/rejected": result.rejected_rewards.mean(),
              "rewards/accuracies": result.accuracy}  # fmt: skip
    for key, ours in logged.items():
        assert math.isclose(ours.item(), metrics[key][0], abs_tol=1e-6), key
    with torch.no_grad():
        ours_logps = sequence_logprobs(model.policy(x).logits, y)
        ours_ref = sequence_logprobs(model.reference(x).logits, y)
    torch.testing.assert_close(ours_logps, trl_logps, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours_ref, trl_ref_logps, rtol=0, atol=1e-5)
    loss.backward()
    loss_trl.backward()
    reference_grads = dict(trl_policy.named_parameters())
    for name, parameter in model.policy.named_parameters():
        torch.testing.assert_close(parameter.grad, reference_grads[name].grad, rtol=0, atol=1e-5)
    assert all(p.grad is None for p in model.reference.parameters())


def test_same_loss_as_trl_on_given_logprobs():
    """trl's function on fixed per-token log-probabilities (a stand-in model returns them)."""
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(8, 10, generator=g) < 0.7
    per_token = torch.where(mask, -5 * torch.rand(8, 10, generator=g), 0.0)
    ref_logps = -20 * torch.rand(8, generator=g)
    zeros = torch.zeros(8, 10)
    outputs = SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros,
                              is_top1=zeros.bool())  # fmt: skip
    stand_in = SimpleNamespace(training=True)
    inputs = {"input_ids": torch.zeros(8, 11, dtype=torch.long),
              "attention_mask": torch.ones(8, 11),
              "completion_mask": torch.cat([torch.ones(8, 1), mask.float()], 1),
              "ref_chosen_logps": ref_logps[:4], "ref_rejected_logps": ref_logps[4:]}  # fmt: skip
    for beta in (0.05, 0.1, 1.0):
        trainer = SimpleNamespace(
            model=stand_in, beta=beta, loss_types=["sigmoid"], loss_weights=[1.0], ld_alpha=None,
            f_divergence_type="reverse_kl", precompute_ref_logps=True, aux_loss_enabled=False,
            use_weighting=False, _metrics={"train": defaultdict(list)}, _total_train_tokens=0,
            _tp_size=1, accelerator=SimpleNamespace(device="cpu", gather=lambda t: t,
                                                    gather_for_metrics=lambda t: t),
        )  # fmt: skip
        expected = DPOTrainer._compute_loss(trainer, lambda **_: outputs, inputs, False)
        logps = per_token.sum(1)
        ours = dpo_loss(logps[:4], logps[4:], ref_logps[:4], ref_logps[4:], beta)
        assert math.isclose(ours.loss.item(), expected.item(), abs_tol=1e-6)
        assert math.isclose(
            ours.margin.item(), trainer._metrics["train"]["rewards/margins"][0], abs_tol=1e-6
        )


def test_hand_worked_two_pairs():
    # beta = 0.5.
    # pair 1: log-ratios chosen -4 - (-5) = 1, rejected -6 - (-5) = -1 -> rewards 0.5, -0.5;
    #         z = 0.5 * (1 - (-1)) = 1, loss = -log sigmoid(1) = log(1 + e^-1) = 0.31326169
    # pair 2: chosen -7 - (-6) = -1, rejected -2 - (-4) = 2 -> rewards -0.5, 1.0;
    #         z = 0.5 * (-1 - 2) = -1.5, loss = log(1 + e^1.5) = 1.70141328
    # mean loss (0.31326169 + 1.70141328) / 2 = 1.00733748; accuracy 1/2;
    # margin ((0.5 + 0.5) + (-0.5 - 1.0)) / 2 = -0.25
    result = dpo_loss(
        torch.tensor([-4.0, -7.0]), torch.tensor([-6.0, -2.0]),
        torch.tensor([-5.0, -6.0]), torch.tensor([-5.0, -4.0]), beta=0.5,
    )  # fmt: skip
    assert math.isclose(result.loss.item(), 1.00733748, abs_tol=1e-6)
    torch.testing.assert_close(result.chosen_rewards, torch.tensor([0.5, -0.5]))
    torch.testing.assert_close(result.rejected_rewards, torch.tensor([-0.5, 1.0]))
    assert result.accuracy.item() == 0.5
    assert math.isclose(result.margin.item(), -0.25, abs_tol=1e-7)


def test_beta_to_zero_gives_log2_and_vanishing_gradient():
    g = torch.Generator().manual_seed(0)
    logps = [(-30 * torch.rand(5, generator=g)).requires_grad_() for _ in range(2)]
    refs = [-30 * torch.rand(5, generator=g) for _ in range(2)]
    delta = (logps[0] - refs[0]) - (logps[1] - refs[1])
    for beta in (1e-1, 1e-3, 1e-6):
        result = dpo_loss(logps[0], logps[1], refs[0], refs[1], beta)
        grad_chosen, grad_rejected = torch.autograd.grad(result.loss, logps)
        # d loss / d log pi(y_w) = -beta * sigmoid(-beta * delta) / B = -d loss / d log pi(y_l)
        expected = -beta * torch.sigmoid(-beta * delta.detach()) / 5
        torch.testing.assert_close(grad_chosen, expected, rtol=1e-5, atol=0)
        torch.testing.assert_close(grad_rejected, -expected, rtol=1e-5, atol=0)
        # loss = log 2 - beta * mean(delta) / 2 + O(beta^2)
        assert abs(result.loss.item() - LOG2) <= beta * delta.abs().max().item()
    assert abs(result.loss.item() - LOG2) < 1e-6 and grad_chosen.abs().max() < 1e-6


def test_identical_policy_and_reference_give_log2_and_zero_rewards():
    torch.manual_seed(0)
    policy = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16))
    model = PolicyWithReference(policy, copy.deepcopy(policy))
    x, y = random_pairs()
    loss_fn = DPOLoss(beta=0.1)
    loss = loss_fn(model(x), y)
    assert math.isclose(loss.item(), LOG2, abs_tol=1e-6)
    assert torch.equal(loss_fn.last.chosen_rewards, torch.zeros(3))
    assert torch.equal(loss_fn.last.rejected_rewards, torch.zeros(3))
    assert loss_fn.last.accuracy.item() == 0.0  # ties are not counted as correct


def test_sequence_logprobs_is_a_direct_gather():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=g)
    labels = torch.randint(0, 11, (3, 7), generator=g)
    labels[0, :3], labels[2, 5:] = IGNORE_INDEX, IGNORE_INDEX
    logp = torch.log_softmax(logits.double(), -1)
    expected = torch.zeros(3, dtype=torch.float64)
    for b in range(3):
        for t in range(6):
            if labels[b, t + 1] != IGNORE_INDEX:
                expected[b] += logp[b, t, labels[b, t + 1]]
    torch.testing.assert_close(
        sequence_logprobs(logits, labels).double(), expected, rtol=0, atol=1e-5
    )
    with pytest.raises(ValueError, match="logits must be"):
        sequence_logprobs(logits[0], labels)


def test_bad_inputs_raise_named_errors():
    t = torch.zeros(3)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(t, t, t, t, beta=0.0)
    with pytest.raises(ValueError, match="policy_chosen"):
        dpo_loss(t, torch.zeros(2), t, t)
    with pytest.raises(ValueError, match="beta"):
        DPOLoss(beta=-1.0)
    policy = GPT(GPTConfig(vocab_size=8, block_size=8, n_layer=1, n_head=1, n_embd=8))
    with pytest.raises(ValueError, match="reference"):
        PolicyWithReference(policy, policy)


def test_trainer_trains_dpo_on_a_lora_policy():
    """A course GPT with LoRA learns to prefer answers ending in "!" over "?" (reference:
    the frozen base); only the adapters move."""
    torch.manual_seed(0)
    prompts = [[{"role": "user", "content": w}] for w in ("hi", "yo", "ok", "no", "so", "go")]
    chars = CharTokenizer.from_text("".join("user: assistant: \n!?hiyoknsg"))
    pairs = [preference_pair(chars, p, p[0]["content"] + "!", p[0]["content"] + "?", PLAIN)
             for p in prompts]  # fmt: skip
    assert pairs[0]["chosen"]["labels"].tolist().count(IGNORE_INDEX) == len("user: hi\nassistant: ")
    base = GPT(
        GPTConfig(vocab_size=chars.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16)
    )
    policy = apply_lora(copy.deepcopy(base), ["attn.qkv", "fc_out"], rank=2, trainable=["ln_f"])
    model = PolicyWithReference(policy, base)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss_fn = DPOLoss(beta=0.5)
    batches = LengthBuckets(pairs, batch_size=3, pad_id=0, collate=pad_pairs)
    config = TrainConfig(max_iters=80, lr=3e-2, warmup_iters=0, eval_interval=0, progress=False)
    history = Trainer(model, config, batches, loss_fn=loss_fn).fit()
    assert math.isclose(history.train_loss[0], LOG2, abs_tol=1e-6)  # B = 0 at the start
    assert history.train_loss[-1] < 0.3 and loss_fn.last.accuracy.item() == 1.0
    for name, parameter in model.named_parameters():
        trained = name.startswith("policy.") and name.endswith(
            ("lora_A", "lora_B", "ln_f.weight", "ln_f.bias")
        )
        assert (not torch.equal(parameter, before[name])) == trained, name
