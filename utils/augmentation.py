"""Text augmentation by neighbour replacement: swap some words for their nearest neighbours
in a word-embedding table (a cheap stand-in for synonym replacement, Wei & Zou 2019).

Neighbours by cosine are often synonyms ("terrible" -> "horrible") but also antonyms ("good"
-> "bad"): embeddings learned from context put words used in the same places together.
"""

from __future__ import annotations

import random
import re

import torch
import torch.nn.functional as F
from torch import Tensor

from utils import checks

WORD = re.compile(r"[A-Za-z]+")


def nearest_neighbours(vectors: Tensor, queries: Tensor, k: int) -> Tensor:
    """Indices (Q, k) of the k rows of ``vectors`` (N, E) most cosine-similar to each query row
    (``queries``: Q indices into ``vectors``), the query itself excluded."""
    checks.floating("vectors", vectors)
    if vectors.dim() != 2:
        raise ValueError(f"vectors must be (N, E), got shape {tuple(vectors.shape)}")
    if not 1 <= k < len(vectors):
        raise ValueError(
            f"k must be in [1, {len(vectors) - 1}] for {len(vectors)} vectors, got {k}"
        )
    unit = F.normalize(vectors, dim=-1)
    similarity = unit[queries] @ unit.T  # (Q, N)
    similarity[torch.arange(len(queries)), queries] = -float("inf")  # not its own neighbour
    return similarity.topk(k, dim=-1).indices


def neighbour_table(
    words: list[str], vectors: Tensor, queries: list[str], k: int
) -> dict[str, list[str]]:
    """Each query word found in ``words`` (one per row of ``vectors`` (N, E)) -> its k nearest
    other words; queries not in ``words`` are left out."""
    if len(words) != len(vectors):
        raise ValueError(
            f"words must have one entry per row of vectors ({len(vectors)}), got {len(words)}"
        )
    row = {word: i for i, word in enumerate(words)}
    found = sorted({q for q in queries if q in row})
    if not found:
        return {}
    indices = nearest_neighbours(vectors, torch.tensor([row[q] for q in found]), k).tolist()
    return {q: [words[j] for j in near] for q, near in zip(found, indices, strict=True)}


def replace_words(text: str, table: dict[str, list[str]], rate: float, rng: random.Random) -> str:
    """``text`` with each word found in ``table`` (lower case) replaced, with probability
    ``rate``, by one of its neighbours drawn by ``rng``; capitalisation and the rest kept."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate}")

    def swap(match: re.Match) -> str:
        word = match.group(0)
        options = table.get(word.lower())
        if not options or rng.random() >= rate:
            return word
        new = rng.choice(options)
        return new.capitalize() if word[0].isupper() else new

    return WORD.sub(swap, text)


def augment(
    texts: list[str],
    labels: list[int],
    table: dict[str, list[str]],
    copies: int,
    rate: float,
    seed: int,
) -> tuple[list[str], list[int]]:
    """The texts and labels followed by ``copies`` augmented versions of each (same labels)."""
    if len(texts) != len(labels):
        raise ValueError(f"labels must have one entry per text ({len(texts)}), got {len(labels)}")
    rng = random.Random(seed)
    new_texts = [replace_words(t, table, rate, rng) for _ in range(copies) for t in texts]
    return texts + new_texts, labels + labels * copies
