"""Encoding speed of our pure-Python byte-level BPE against Rust tokenizers.

    python benchmarks/tokenizer.py
    python benchmarks/tokenizer.py --vocab-size 4096

On the whole of tiny Shakespeare (1,115,394 characters):

* a vocabulary trained here (``--vocab-size``, default 1024): our :class:`ByteLevelBPE`
  against Hugging Face ``tokenizers`` (ByteLevel BPE trained on the same text with the same
  size); training times too;
* GPT-2's real ranks (from ``openai-whisper``): ours against ``tiktoken``.

Ours is timed twice: with an empty per-chunk cache ("cold": every distinct pre-tokenized
chunk runs BPE once) and again with the cache filled ("warm": only the regular expression
and dictionary look-ups). Each time is the best of ``--repeats`` runs. Both encoders must
agree on the number of tokens (same merges learned up to tie order; identical ranks).
``tokenizers`` encodes the text as one 1.1 MB string (one thread), as ours does.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import tiktoken
import tiktoken.load
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.data import load_tinyshakespeare  # noqa: E402
from utils.pretrained import gpt2_ranks_path, load_gpt2_tokenizer  # noqa: E402
from utils.tokenization import GPT2_SPLIT_PATTERN, ByteLevelBPE  # noqa: E402


def best_time(fn, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def train_hf(text: str, vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([text], trainer)
    return tokenizer


def time_ours(tokenizer: ByteLevelBPE, text: str, repeats: int) -> tuple[float, float, int]:
    tokenizer._cache.clear()
    start = time.perf_counter()
    ids = tokenizer.encode(text)
    cold = time.perf_counter() - start
    warm, _ = best_time(lambda: tokenizer.encode(text), repeats)
    return cold, warm, len(ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    text = load_tinyshakespeare()
    megabytes = len(text.encode()) / 1e6
    print(f"tiny Shakespeare, {megabytes:.2f} MB, {os.cpu_count()} CPUs")

    rows = []
    train_ours, ours = best_time(lambda: ByteLevelBPE.train(text, args.vocab_size), 1)
    train_rust, hf = best_time(lambda: train_hf(text, args.vocab_size), 1)
    cold, warm, n_ours = time_ours(ours, text, args.repeats)
    rust, encoding = best_time(lambda: hf.encode(text), args.repeats)
    rows.append((f"trained, V={args.vocab_size}", "ours (cold cache)", cold, n_ours))
    rows.append((f"trained, V={args.vocab_size}", "ours (warm cache)", warm, n_ours))
    rows.append((f"trained, V={args.vocab_size}", "HF tokenizers", rust, len(encoding.ids)))

    gpt2 = load_gpt2_tokenizer()
    ranks = tiktoken.load.load_tiktoken_bpe(str(gpt2_ranks_path()))
    reference = tiktoken.Encoding("gpt2", pat_str=GPT2_SPLIT_PATTERN, mergeable_ranks=ranks,
                                  special_tokens={})  # fmt: skip
    cold, warm, n_ours = time_ours(gpt2, text, args.repeats)
    fast, ids = best_time(lambda: reference.encode_ordinary(text), args.repeats)
    rows.append(("GPT-2 ranks", "ours (cold cache)", cold, n_ours))
    rows.append(("GPT-2 ranks", "ours (warm cache)", warm, n_ours))
    rows.append(("GPT-2 ranks", "tiktoken", fast, len(ids)))

    print(
        f"training V={args.vocab_size}: ours {train_ours:.2f} s, HF tokenizers {train_rust:.2f} s"
    )
    print("\n| vocabulary | encoder | seconds | MB/s | tokens |")
    print("|---|---|---|---|---|")
    for vocabulary, encoder, seconds, tokens in rows:
        print(
            f"| {vocabulary} | {encoder} | {seconds:.3f} | {megabytes / seconds:.1f} | {tokens:,} |"
        )


if __name__ == "__main__":
    main()
