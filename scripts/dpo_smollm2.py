"""Preference-tune the SFT model of ``scripts/sft_smollm2.py`` with DPO (Rafailov et al.
2023) and save the adapter (``checkpoints/smollm2_dpo.safetensors`` + ``.json``).

Pairs (sentiment prompts): "chosen" is the reference label; "rejected" is the SFT model's
own answer when the task metric says it is wrong (sampled at temperature 1 for training
prompts, the recorded greedy answer for held-out ones), otherwise the principled corruption
of a binary label: the other label. Training prompts are train-split examples the SFT run did
not use; held-out pairs come from the held-out prompts. The policy continues the SFT adapter;
the reference is the SFT model itself (its log-probabilities are computed once, before the
first update, when policy == reference).

Reported on the held-out pairs: reward accuracy and margin before (0 by construction) and
after; the task metric (the greedy answer is exactly the label: read off one teacher-forced
pass over prompt + chosen answer, the same tokens greedy decoding writes) for the SFT and the
DPO model, and the win-rate of DPO over SFT (and over zero-shot) judged by it, ties counting
half; perplexity on held-out Wikipedia paragraphs. Budget <= 60 min on 2 shared cores;
seeded:

    python scripts/dpo_smollm2.py              # needs checkpoints/smollm2_sft.safetensors
    python scripts/dpo_smollm2.py --probe      # a few pairs and prompts, writes nothing
"""

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from scripts import sft_smollm2 as sft  # noqa: E402
from utils import instruction_data as idata  # noqa: E402
from utils import lora  # noqa: E402
from utils.dpo import DPOResult, dpo_loss, token_logprobs  # noqa: E402
from utils.evaluation import win_rate  # noqa: E402
from utils.objectives import IGNORE_INDEX  # noqa: E402
from utils.pretrained import load_smollm2_hf  # noqa: E402

REJECTED = (
    "the SFT model's own answer when wrong by strict accuracy (sampled at temperature 1 for "
    "training prompts, its recorded greedy answer for held-out ones), else the other label"
)
SFT = ROOT / "checkpoints" / "smollm2_sft.safetensors"
OUT = ROOT / "checkpoints" / "smollm2_dpo.safetensors"
RECIPE = {
    **sft.RECIPE,
    "train_pairs": 160,
    "heldout_pairs": 200,  # every held-out prompt of the SFT run
    "beta": 0.1,
    "batch_size": 8,  # pairs per step
    "epochs": 2,
    "lr": 5e-4,
    "warmup_iters": 4,
}


# ---------------------------------------------------------------------------------------------
# Pairs and sequence log-probabilities
# ---------------------------------------------------------------------------------------------


def flip(label: str, task: str) -> str:
    first, second = idata.LABELS[task]
    return second if label == first else first


def make_pairs(examples: list, answers: list[str]) -> tuple[list[tuple[str, str, str]], int]:
    """``(prompt, chosen, rejected)`` triples and how many rejected answers are the model's
    own (wrong by strict accuracy); the others are the flipped label."""
    pairs, own = [], 0
    for example, answer in zip(examples, answers, strict=True):
        wrong = idata.label_accuracy([answer], [example])["strict"] == 0.0
        own += wrong
        pairs.append(
            (
                example.prompt,
                example.response,
                answer if wrong else flip(example.response, example.task),
            )
        )
    return pairs, own


def pair_tensors(tokenizer, pairs: list[tuple[str, str, str]]) -> tuple[Tensor, Tensor]:
    """``(2, 2P, T)`` ids and next-token labels of the P chosen then the P rejected
    sequences (right-padded; IGNORE_INDEX on prompt and padding)."""
    rows = [sft.sft_ids(tokenizer, p, c) for p, c, _ in pairs]
    rows += [sft.sft_ids(tokenizer, p, r) for p, _, r in pairs]
    ids = sft.pad_right([r[0] for r in rows], tokenizer.eos_token_id)
    labels = sft.pad_right([r[1] for r in rows], IGNORE_INDEX)
    return torch.stack([ids[:, :-1], labels[:, 1:]])


def sequence_logprobs(model: nn.Module, ids: Tensor, labels: Tensor, greedy: bool = False):
    """Sum of log p(label) over the labelled positions of each row: ids, labels (B, T) -> (B,).
    With ``greedy``, also (B,) booleans: every labelled token is the argmax, i.e. greedy
    decoding would write exactly this response and stop (teacher forcing gives the same
    logits as decoding)."""
    logits = model(input_ids=ids).logits
    total = token_logprobs(logits, labels).sum(-1)
    if not greedy:
        return total
    return total, ((logits.argmax(-1) == labels) | (labels == IGNORE_INDEX)).all(-1)


