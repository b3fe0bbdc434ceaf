"""Preference-tune the SFT model of ``scripts/sft_smollm2.py`` with DPO (Rafailov et al.
2023) and save the adapter (``checkpoints/smollm2_dpo.safetensors`` + ``.json``).

Pairs (sentiment prompts): "chosen" is the reference label; "rejected" is the SFT model's
own greedy answer when the task metric says it is wrong, otherwise the principled corruption
of a binary label: the other label. Training prompts are train-split examples the SFT run did
not use; held-out pairs come from the SFT run's held-out prompts and its recorded answers.
Everything is the library's (``utils.dpo``): pairs by ``preference_pair`` and ``pad_pairs`` in
``LengthBuckets``, the policy (the SFT adapter, trained on) beside a frozen copy as reference
(``PolicyWithReference``), ``DPOLoss`` through the course's ``Trainer``.

Reported on the held-out pairs: reward accuracy and margin before (0 by construction) and
after; the task metric (strict accuracy of greedy answers) for the SFT and the DPO model and
the win-rate of DPO over SFT (and over zero-shot) judged by it, ties counting half; perplexity
on held-out Wikipedia paragraphs. Budget <= 60 min on 2 cores; seeded:

    python scripts/dpo_smollm2.py              # needs checkpoints/smollm2_sft.safetensors
    python scripts/dpo_smollm2.py --probe      # a few pairs and prompts, writes nothing
"""

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from scripts import sft_smollm2 as sft  # noqa: E402
from utils import instruction_data as idata  # noqa: E402
from utils import lora  # noqa: E402
from utils.dpo import (  # noqa: E402
    DPOLoss,
    PolicyWithReference,
    dpo_loss,
    pad_pairs,
    preference_pair,
    sequence_logprobs,
)
from utils.evaluation import text_perplexity, win_rate  # noqa: E402
from utils.pretrained import load_smollm2_hf  # noqa: E402
from utils.sft import LengthBuckets, logits_of  # noqa: E402

