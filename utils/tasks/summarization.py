"""Summarization: extractive (sentence embeddings + centrality, after LexRank) and
abstractive (an instruction-tuned decoder asked for a summary through its chat template)."""

from __future__ import annotations

import re

import torch
from torch import Tensor

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text``, split after . ! ? followed by space and a capital or digit."""
    return [s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip()]


def centrality(
    embeddings: Tensor, threshold: float = 0.1, damping: float = 0.85, iterations: int = 50
) -> Tensor:
    """LexRank scores (N,) of N unit-length sentence embeddings (N, E): PageRank on the
    graph of cosine similarities above ``threshold`` (rows normalized)."""
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be (N, E), got {tuple(embeddings.shape)}")
    n = len(embeddings)
    similarity = embeddings @ embeddings.T
    adjacency = torch.where(similarity > threshold, similarity, torch.zeros_like(similarity))
    transition = adjacency / adjacency.sum(1, keepdim=True).clamp(min=1e-12)
    scores = torch.full((n,), 1.0 / n)
    for _ in range(iterations):
        scores = (1 - damping) / n + damping * transition.T @ scores
    return scores


def extractive_summary(sentences: list[str], embeddings: Tensor, k: int = 2) -> str:
    """The ``k`` most central sentences, in their original order."""
    if not k >= 1:
        raise ValueError(f"k must be >= 1, got {k}")
    top = centrality(embeddings).topk(min(k, len(sentences))).indices.sort().values
    return " ".join(sentences[i] for i in top.tolist())


def summary_messages(text: str, words: int = 30) -> list[dict[str, str]]:
    """Chat messages asking an instruction-tuned model for a short summary of ``text``."""
    return [
        {
            "role": "user",
            "content": f"Summarize the following text in one sentence of at most {words} "
            f"words.\n\n{text}",
        }
    ]