class PolicyLogprobs(nn.Module):
    """For the Trainer: ``x`` (2, 2P, T) ids and labels -> the policy's (2P,) log-probs."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return sequence_logprobs(self.model, x[0], x[1])


def dpo_terms(policy: Tensor, reference: Tensor, beta: float) -> DPOResult:
    """:func:`utils.dpo.dpo_loss` of (2P,) log-probs laid out chosen first, then rejected."""
    return dpo_loss(*policy.chunk(2), *reference.chunk(2), beta=beta)


class PairBatches:
    """Shuffled epochs of P pairs: ``x`` (2, 2P, T) ids/labels, ``y`` (2P,) reference log-probs."""

    def __init__(self, tokenizer, pairs, reference: Tensor, batch_size: int, seed: int = 0):
        self.tokenizer, self.pairs, self.reference = tokenizer, pairs, reference
        self.batch_size, self.steps_per_epoch = batch_size, -(-len(pairs) // batch_size)
        self.generator = torch.Generator().manual_seed(seed)
        self.order, self.position = [], 0

    def __call__(self) -> tuple[Tensor, Tensor]:
        if self.position >= len(self.order):
            self.order = torch.randperm(len(self.pairs), generator=self.generator).tolist()
            self.position = 0
        chosen = self.order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        n = len(self.pairs)
        reference = torch.cat([self.reference[chosen], self.reference[[n + i for i in chosen]]])
        return pair_tensors(self.tokenizer, [self.pairs[i] for i in chosen]), reference


@torch.no_grad()
def all_logprobs(model, tokenizer, pairs, batch_pairs: int = 8) -> tuple[Tensor, Tensor]:
    """(2P,) log-probs of all chosen then all rejected responses, ``batch_pairs`` at a time,
    and (P,) whether greedy decoding writes exactly the chosen response."""
    was_training = model.training
    model.eval()
    chosen, rejected, exact = [], [], []
    for i in range(0, len(pairs), batch_pairs):
        x = pair_tensors(tokenizer, pairs[i : i + batch_pairs])
        logprobs, greedy = sequence_logprobs(model, x[0], x[1], greedy=True)
        c, r = logprobs.chunk(2)
        chosen.append(c)
        rejected.append(r)
        exact.append(greedy.chunk(2)[0])
    model.train(was_training)
    return torch.cat([*chosen, *rejected]), torch.cat(exact)


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def correctness(answers: list[str], examples: list) -> list[float]:
    """1.0 where an answer is exactly its example's label (strict accuracy), else 0.0."""
    return [
        idata.label_accuracy([a], [e])["strict"] for a, e in zip(answers, examples, strict=True)
    ]


def preference_data(model, tokenizer, recipe: dict, sft_info: dict) -> dict:
    """Training pairs (own sampled answers) and held-out pairs (SFT's greedy answers)."""
    used = {tuple(x) for x in sft_info["data"]["train_ids"]}
    unused = [
        e for e in idata.examples("sentiment", "train") if ("sentiment", e.source_id) not in used
    ]
    train = idata.fixed_subset(unused, recipe["train_pairs"], seed=recipe["seed"])
    torch.manual_seed(recipe["seed"])
    sampled = sft.generate_answers(
        model, tokenizer, [e.prompt for e in train], recipe["max_new_tokens"], sample=True
    )
    heldout = sft.evaluation_sets(recipe["eval_prompts"], recipe["subset_prompts"])["sentiment"]
    greedy = sft_info["metrics"]["sft"]["sentiment"]["answers"]
    n = recipe["heldout_pairs"]
    zero_shot = sft_info["metrics"]["zero_shot"]["sentiment"]["answers"]
    train_pairs, train_own = make_pairs(train, sampled)
    heldout_pairs, heldout_own = make_pairs(heldout[:n], greedy[:n])
    return {"train": train_pairs, "heldout": heldout_pairs, "train_own": train_own,
            "heldout_own": heldout_own, "train_ids": [e.source_id for e in train],
            "heldout_zero_right": correctness(zero_shot[:n], heldout[:n])}  # fmt: skip


def reward_stats(policy: Tensor, reference: Tensor, beta: float) -> dict[str, float]:
    terms = dpo_terms(policy, reference, beta)
    return {"loss": terms.loss.item(), "reward_accuracy": terms.accuracy.item(),
            "reward_margin": terms.margin.item(),
            "chosen_reward": terms.chosen_rewards.mean().item(),
            "rejected_reward": terms.rejected_rewards.mean().item()}  # fmt: skip


