"""Direct preference optimization (DPO, Rafailov et al. 2023).

For a prompt x with a preferred answer y_w ("chosen") and a worse one y_l ("rejected"), DPO
trains the policy pi directly, with no reward model and no sampling:

    loss = -log sigmoid(beta * [log pi(y_w|x) - log ref(y_w|x) - log pi(y_l|x) + log ref(y_l|x)])

where ref is the frozen starting model (the SFT model) and log pi(y|x) is the sum of the
answer tokens' log-probabilities. ``beta * (log pi - log ref)`` is the answer's implicit
reward; training raises the chosen one above the rejected one (reward accuracy, margin).

- :func:`sequence_logprobs`, :func:`dpo_loss` (-> :class:`DPOResult`).
- Data: :func:`preference_pair` (two :func:`utils.sft.sft_example` on one prompt),
  :func:`pad_pairs` (``x`` (2B, T): the B chosen rows, then the B rejected rows).
- Training with the course's :class:`utils.training.Trainer`: :class:`PolicyWithReference`
  as the model (it returns both models' token log-probabilities) and :class:`DPOLoss` as
  ``loss_fn``.

Shape letters: B batch (pairs), T sequence length, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from utils.objectives import IGNORE_INDEX
from utils.sft import SMOLLM2, ChatTemplate, logits_of, pad_batch, sft_example


def token_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    """log p(target) under ``logits`` (B, T, V) for targets (B, T), in float32; 0 where the
    target is ``IGNORE_INDEX``. Returns (B, T)."""
    logits = logits.float()
    picked = logits.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return torch.where(targets != IGNORE_INDEX, picked - logits.logsumexp(-1), 0.0)


def sequence_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    """Sum of the log-probabilities of the labelled tokens: ``logits[:, t]`` scores
    ``labels[:, t + 1]`` (causal shift, as :func:`utils.objectives.causal_lm_loss`);
    ``IGNORE_INDEX`` positions (prompt, padding) are left out. (B, T, V), (B, T) -> (B,)."""
    if logits.dim() != 3 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"logits must be (B, T, V) with (B, T) = labels.shape {tuple(labels.shape)}, "
            f"got {tuple(logits.shape)}"
        )
    return token_logprobs(logits[:, :-1], labels[:, 1:]).sum(-1)


class DPOResult(NamedTuple):
    loss: Tensor  # scalar, mean over pairs
    chosen_rewards: Tensor  # (B,) beta * (log pi - log ref) of the chosen answers (detached)
    rejected_rewards: Tensor  # (B,) the same for the rejected answers
    accuracy: Tensor  # fraction of pairs whose chosen reward is higher
    margin: Tensor  # mean of chosen - rejected reward


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float = 0.1,
) -> DPOResult:
    """DPO's sigmoid loss from sequence log-probabilities, each (B,)."""
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta!r}")
    shapes = [tuple(t.shape) for t in (policy_chosen, policy_rejected, ref_chosen, ref_rejected)]
    if len(shapes[0]) != 1 or len(set(shapes)) != 1:
        raise ValueError(
            "policy_chosen, policy_rejected, ref_chosen, ref_rejected must be (B,) tensors of "
            f"one shape, got {shapes}"
        )
    chosen_logratio, rejected_logratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    loss = -F.logsigmoid(beta * (chosen_logratio - rejected_logratio)).mean()
    chosen_rewards = beta * chosen_logratio.detach()
    rejected_rewards = beta * rejected_logratio.detach()
    return DPOResult(
        loss,
        chosen_rewards,
        rejected_rewards,
        accuracy=(chosen_rewards > rejected_rewards).float().mean(),
        margin=(chosen_rewards - rejected_rewards).mean(),
    )


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def preference_pair(
    tokenizer,
    prompt: Sequence[dict],
    chosen: str,
    rejected: str,
    template: ChatTemplate = SMOLLM2,
    max_length: int | None = None,
) -> dict[str, dict[str, Tensor]]:
    """``{"chosen": example, "rejected": example}``: the conversation ``prompt`` (ending on a
    user message) answered both ways, each an :func:`utils.sft.sft_example`."""
    return {
        side: sft_example(
            tokenizer, [*prompt, {"role": "assistant", "content": answer}], template, max_length
        )
        for side, answer in (("chosen", chosen), ("rejected", rejected))
    }


def pad_pairs(pairs: Sequence[dict], pad_id: int) -> tuple[Tensor, Tensor]:
    """``x`` (2B, T) ids and ``y`` (2B, T) labels: the B chosen rows, then the B rejected
    rows, right-padded together (a ``collate`` for :class:`utils.sft.LengthBuckets`)."""
    return pad_batch([p["chosen"] for p in pairs] + [p["rejected"] for p in pairs], pad_id)


# ---------------------------------------------------------------------------------------------
# Training with the course's Trainer
# ---------------------------------------------------------------------------------------------


class PolicyWithReference(nn.Module):
    """The trained policy and a frozen reference (always in eval mode, no gradients).

    ``forward(x)``: ids (2B, T) -> (2, 2B, T - 1) log-probabilities of each next input token
    under the policy ([0]) and the reference ([1]). Labels are the ids or ``IGNORE_INDEX``
    (:func:`utils.sft.sft_example`), so :class:`DPOLoss` only has to mask them: the full
    (2B, T, V) logits are never stored twice."""

    def __init__(self, policy: nn.Module, reference: nn.Module) -> None:
        super().__init__()
        if policy is reference:
            raise ValueError("reference must be a separate (frozen) copy of the policy")
        self.policy, self.reference = policy, reference.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> PolicyWithReference:
        self.training = mode
        self.policy.train(mode)
        return self

    def forward(self, x: Tensor) -> Tensor:
        targets = x[:, 1:]
        policy = token_logprobs(logits_of(self.policy(x))[:, :-1], targets)
        with torch.no_grad():
            reference = token_logprobs(logits_of(self.reference(x))[:, :-1], targets)
        return torch.stack([policy, reference])


class DPOLoss:
    """``loss_fn(outputs, y)`` for the Trainer: ``outputs`` from :class:`PolicyWithReference`,
    ``y`` (2B, T) labels from :func:`pad_pairs`. The last :class:`DPOResult` is kept in
    ``self.last`` (rewards, accuracy, margin) for logging."""

    def __init__(self, beta: float = 0.1) -> None:
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta!r}")
        self.beta = beta
        self.last: DPOResult | None = None

    def __call__(self, outputs: Tensor, labels: Tensor) -> Tensor:
        if outputs.dim() != 3 or outputs.shape[0] != 2 or labels.shape[0] % 2:
            raise ValueError(
                f"outputs must be (2, 2B, T - 1) and labels (2B, T), got {tuple(outputs.shape)}, "
                f"{tuple(labels.shape)}"
            )
        answer = labels[:, 1:] != IGNORE_INDEX
        policy, reference = (torch.where(answer, outputs, 0.0).sum(-1)).unbind(0)  # (2B,) each
        (policy_chosen, policy_rejected), (ref_chosen, ref_rejected) = (
            policy.chunk(2),
            reference.chunk(2),
        )
        self.last = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, self.beta)
        return self.last.loss
