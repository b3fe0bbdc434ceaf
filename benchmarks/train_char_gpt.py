"""Time a character-level GPT on tiny Shakespeare to validation loss 1.88 (CPU).

Anchor (nanoGPT's documented CPU recipe, ``--recipe nanogpt``: 4 layers, 4 heads, width 128,
block 64, batch 12, lr 1e-3, 2000 iterations, no dropout): validation loss 1.886 in 105 s on
2 cores. The course recipe (``--recipe course``, the default) changes only what the chapter
explains: bfloat16 autocast (this CPU has AVX-512 BF16: matmuls about 2x faster), a higher
peak learning rate with warmup and a cosine decay that ends exactly at the last step, and
fewer evaluations. The validation loss is the mean over *all* of the validation split (111k
characters in non-overlapping windows of the block size), the quantity nanoGPT estimates from
random batches.

    python benchmarks/train_char_gpt.py                     # the course recipe
    python benchmarks/train_char_gpt.py --recipe nanogpt    # the anchor
    python benchmarks/train_char_gpt.py --max-iters 1500 --lr 2e-3   # try a variation

Prints the config, ms per iteration, the first evaluation at or below the target (iteration
and wall time, evaluations included) and the final validation loss. ``scripts/
train_char_gpt.py`` trains the same recipe and saves the checkpoint later chapters load.

Measured 2026-11-23 on an idle 2-core machine (AMD EPYC, AVX-512 BF16), 2 threads, course
recipe: val loss 2.1464 / 1.9286 / 1.8534 at iterations 600 / 1200 / 1800; target 1.88 reached
at iteration 1800 (the first evaluation after 1200) after 41.0 s wall, 22.8 ms/iter including
evaluations. On a machine loaded by other jobs a second thread mostly waits for a core (the
same run took 113 s with ``--threads 1`` and far longer with 2), so use ``--threads 1`` there.
Single-thread CPU time per step: float32 65 ms, bfloat16 32-36 ms.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.data import load_tinyshakespeare  # noqa: E402
from utils.pretrained import char_gpt_data  # noqa: E402
from utils.training import RandomWindows, TrainConfig, Trainer, sequential_windows  # noqa: E402
from utils.transformer import GPT, GPTConfig  # noqa: E402

TARGET = 1.88


@dataclasses.dataclass
class Recipe:
    """Model, data and optimisation settings of one run."""

    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    batch_size: int = 12
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)


RECIPES = {
    "nanogpt": Recipe(
        train=TrainConfig(
            max_iters=2000, lr=1e-3, min_lr=1e-4, warmup_iters=100, eval_interval=250,
            grad_clip=1.0, betas=(0.9, 0.99), weight_decay=0.1,
        )
    ),
    "course": Recipe(
        train=TrainConfig(
            max_iters=1800, lr=2e-3, min_lr=1e-4, warmup_iters=100, eval_interval=600,
            grad_clip=1.0, betas=(0.9, 0.99), weight_decay=0.1, precision="bfloat16",
        )
    ),
}  # fmt: skip


def run(recipe: Recipe, progress: bool = True) -> tuple[GPT, Trainer, dict]:
    """Train ``recipe`` on tiny Shakespeare; returns the model, its trainer and a summary."""
    tokenizer, train, val = char_gpt_data(load_tinyshakespeare())
    config = GPTConfig(
        tokenizer.vocab_size, recipe.block_size, recipe.n_layer, recipe.n_head, recipe.n_embd
    )
    torch.manual_seed(recipe.train.seed)
    model = GPT(config)
    batches = RandomWindows(train, recipe.block_size, recipe.batch_size, seed=recipe.train.seed)
    val_batches = sequential_windows(val, recipe.block_size, batch_size=256)
    train_config = dataclasses.replace(recipe.train, progress=progress)
    trainer = Trainer(model, train_config, batches, {"val": val_batches})
    start = time.perf_counter()
    history = trainer.fit()
    wall = time.perf_counter() - start
    reached = [
        (step, seconds)
        for step, seconds, loss in zip(
            history.eval_step, history.eval_time, history.eval_loss["val"], strict=True
        )
        if loss <= TARGET
    ]
    summary = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "iterations": trainer.step,
        "wall_s": wall,
        "ms_per_iter": 1000 * wall / trainer.step,  # evaluations included
        "final_val_loss": history.eval_loss["val"][-1],
        "target_step": reached[0][0] if reached else None,
        "target_s": reached[0][1] if reached else None,
        "tokenizer": tokenizer,
    }
    return model, trainer, summary


def parse_recipe(argv=None) -> tuple[Recipe, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", choices=RECIPES, default="course")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default all)")
    for name in ("n_layer", "n_head", "n_embd", "block_size", "batch_size"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int)
    for name in ("max_iters", "warmup_iters", "eval_interval"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int)
    for name in ("lr", "min_lr", "weight_decay"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=float)
    parser.add_argument("--precision", choices=["float32", "bfloat16"])
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    recipe = RECIPES[args.recipe]
    model_changes = {
        k: getattr(args, k)
        for k in ("n_layer", "n_head", "n_embd", "block_size", "batch_size")
        if getattr(args, k) is not None
    }
    train_changes = {
        k: getattr(args, k)
        for k in ("max_iters", "warmup_iters", "eval_interval", "lr", "min_lr", "weight_decay",
                  "precision")
        if getattr(args, k) is not None
    }  # fmt: skip
    train = dataclasses.replace(recipe.train, **train_changes)
    return dataclasses.replace(recipe, train=train, **model_changes), args


def report(trainer: Trainer, s: dict) -> None:
    """Print the evaluations and the result of a :func:`run`."""
    history = trainer.history
    for step, seconds, loss in zip(
        history.eval_step, history.eval_time, history.eval_loss["val"], strict=True
    ):
        print(f"  step {step:5d}  {seconds:6.1f} s  val loss {loss:.4f}")
    print(f"parameters {s['parameters']:,}  iterations {s['iterations']}  "
          f"{s['ms_per_iter']:.1f} ms/iter (evaluations included)  "
          f"wall {s['wall_s']:.1f} s")  # fmt: skip
    if s["target_step"] is None:
        print(f"target val loss {TARGET} NOT reached; final val loss {s['final_val_loss']:.4f}")
    else:
        print(f"reached val loss <= {TARGET} at iteration {s['target_step']} after "
              f"{s['target_s']:.1f} s; final val loss {s['final_val_loss']:.4f}")  # fmt: skip


def main(argv=None) -> None:
    recipe, args = parse_recipe(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"recipe {args.recipe}: {recipe}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    _, trainer, summary = run(recipe, progress=not args.no_progress)
    report(trainer, summary)


if __name__ == "__main__":
    main()
