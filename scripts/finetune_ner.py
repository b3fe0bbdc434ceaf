"""Fine-tune MiniLM (all-MiniLM-L6-v2) for named-entity recognition on WNUT-17 with LoRA and
save the adapter chapter 5 loads: ``checkpoints/ner_minilm_lora.safetensors`` (the LoRA factors,
the tagging head and the LayerNorms of the tuned blocks) and ``ner_minilm_lora.json`` beside it
(recipe, data, metrics overall and per type, training time, sha256, versions).

Data: WNUT-17 (``utils.data.load_wnut17``): trained on the train and dev splits (3,394 + 1,009
sentences; dev is drawn from the same sources as test, Reddit/YouTube/StackExchange, where train
is tweets), scored on the whole test split (1,287 sentences) and on a fixed subset of 200 test
sentences. A word's label sits on its first word piece (``utils.tasks.ner``).

Recipe: LoRA rank 16 (alpha 32) on every linear layer of the top ``--tuned-blocks`` (3) blocks
(the frozen blocks below run once: chapter 5's frozen-prefix speed option), the tagging head
and those blocks' LayerNorms trained in full, 2 epochs at lr 1e-3, batch 16, through the
course's ``Trainer`` (AdamW, 10 % warmup then linear decay, length-bucketed batches).

Baselines on the same test split: memorizing the training tags, and (``--frozen-baseline``)
chapter 5's recipe, the top block in full + the head, lr 5e-4, 3 epochs. Seeded and
deterministic for a given thread count. Budget: at most 60 minutes on 2 cores (measured time
and machine load in the JSON):

    python scripts/finetune_ner.py
    python scripts/finetune_ner.py --epochs 1 --out /tmp/ner.safetensors
"""

import argparse
import dataclasses
import os
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from utils.data import WNUT17_LABELS, load_wnut17  # noqa: E402
from utils.lora import trainable_parameters  # noqa: E402
from utils.pretrained import load_minilm  # noqa: E402
from utils.tasks.encoders import freeze_all_but_last_layers  # noqa: E402
from utils.tasks.finetuned import (  # noqa: E402
    NER_ARTIFACT,
    BucketedBatches,
    OnCachedStates,
    add_lora,
    cached_prefix,
    environment,
    finetune_config,
    fixed_subset,
    minilm_tagger,
    save_finetuned,
)
from utils.tasks.metrics import entity_f1  # noqa: E402
from utils.tasks.ner import encode_tagged_sentences, predict_tags  # noqa: E402
from utils.tasks.ner import token_classification_loss as tag_loss  # noqa: E402
from utils.training import Trainer  # noqa: E402

SUBSET = 200  # test sentences the test re-scores
LABELS = list(WNUT17_LABELS)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=NER_ARTIFACT)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tuned-blocks", type=int, default=3, help="LoRA on the top blocks only")
    p.add_argument("--frozen-baseline", action="store_true", help="also run chapter 5's recipe")
    return p.parse_args()


def entity_scores(predicted: list[list[str]], gold: list[list[str]]) -> dict:
    """Entity P/R/F1 overall and per type, as plain dicts."""
    return {k: dataclasses.asdict(v) for k, v in entity_f1(predicted, gold).items()}


def scored(model, tokenizer, sentences: list, args) -> dict:
    words, gold = map(list, zip(*sentences, strict=True))
    predicted = predict_tags(model, tokenizer, words, LABELS, max_length=args.max_length)
    return entity_scores(predicted, gold)


def memorized_tags(train: list, test: list) -> dict:
    """Baseline: each word gets the tag it had most often in training ("O" if never seen)."""
    seen = {}
    for words, tags in train:
        for w, t in zip(words, tags, strict=True):
            seen.setdefault(w.lower(), Counter())[t] += 1
    predicted = [[seen[w.lower()].most_common(1)[0][0] if w.lower() in seen else "O"
                  for w in words] for words, _ in test]  # fmt: skip
    return entity_scores(predicted, [tags for _, tags in test])


def training_tensors(tokenizer, sentences: list, max_length: int):
    """Stacked ids and mask (N, T, 2), first-piece labels (N, T), real lengths."""
    label_id = {name: i for i, name in enumerate(LABELS)}
    words, tags = map(list, zip(*sentences, strict=True))
    batch = encode_tagged_sentences(
        tokenizer, words, [[label_id[t] for t in s] for s in tags], max_length
    )
    x = torch.stack([batch["input_ids"], batch["attention_mask"]], -1)
    return x, batch["labels"], batch["attention_mask"].sum(1).tolist()


