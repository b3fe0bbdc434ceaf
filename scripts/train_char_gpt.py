"""Train the course's character-level GPT on tiny Shakespeare and save the checkpoint that
chapters 4 and 5 load (``checkpoints/shakespeare_char.safetensors``, about 3 MB).

The recipe is the benchmark's (``benchmarks/train_char_gpt.py``, the same code and flags);
training is seeded (1,800 iterations; about 2 minutes on one core of the shared machine):

    python scripts/train_char_gpt.py
    python scripts/train_char_gpt.py --recipe nanogpt --out /tmp/nanogpt.safetensors

Load it with ``utils.pretrained.load_char_gpt(path) -> (model, tokenizer, info)``; ``info``
holds the recipe, the final validation loss and the training curves.
"""

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.train_char_gpt import parse_recipe, report, run  # noqa: E402
from utils.pretrained import save_char_gpt  # noqa: E402

DEFAULT_OUT = ROOT / "checkpoints" / "shakespeare_char.safetensors"
CURVE_EVERY = 10  # keep every 10th training loss in the checkpoint's info


def main() -> None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args, rest = parser.parse_known_args()
    recipe, recipe_args = parse_recipe(rest)
    if recipe_args.threads:
        torch.set_num_threads(recipe_args.threads)
    print(f"recipe {recipe_args.recipe}: {recipe}")
    model, trainer, summary = run(recipe, progress=not recipe_args.no_progress)
    report(trainer, summary)
    history = trainer.history
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_char_gpt(
        args.out, model, summary["tokenizer"],
        recipe=dataclasses.asdict(recipe), iterations=summary["iterations"],
        val_loss=summary["final_val_loss"], eval_step=history.eval_step,
        eval_loss=history.eval_loss["val"], train_step=history.step[::CURVE_EVERY],
        train_loss=history.train_loss[::CURVE_EVERY],
    )  # fmt: skip
    print(f"saved {args.out} ({args.out.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