REJECTED = (
    "the SFT model's own greedy answer when wrong by strict accuracy (computed for training "
    "prompts, recorded by the SFT run for held-out ones), else the other label"
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
# Pairs and their sequence log-probabilities
# ---------------------------------------------------------------------------------------------


def flip(label: str, task: str) -> str:
    first, second = idata.LABELS[task]
    return second if label == first else first


def correctness(answers: list[str], examples: list) -> list[float]:
    """1.0 where an answer is exactly its example's label (strict accuracy), else 0.0."""
    return [
        idata.label_accuracy([a], [e])["strict"] for a, e in zip(answers, examples, strict=True)
    ]


def make_pairs(examples: list, answers: list[str]) -> tuple[list[tuple[str, str, str]], int]:
    """``(prompt, chosen, rejected)`` triples and how many rejected answers are the model's
    own (wrong by strict accuracy); the others are the flipped label."""
    pairs, own = [], 0
    for example, answer, right in zip(
        examples, answers, correctness(answers, examples), strict=True
    ):
        own += not right
        rejected = flip(example.response, example.task) if right else answer
        pairs.append((example.prompt, example.response, rejected))
    return pairs, own


def pair_examples(tokenizer, pairs: list[tuple[str, str, str]]) -> list[dict]:
    """Each triple as a :func:`utils.dpo.preference_pair` in the model's chat template."""
    return [preference_pair(tokenizer, sft.conversation(p), c, r) for p, c, r in pairs]


@torch.no_grad()
def pair_logprobs(model, pairs: list[dict], pad_id: int, batch_pairs: int = 8) -> Tensor:
    """(2P,) answer log-probabilities of all P chosen, then all P rejected answers, in the
    pairs' order, ``batch_pairs`` at a time (eval mode, then back)."""
    was_training, chosen, rejected = model.training, [], []
    model.eval()
    for i in range(0, len(pairs), batch_pairs):
        x, y = pad_pairs(pairs[i : i + batch_pairs], pad_id)
        c, r = sequence_logprobs(logits_of(model(x)), y).chunk(2)
        chosen.append(c)
        rejected.append(r)
    model.train(was_training)
    return torch.cat([*chosen, *rejected])


def reward_stats(policy: Tensor, reference: Tensor, beta: float) -> dict[str, float]:
    """DPO loss, reward accuracy, margin and mean rewards of (2P,) log-probabilities."""
    terms = dpo_loss(*policy.chunk(2), *reference.chunk(2), beta=beta)
    return {"loss": terms.loss.item(), "reward_accuracy": terms.accuracy.item(),
            "reward_margin": terms.margin.item(),
            "chosen_reward": terms.chosen_rewards.mean().item(),
            "rejected_reward": terms.rejected_rewards.mean().item()}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def preference_data(model, tokenizer, recipe: dict, sft_info: dict) -> dict:
    """Training pairs (the SFT model's own answers now) and held-out pairs (its recorded
    answers to the held-out prompts)."""
    used = {tuple(x) for x in sft_info["data"]["train_ids"]}
    unused = [
        e for e in idata.examples("sentiment", "train") if ("sentiment", e.source_id) not in used
    ]
    train = idata.fixed_subset(unused, recipe["train_pairs"], seed=recipe["seed"])
    answers = sft.answer_prompts(model, tokenizer, [e.prompt for e in train],
                                 recipe["max_new_tokens"])  # fmt: skip
    n = recipe["heldout_pairs"]
    heldout = sft.evaluation_sets(recipe["eval_prompts"])["sentiment"][:n]
    recorded = sft_info["metrics"]
    train_pairs, train_own = make_pairs(train, answers)
    heldout_pairs, heldout_own = make_pairs(heldout, recorded["sft"]["sentiment"]["answers"][:n])
    return {"train": train_pairs, "heldout": heldout_pairs, "train_own": train_own,
            "heldout_own": heldout_own, "train_ids": [e.source_id for e in train],
            "heldout_examples": heldout,
            "heldout_sft_right": correctness(recorded["sft"]["sentiment"]["answers"][:n], heldout),
            "heldout_zero_right": correctness(
                recorded["zero_shot"]["sentiment"]["answers"][:n], heldout)}  # fmt: skip


def heldout_report(model, tokenizer, data: dict, before: Tensor, after: Tensor, recipe) -> dict:
    """Reward statistics, task accuracy of greedy answers and win-rates on the held-out pairs."""
    examples = data["heldout_examples"]
    answers = sft.answer_prompts(model, tokenizer, [e.prompt for e in examples],
                                 recipe["max_new_tokens"])  # fmt: skip
    dpo_right, sft_right = correctness(answers, examples), data["heldout_sft_right"]
    zero_right, n = data["heldout_zero_right"], len(examples)
    return {
        "pairs": n,
        "rewards": {
            "before": reward_stats(before, before, recipe["beta"]),
            "after": reward_stats(after, before, recipe["beta"]),
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
        "answers": answers,
        "policy_logprobs": after.tolist(),
        "reference_logprobs": before.tolist(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probe", action="store_true", help="tiny run, nothing saved")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sft", type=Path, default=SFT, help="the SFT adapter to start from")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipe = dict(RECIPE)
    if args.probe:
        recipe.update(train_pairs=4, heldout_pairs=2, batch_size=2, eval_prompts=4,
                      subset_prompts=2, perplexity_paragraphs=1, warmup_iters=1)  # fmt: skip
    start, load_start = time.perf_counter(), os.getloadavg()
    sft_info = json.loads(args.sft.with_suffix(".json").read_text())
    policy, tokenizer = load_smollm2_hf()
    lora.load_adapter(policy, args.sft)
    pad = tokenizer.eos_token_id
    data = preference_data(policy, tokenizer, recipe, sft_info)
    print(f"pairs: train {len(data['train'])} ({data['train_own']} own wrong answers), "
          f"held-out {len(data['heldout'])} ({data['heldout_own']} own) "
          f"({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip
    train_pairs = pair_examples(tokenizer, data["train"])
    heldout_pairs = pair_examples(tokenizer, data["heldout"])
    before = pair_logprobs(policy, heldout_pairs, pad)  # the reference: policy == SFT model
    objective = DPOLoss(recipe["beta"])
    batches = LengthBuckets(train_pairs, recipe["batch_size"], pad, seed=recipe["seed"],
                            collate=pad_pairs)  # fmt: skip
    model = PolicyWithReference(policy, copy.deepcopy(policy))
    trainer, train_seconds = sft.train_lora(model, batches, len(train_pairs), recipe, objective)
    after = pair_logprobs(policy, heldout_pairs, pad)
    report = heldout_report(policy, tokenizer, data, before, after, recipe)
    paragraphs = idata.heldout_paragraphs(recipe["perplexity_paragraphs"])
    report["perplexity"] = {
        "sft": sft_info["metrics"]["sft"]["perplexity"],
        "dpo": text_perplexity(policy, tokenizer, paragraphs, recipe["perplexity_tokens"]),
    }
    print("held-out", json.dumps({k: v for k, v in report.items()
                                  if "logprobs" not in k and k != "answers"}))  # fmt: skip
    if args.probe:
        return
    lora.save_adapter(policy, OUT)
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