def frozen_top_block(x: Tensor, y: Tensor, lengths: list[int], args, tokenizer, test: list):
    """Chapter 5's recipe (the top block in full + the head on cached states; lr 5e-4
    constant, 3 epochs, batch 32) on the same training sentences."""
    tagger = minilm_tagger(len(LABELS))
    freeze_all_but_last_layers(tagger, tagger.encoder.blocks, 1)
    tagger.head.requires_grad_(True)
    cached = cached_prefix(tagger.encoder, x, 1)
    batches = BucketedBatches(cached, y, lengths, 32, args.seed, per_token=True)
    steps = 3 * batches.steps_per_epoch()
    config = dataclasses.replace(
        finetune_config(steps, args.lr, args.seed),
        lr=5e-4,
        warmup_iters=0,
        schedule="constant",
        grad_clip=None,
    )
    Trainer(OnCachedStates(tagger, 1, tagger.classify_hidden), config, batches,
            loss_fn=tag_loss).fit()  # fmt: skip
    return scored(tagger, tokenizer, test, args)


def train_lora(args, x: Tensor, y: Tensor, lengths: list[int]):
    """LoRA-tune the top ``args.tuned_blocks`` blocks of MiniLM with a tagging head, on cached
    states of the frozen blocks below. Returns the model and the trainer."""
    torch.manual_seed(args.seed)
    tagger = minilm_tagger(len(LABELS))
    n_blocks = len(tagger.encoder.blocks)
    add_lora(tagger, args.rank, args.alpha, list(range(n_blocks - args.tuned_blocks, n_blocks)))
    cached = cached_prefix(tagger.encoder, x, args.tuned_blocks)
    batches = BucketedBatches(cached, y, lengths, args.batch_size, args.seed, per_token=True)
    steps = args.epochs * batches.steps_per_epoch()
    config = finetune_config(steps, args.lr, args.seed)
    trainer = Trainer(
        OnCachedStates(tagger, args.tuned_blocks, tagger.classify_hidden),
        config,
        batches,
        loss_fn=tag_loss,
    )
    trainer.fit()
    print(f"trained {trainer.step} steps in {trainer.elapsed:.0f} s", flush=True)
    return tagger, trainer


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    start, load_start = time.perf_counter(), os.getloadavg()
    train, test = load_wnut17("train") + load_wnut17("dev"), load_wnut17("test")
    subset = fixed_subset(test, SUBSET)
    tokenizer = load_minilm()[1]
    x, y, lengths = training_tensors(tokenizer, train, args.max_length)
    baselines = {"memorize_training_tags": memorized_tags(train, test)}
    if args.frozen_baseline:
        tic = time.perf_counter()
        baselines["frozen_top_block"] = frozen_top_block(x, y, lengths, args, tokenizer, test)
        baselines["frozen_top_block"]["seconds"] = time.perf_counter() - tic
    for name, result in baselines.items():
        print(f"baseline {name}: entity F1 {result['overall']['f1']:.3f}", flush=True)
    tagger, trainer = train_lora(args, x, y, lengths)
    metrics = {"test": scored(tagger, tokenizer, test, args),
               "subset": scored(tagger, tokenizer, subset, args)}  # fmt: skip
    print(f"LoRA test entity F1 {metrics['test']['overall']['f1']:.3f}; per type "
          + ", ".join(f"{k} {v['f1']:.3f}" for k, v in metrics["test"].items()))  # fmt: skip
    record = save_finetuned(tagger, args.out, {
        "task": "NER (WNUT-17 test)",
        "script": "scripts/finetune_ner.py",
        "recipe": {**vars(args), "out": f"checkpoints/{args.out.name}",
                   "train_config": dataclasses.asdict(trainer.config),
                   "parameters": str(trainable_parameters(tagger))},
        "labels": LABELS,
        "predict": {"max_length": args.max_length},
        "data": {"source": "utils.data.load_wnut17", "train": ["train", "dev"], "test": "test",
                 "train_sentences": len(train), "test_sentences": len(test),
                 "subset": f"utils.tasks.finetuned.fixed_subset(test, {SUBSET})"},
        "metrics": metrics, "baselines": baselines,
        "train_loss_every_5_steps": trainer.history.train_loss[::5],
        "train_seconds": trainer.elapsed, "total_seconds": time.perf_counter() - start,
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "versions": environment(args.threads),
    })  # fmt: skip
    print(f"saved {args.out} ({record['artifact']['bytes']:,} bytes) in "
          f"{record['total_seconds'] / 60:.1f} min")  # fmt: skip


if __name__ == "__main__":
    main()
