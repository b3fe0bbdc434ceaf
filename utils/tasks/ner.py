"""Token classification (NER): word-piece/label alignment, a per-token head, word decoding.

A word split into several word pieces keeps its label on the **first** piece only; the other
pieces and the special tokens get ``IGNORE_INDEX`` so the loss skips them, and predictions are
read back from first pieces (the recipe of the BERT paper, Devlin et al. 2019).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from utils.objectives import IGNORE_INDEX
from utils.tasks.encoders import encode, tokenized_batches


def align_labels(word_ids: list[int | None], word_labels: list[int]) -> list[int]:
    """Per-token labels (T,) from per-word labels, given each token's word index.

    ``word_ids`` is a fast tokenizer's ``encoding.word_ids()``: ``None`` for special tokens,
    else the index of the word the token comes from.
    """
    labels, previous = [], None
    for word in word_ids:
        if word is None or word == previous:
            labels.append(IGNORE_INDEX)
        else:
            if not 0 <= word < len(word_labels):
                raise ValueError(f"word id {word} out of range for {len(word_labels)} labels")
            labels.append(word_labels[word])
        previous = word
    return labels


def word_predictions(word_ids: list[int | None], token_predictions: list[int]) -> list[int]:
    """Per-word predictions read from each word's first token; inverse of ``align_labels``.

    Only words that have a token are returned (truncation may drop the last words).
    """
    if len(word_ids) != len(token_predictions):
        raise ValueError(
            f"word_ids and token_predictions differ: {len(word_ids)} vs {len(token_predictions)}"
        )
    n_words = max((w for w in word_ids if w is not None), default=-1) + 1
    words, previous = [0] * n_words, None
    for word, prediction in zip(word_ids, token_predictions, strict=True):
        if word is not None and word != previous:
            words[word] = prediction
        previous = word
    return words


def encode_tagged_sentences(
    tokenizer, sentences: list[list[str]], word_labels: list[list[int]], max_length: int = 64
) -> dict[str, Tensor]:
    """Tokenize pre-split sentences: input_ids, attention_mask and aligned labels, all (B, T)."""
    batch = tokenizer(
        sentences,
        is_split_into_words=True,
        truncation=True,
        max_length=max_length,
        padding=True,
        return_tensors="pt",
    )
    labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
    for i, tags in enumerate(word_labels):
        aligned = align_labels(batch.word_ids(i), tags)
        labels[i, : len(aligned)] = torch.tensor(aligned)
    return {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "labels": labels,
    }


@dataclass
class TokenClassifierConfig:
    n_embd: int  # E
    num_labels: int  # L
    dropout: float = 0.1


class TokenClassifier(nn.Module):
    """``encoder`` -> dropout -> linear: logits (B, T, L) from ids and mask (B, T)."""

    def __init__(self, encoder: nn.Module, config: TokenClassifierConfig):
        super().__init__()
        self.config = config
        self.encoder = encoder
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.n_embd, config.num_labels)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.classify_hidden(encode(self.encoder, input_ids, attention_mask))

    def classify_hidden(self, hidden: Tensor) -> Tensor:
        """Logits (B, T, L) from encoder states (B, T, E): the head alone."""
        return self.head(self.dropout(hidden))

    def loss(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> Tensor:
        """``token_classification_loss`` of the logits against labels (B, T)."""
        return token_classification_loss(self(input_ids, attention_mask), labels)


def token_classification_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over tokens whose label is not ``IGNORE_INDEX``: (B, T, L), (B, T)."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"labels must be (B, T) = {tuple(logits.shape[:-1])}, got {tuple(labels.shape)}"
        )
    return nn.functional.cross_entropy(
        logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX
    )


@torch.no_grad()
def predict_tags(
    model: TokenClassifier,
    tokenizer,
    sentences: list[list[str]],
    label_names: list[str],
    batch_size: int = 64,
    max_length: int = 64,
) -> list[list[str]]:
    """BIO tag names per word of each pre-split sentence (model in eval mode)."""
    model.eval()
    tags = []
    split = {"is_split_into_words": True}
    for batch in tokenized_batches(tokenizer, sentences, batch_size, max_length, **split):
        predictions = model(batch["input_ids"], batch["attention_mask"]).argmax(-1)
        for j in range(len(predictions)):
            words = sentences[len(tags)]
            per_word = word_predictions(batch.word_ids(j), predictions[j].tolist())
            per_word += [0] * (len(words) - len(per_word))  # truncated words -> "O"
            tags.append([label_names[k] for k in per_word])
    return tags
