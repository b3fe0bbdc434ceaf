"""Deliberately broken lab-4 submissions (LoRA, SFT, DPO), each with the check it must fail
and what the grader must say. Used by tests/test_grading_lab4.py through the grader's API.

Each case: (id, part, submission, test that must end the part, status, words the message must
contain). The submissions are what learners really write, one bug each.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import utils.objectives as course_objectives

IGNORE_INDEX = -100

# ------------------------------------------------------------------------------- LoRA layer


class LoRALinear(nn.Module):
    """A correct layer; the broken ones below change one thing."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base, self.scaling = base, alpha / rank
        base.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        self.init_factors()

    def init_factors(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scaling * (x @ self.lora_A.T) @ self.lora_B.T

    def merge(self) -> nn.Linear:
        base = self.base
        merged = nn.Linear(base.in_features, base.out_features, base.bias is not None)
        with torch.no_grad():
            merged.weight.copy_(self.merged_weight())
            if self.base.bias is not None:
                merged.bias.copy_(self.base.bias)
        return merged

    def merged_weight(self) -> torch.Tensor:
        return self.base.weight + self.scaling * self.lora_B @ self.lora_A


class LoRABRandom(LoRALinear):
    def init_factors(self) -> None:  # both random: the layer no longer starts as the base
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.normal_(self.lora_B, std=0.02)


class LoRABothZero(LoRALinear):
    def init_factors(self) -> None:  # "start unchanged" by zeroing everything: nothing learns
        nn.init.zeros_(self.lora_A)


class LoRAAZeroBRandom(LoRALinear):
    def init_factors(self) -> None:  # the opposite factor starts at zero
        nn.init.zeros_(self.lora_A)
        nn.init.normal_(self.lora_B, std=0.02)


class LoRAScaledByAlpha(LoRALinear):
    def __init__(self, base, rank, alpha):
        super().__init__(base, rank, alpha)
        self.scaling = alpha  # alpha, not alpha / rank


class LoRAScaledByRootRank(LoRALinear):
    def __init__(self, base, rank, alpha):
        super().__init__(base, rank, alpha)
        self.scaling = alpha / math.sqrt(rank)  # rsLoRA's convention, not the paper's


class LoRABaseNotFrozen(LoRALinear):
    def __init__(self, base, rank, alpha):
        super().__init__(base, rank, alpha)
        base.requires_grad_(True)  # forgot to freeze: full fine-tuning plus an adapter


class LoRAMergeForgetsScaling(LoRALinear):
    def merged_weight(self) -> torch.Tensor:
        return self.base.weight + self.lora_B @ self.lora_A


class LoRAMergeInPlace(LoRALinear):
    def merge(self) -> nn.Linear:  # peft-style in-place merge, returning the base itself
        with torch.no_grad():
            self.base.weight += self.scaling * self.lora_B @ self.lora_A
        return self.base


class LoRAFromPeft(LoRALinear):
    def __init__(self, base, rank, alpha):
        import peft  # the library the lab asks you to write

        super().__init__(base, rank, alpha)
        self.config = peft.LoraConfig(r=rank, lora_alpha=alpha)


# ------------------------------------------------------------------------------------- SFT


def sft_labels_keeps_prompt(input_ids, prompt_lengths, attention_mask):
    return input_ids.masked_fill(~attention_mask.bool(), IGNORE_INDEX)  # padding only


def _token_logprobs(logits, labels):
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
    targets = labels[:, 1:]
    picked = logprobs.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return picked, targets != IGNORE_INDEX


def sft_loss_no_shift(logits, labels):
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)


def sft_loss_mean_over_all_positions(logits, labels):
    picked, response = _token_logprobs(logits, labels)
    return -(picked * response).mean()  # divides by every position, prompt and padding too


def sft_loss_mean_of_sequences(logits, labels):
    picked, response = _token_logprobs(logits, labels)
    return -((picked * response).sum(-1) / response.sum(-1)).mean()


def sft_loss_log_of_softmax(logits, labels):
    probs = torch.softmax(logits[:, :-1], dim=-1)
    targets = labels[:, 1:]
    picked = probs.gather(-1, targets.clamp(min=0)[..., None])[..., 0].log()  # log(0) = -inf
    response = targets != IGNORE_INDEX
    return -picked[response].mean()


def sft_loss_from_the_course(logits, labels):
    return course_objectives.causal_lm_loss(logits, labels)


def sequence_logprobs_mean(logits, labels):
    picked, response = _token_logprobs(logits, labels)
    return (picked * response).sum(-1) / response.sum(-1)  # a mean: length-normalised


def sequence_logprobs_scores_ignored(logits, labels):
    picked, _ = _token_logprobs(logits, labels)
    return picked.sum(-1)  # the -100 positions are scored as token 0


def sequence_logprobs_in_place(logits, labels):
    logits -= logits.amax(-1, keepdim=True)  # "stabilise" the caller's tensor
    picked, response = _token_logprobs(logits, labels)
    return (picked * response).sum(-1)


# ------------------------------------------------------------------------------------- DPO


def _rewards(pc, pr, rc, rr, beta):
    return beta * (pc - rc), beta * (pr - rr)


def dpo_swapped(pc, pr, rc, rr, beta=0.1):
    chosen, rejected = _rewards(pc, pr, rc, rr, beta)
    return -F.logsigmoid(rejected - chosen).mean(), chosen, rejected


