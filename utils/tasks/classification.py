"""Sequence classification: a pooled encoder plus a linear head, and a bag-of-words baseline."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from utils.tasks.encoders import encode, mean_pool, tokenized_batches


@dataclass
class ClassifierConfig:
    n_embd: int  # E, the encoder's output width
    num_classes: int
    pooling: str = "mean"  # "mean" over real tokens, or "first" ([CLS])
    dropout: float = 0.1


class SequenceClassifier(nn.Module):
    """``encoder`` -> pool -> dropout -> linear: logits (B, C) from ids and mask (B, T)."""

    def __init__(self, encoder: nn.Module, config: ClassifierConfig):
        super().__init__()
        if config.pooling not in ("mean", "first"):
            raise ValueError(f"pooling must be 'mean' or 'first', got {config.pooling!r}")
        self.config = config
        self.encoder = encoder
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.n_embd, config.num_classes)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = encode(self.encoder, input_ids, attention_mask)
        return self.classify_hidden(hidden, attention_mask)

    def classify_hidden(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        """Logits (B, C) from encoder states (B, T, E): the head alone (e.g. on cached states)."""
        if self.config.pooling == "mean":
            pooled = mean_pool(hidden, attention_mask)
        else:
            pooled = hidden[:, 0]
        return self.head(self.dropout(pooled))

    def loss(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> Tensor:
        """Mean cross-entropy of the logits against labels (B,)."""
        return nn.functional.cross_entropy(self(input_ids, attention_mask), labels)


@torch.no_grad()
def predict_labels(
    model: SequenceClassifier,
    tokenizer,
    texts: list[str],
    batch_size: int = 64,
    max_length: int = 64,
) -> list[int]:
    """Arg-max class of each text, the model in eval mode."""
    model.eval()
    labels = []
    for batch in tokenized_batches(tokenizer, texts, batch_size, max_length):
        labels += model(batch["input_ids"], batch["attention_mask"]).argmax(-1).tolist()
    return labels


def bag_of_words_baseline(texts: list[str], labels: list[int], max_features: int = 20_000):
    """A fitted scikit-learn pipeline: unigram+bigram TF-IDF, then logistic regression."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    if len(texts) != len(labels):
        raise ValueError(f"texts and labels differ in length: {len(texts)} vs {len(labels)}")
    pipeline = make_pipeline(
        TfidfVectorizer(ngram_range=(1, 2), max_features=max_features, sublinear_tf=True),
        LogisticRegression(max_iter=1000, C=10.0),
    )
    return pipeline.fit(texts, labels)
