"""The grader's own float64 references for lab 4 (LoRA, the response-only SFT loss, sequence
log-probabilities, DPO), written here from the papers' formulas: not imported from
:mod:`utils` (learner code may patch it, and it may change), with torch function handles
saved when the grader is imported.

Conventions: LoRA adds ``(alpha / rank) * B A x`` to ``W x + b`` (Hu et al. 2021), with
A (r, in) and B (out, r). Labels are aligned with the inputs and the loss shifts them:
``logits[:, t]`` predicts ``labels[:, t + 1]``; a label equal to ``IGNORE_INDEX`` is left out.
The SFT loss is the mean over every response token of the batch; a sequence's log-probability
is the *sum* over its response tokens. DPO (Rafailov et al. 2023):
``-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))``, averaged over pairs.
"""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = -100

_log_softmax, _logsigmoid = torch.log_softmax, torch.nn.functional.logsigmoid
_gather, _where, _zeros_like = torch.gather, torch.where, torch.zeros_like
_matmul, _sum, _arange, _full_like = torch.matmul, torch.sum, torch.arange, torch.full_like


def lora_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, a: Tensor, b: Tensor, scaling: float
) -> Tensor:
    """float64 ``x W^T + bias + scaling * (x A^T) B^T`` for x (..., in), W (out, in),
    A (r, in), B (out, r)."""
    x = x.double()
    out = _matmul(x, weight.double().T)
    if bias is not None:
        out = out + bias.double()
    return out + scaling * _matmul(_matmul(x, a.double().T), b.double().T)


def merged_weight(weight: Tensor, a: Tensor, b: Tensor, scaling: float) -> Tensor:
    """float64 ``W + scaling * B A`` (out, in)."""
    return weight.double() + scaling * _matmul(b.double(), a.double())


def shifted_token_logprobs(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """float64 log p(labels[:, t + 1] | positions <= t) for logits (B, T, V), labels (B, T).

    Returns (token log-probs (B, T - 1), 0 where ignored; kept (B, T - 1) bool)."""
    logprobs = _log_softmax(logits[:, :-1].double(), dim=-1)
    targets = labels[:, 1:]
    kept = targets != IGNORE_INDEX
    picked = _gather(logprobs, -1, _where(kept, targets, 0)[..., None])[..., 0]
    return _where(kept, picked, _zeros_like(picked)), kept


def sft_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """float64 mean cross-entropy over every response token of the batch."""
    token_logprobs, kept = shifted_token_logprobs(logits, labels)
    return -_sum(token_logprobs) / _sum(kept)


def sequence_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    """float64 (B,) sum of the response tokens' log-probabilities of each sequence."""
    return _sum(shifted_token_logprobs(logits, labels)[0], dim=-1)


def sft_labels(input_ids: Tensor, prompt_lengths: Tensor, attention_mask: Tensor) -> Tensor:
    """(B, T) labels: the ids where a response token is (position >= prompt length and a real
    token), IGNORE_INDEX elsewhere."""
    positions = _arange(input_ids.shape[1])[None, :]
    response = (positions >= prompt_lengths[:, None]) & attention_mask.bool()
    return _where(response, input_ids, _full_like(input_ids, IGNORE_INDEX))


def dpo(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """float64 (mean DPO loss, chosen rewards (B,), rejected rewards (B,))."""
    chosen = beta * (policy_chosen.double() - ref_chosen.double())
    rejected = beta * (policy_rejected.double() - ref_rejected.double())
    return -_logsigmoid(chosen - rejected).mean(), chosen, rejected