def dpo_beta_outside(pc, pr, rc, rr, beta=0.1):
    margin = (pc - rc) - (pr - rr)
    chosen, rejected = _rewards(pc, pr, rc, rr, beta)
    return -beta * F.logsigmoid(margin).mean(), chosen, rejected


def dpo_log_of_sigmoid(pc, pr, rc, rr, beta=0.1):
    chosen, rejected = _rewards(pc, pr, rc, rr, beta)
    return -torch.log(torch.sigmoid(chosen - rejected)).mean(), chosen, rejected


def dpo_no_reference(pc, pr, rc, rr, beta=0.1):
    chosen, rejected = beta * pc, beta * pr
    return -F.logsigmoid(chosen - rejected).mean(), chosen, rejected


def dpo_rewards_without_beta(pc, pr, rc, rr, beta=0.1):
    chosen, rejected = _rewards(pc, pr, rc, rr, beta)
    return -F.logsigmoid(chosen - rejected).mean(), pc - rc, pr - rr


def dpo_from_trl(pc, pr, rc, rr, beta=0.1):
    from trl import DPOTrainer  # the reference the lab is graded against, not allowed

    return DPOTrainer.dpo_loss(None, pc, pr, rc, rr)


def dpo_loops_forever(pc, pr, rc, rr, beta=0.1):
    while True:
        pass


CASES = [
    ("B initialised randomly", "lora_linear", LoRABRandom, "at initialisation", "FAIL",
     ["exactly", "lora_B to zeros"]),
    ("both factors zero (no learning signal)", "lora_linear", LoRABothZero, "initialisation",
     "FAIL", ["lora_A is all zeros", "neither factor ever gets a gradient"]),
    ("A zero, B random", "lora_linear", LoRAAZeroBRandom, "initialisation", "FAIL",
     ["lora_B must start at exactly zero"]),
    ("scaling alpha instead of alpha / r", "lora_linear", LoRAScaledByAlpha, "forward", "FAIL",
     ["scaled by alpha alone", "divide by the rank"]),
    ("scaling alpha / sqrt(r)", "lora_linear", LoRAScaledByRootRank, "forward", "FAIL",
     ["rsLoRA"]),
    ("base layer not frozen", "lora_linear", LoRABaseNotFrozen, "only lora_A", "FAIL",
     ["base.weight", "freeze the base layer"]),
    ("merge forgets the scaling", "lora_linear", LoRAMergeForgetsScaling, "merge", "FAIL",
     ["merged weight", "forgets the alpha / r scaling"]),
    ("merge in place into the base", "lora_linear", LoRAMergeInPlace, "merge", "FAIL",
     ["*new* nn.Linear"]),
    ("LoRA importing peft", "lora_linear", LoRAFromPeft, "lora_A", "FORBIDDEN",
     ["must not use `peft`", "imports peft"]),
    ("labels keep the prompt (loss over prompt tokens)", "sft_labels", sft_labels_keeps_prompt,
     "prompt and padding", "FAIL", ["prompt kept", "train on the prompt"]),
    ("SFT loss without the label shift", "sft_loss", sft_loss_no_shift, "hand-sized", "FAIL",
     ["no label shift", "labels[:, t + 1]"]),
    ("SFT loss averaged over every position", "sft_loss", sft_loss_mean_over_all_positions,
     "hand-sized", "FAIL", ["ignored ones included"]),
    ("SFT loss as a mean of sequence means", "sft_loss", sft_loss_mean_of_sequences,
     "random batch", "FAIL", ["per-sequence means"]),
    ("SFT loss as log(softmax)", "sft_loss", sft_loss_log_of_softmax, "large logits", "FAIL",
     ["inf", "log_softmax"]),
    ("SFT loss from utils.objectives", "sft_loss", sft_loss_from_the_course, "shape", "FORBIDDEN",
     ["utils.objectives", "causal_lm_loss"]),
    ("mean instead of sum of log-probs", "sequence_logprobs", sequence_logprobs_mean,
     "hand-sized", "FAIL", ["mean over response tokens", "needs the sum"]),
    ("log-probs scoring ignored positions", "sequence_logprobs",
     sequence_logprobs_scores_ignored, "hand-sized", "FAIL", ["scored as token 0"]),
    ("log-probs modifying the logits in place", "sequence_logprobs", sequence_logprobs_in_place,
     "shape", "FAIL", ["modified its input `logits` in place"]),
    ("DPO with chosen and rejected swapped", "dpo_loss", dpo_swapped, "hand-sized", "FAIL",
     ["swapped", "sign of the margin is flipped"]),
    ("DPO with beta outside the sigmoid", "dpo_loss", dpo_beta_outside, "hand-sized", "FAIL",
     ["beta belongs *inside* the sigmoid"]),
    ("DPO without the reference model", "dpo_loss", dpo_no_reference, "hand-sized", "FAIL",
     ["without the reference model"]),
    ("DPO rewards without beta", "dpo_loss", dpo_rewards_without_beta, "implicit rewards",
     "FAIL", ["chosen_rewards", "the log-ratio without beta"]),
    ("DPO as log(sigmoid) overflowing", "dpo_loss", dpo_log_of_sigmoid, "large log-ratios",
     "FAIL", ["inf values", "F.logsigmoid"]),
    ("DPO from trl", "dpo_loss", dpo_from_trl, "shapes", "FORBIDDEN", ["must not use `trl`"]),
    ("DPO looping forever", "dpo_loss", dpo_loops_forever, "shapes", "TIMEOUT", ["stopped after"]),
]  # fmt: skip