def heldout_report(before, after, sft_exact, dpo_exact, zero_right, beta) -> dict:
    """Reward statistics, exact-answer accuracy and win-rates on the held-out pairs."""
    n = len(sft_exact)
    sft_right, dpo_right = sft_exact.float().tolist(), dpo_exact.float().tolist()
    return {
        "pairs": n,
        "rewards": {
            "before": reward_stats(before, before, beta),
            "after": reward_stats(after, before, beta),
        },  # fmt: skip
        "accuracy": {
            "sft": sum(sft_right) / n,
            "dpo": sum(dpo_right) / n,
            "zero_shot": sum(zero_right) / n,
        },  # fmt: skip
        "win_rates": {
            "dpo_vs_sft": win_rate(dpo_right, sft_right),
            "sft_vs_zero_shot": win_rate(sft_right, zero_right),
            "dpo_vs_zero_shot": win_rate(dpo_right, zero_right),
        },  # fmt: skip
    }


def train_dpo(model, tokenizer, recipe: dict, data: dict):
    """Reference log-probs (policy == reference at the start), then DPO through the Trainer.
    Returns the trainer, its seconds, and the held-out report."""
    beta = recipe["beta"]
    reference, _ = all_logprobs(model, tokenizer, data["train"])
    heldout_reference, sft_exact = all_logprobs(model, tokenizer, data["heldout"])
    batches = PairBatches(tokenizer, data["train"], reference, recipe["batch_size"], recipe["seed"])

    def loss_fn(policy: Tensor, ref: Tensor) -> Tensor:
        return dpo_terms(policy, ref, beta).loss

    trainer, seconds = sft.train_lora(model, batches, recipe, loss_fn, PolicyLogprobs(model))
    heldout_policy, dpo_exact = all_logprobs(model, tokenizer, data["heldout"])
    report = heldout_report(heldout_reference, heldout_policy, sft_exact, dpo_exact,
                            data["heldout_zero_right"], beta)  # fmt: skip
    report["policy_logprobs"] = heldout_policy.tolist()
    report["reference_logprobs"] = heldout_reference.tolist()
    return trainer, seconds, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probe", action="store_true", help="tiny run, nothing saved")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sft", type=Path, default=SFT, help="the SFT adapter to start from")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipe = dict(RECIPE)
    if args.probe:
        recipe.update(train_pairs=2, heldout_pairs=2, batch_size=2, eval_prompts=4,
                      subset_prompts=2, perplexity_paragraphs=1, warmup_iters=1)  # fmt: skip
    start, load_start = time.perf_counter(), os.getloadavg()
    sft_info = json.loads(args.sft.with_suffix(".json").read_text())
    model, tokenizer = load_smollm2_hf()
    lora.load_adapter(model, args.sft)
    data = preference_data(model, tokenizer, recipe, sft_info)
    print(f"pairs: train {len(data['train'])} ({data['train_own']} own wrong answers), "
          f"held-out {len(data['heldout'])} ({data['heldout_own']} own) "
          f"({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip
    trainer, train_seconds, report = train_dpo(model, tokenizer, recipe, data)
    paragraphs = idata.heldout_paragraphs(recipe["perplexity_paragraphs"])
    report["perplexity"] = {
        "sft": sft_info["metrics"]["sft"]["perplexity"],
        "dpo": sft.perplexity(model, tokenizer, paragraphs, recipe["perplexity_tokens"]),
    }
    print("held-out", json.dumps({k: v for k, v in report.items() if "logprobs" not in k}))
    if args.probe:
        return
    lora.save_adapter(model, OUT)
    info = {
        "recipe": recipe,
        "starts_from": {"adapter": args.sft.name, "sha256": sft_info["sha256"]},
        "base_model": sft_info["base_model"],
        "data": {"train_ids": data["train_ids"], "train_own_rejected": data["train_own"],
                 "heldout_own_rejected": data["heldout_own"],
                 "heldout_pairs": [list(p) for p in data["heldout"]], "rejected": REJECTED},
        "metrics": report,
        "train_loss": trainer.history.train_loss,
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - start, 1),
        "machine": f"{platform.machine()}, {args.threads} threads",
        "load_average": {"start": load_start, "end": os.getloadavg()},
        **sft.file_record(OUT),
        "versions": sft.versions(),
    }  # fmt: skip
    OUT.with_suffix(".json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"saved {OUT} ({OUT.stat().st_size:,} bytes) in {info['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
