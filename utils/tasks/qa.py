"""Extractive question answering: a start/end span head on an encoder (BERT's SQuAD recipe).

The input is ``[CLS] question [SEP] context [SEP]``; the head scores every token as the
answer's start and end, and the answer is the best-scoring span inside the context.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from utils.tasks.encoders import encode


@dataclass
class QABatch:
    input_ids: Tensor  # (B, T)
    attention_mask: Tensor  # (B, T)
    token_type_ids: Tensor  # (B, T) 0 question, 1 context
    context_mask: Tensor  # (B, T) True on context tokens
    offsets: list[list[tuple[int, int]]]
    start_positions: Tensor  # (B,) token index of the answer's first token (0 if unknown)
    end_positions: Tensor  # (B,)

    def __getitem__(self, index: slice) -> QABatch:
        """The examples ``index`` (a slice) of the batch."""
        return QABatch(*(getattr(self, f.name)[index] for f in fields(self)))


class SpanHead(nn.Module):
    """Encoder plus one linear layer giving start and end logits, each (B, T)."""

    def __init__(self, encoder: nn.Module, n_embd: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(n_embd, 2)

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        return self.span_logits(encode(self.encoder, input_ids, attention_mask, token_type_ids))

    def span_logits(self, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """Start and end logits, each (B, T), from encoder states (B, T, E): the head alone."""
        logits = self.head(hidden)
        return logits[..., 0], logits[..., 1]

    def loss(self, batch: QABatch) -> Tensor:
        """``span_loss`` at the batch's answer positions."""
        start_logits, end_logits = self(batch.input_ids, batch.attention_mask, batch.token_type_ids)
        return span_loss(start_logits, end_logits, batch.start_positions, batch.end_positions)


def span_loss(
    start_logits: Tensor, end_logits: Tensor, start_positions: Tensor, end_positions: Tensor
) -> Tensor:
    """Mean of the start and end cross-entropies: logits (B, T), token positions (B,)."""
    return 0.5 * (
        nn.functional.cross_entropy(start_logits, start_positions)
        + nn.functional.cross_entropy(end_logits, end_positions)
    )


def char_span_to_tokens(
    offsets: list[tuple[int, int]], sequence_ids: list[int | None], start_char: int, end_char: int
) -> tuple[int, int] | None:
    """Token indices (first, last) of the context tokens covering characters
    ``[start_char, end_char)``, or ``None`` if the span is not wholly in the (truncated)
    context. ``offsets`` and ``sequence_ids`` come from a fast tokenizer (context = 1)."""
    if start_char >= end_char:
        raise ValueError(f"empty answer span: start_char={start_char}, end_char={end_char}")
    context = [i for i, s in enumerate(sequence_ids) if s == 1]
    if not context or offsets[context[0]][0] > start_char or offsets[context[-1]][1] < end_char:
        return None
    first = next(i for i in context if offsets[i][1] > start_char)
    last = next(i for i in reversed(context) if offsets[i][0] < end_char)
    return first, last


def encode_qa(
    tokenizer,
    questions: list[str],
    contexts: list[str],
    answers: list[dict] | None = None,
    max_length: int = 256,
) -> QABatch:
    """Tokenize question/context pairs (context truncated) and, when ``answers``
    (``{"text", "answer_start"}`` each) are given, locate the answers in tokens. An answer cut
    off by truncation points at token 0 ([CLS]), the SQuAD 2.0 convention for "no answer"."""
    batch = tokenizer(
        questions,
        contexts,
        truncation="only_second",
        max_length=max_length,
        padding=True,
        return_offsets_mapping=True,
        return_tensors="pt",
    )
    n = len(questions)
    starts, ends = torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long)
    context_mask = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    offsets = batch["offset_mapping"].tolist()
    for i in range(n):
        sequence_ids = batch.sequence_ids(i)
        context_mask[i] = torch.tensor([s == 1 for s in sequence_ids])
        if answers is not None:
            start = answers[i]["answer_start"]
            span = char_span_to_tokens(
                offsets[i], sequence_ids, start, start + len(answers[i]["text"])
            )
            if span is not None:
                starts[i], ends[i] = span
    return QABatch(
        batch["input_ids"],
        batch["attention_mask"],
        batch["token_type_ids"],
        context_mask,
        [[tuple(o) for o in row] for row in offsets],
        starts,
        ends,
    )


def best_spans(
    start_logits: Tensor, end_logits: Tensor, context_mask: Tensor, max_answer_tokens: int = 30
) -> Tensor:
    """(B, 2) token indices (start, end) maximizing start + end logit over context spans with
    ``start <= end < start + max_answer_tokens``. Inputs are (B, T)."""
    if not (start_logits.shape == end_logits.shape == context_mask.shape):
        raise ValueError(
            f"start_logits, end_logits and context_mask must share a (B, T) shape, got "
            f"{tuple(start_logits.shape)}, {tuple(end_logits.shape)}, {tuple(context_mask.shape)}"
        )
    T = start_logits.shape[-1]
    scores = start_logits.unsqueeze(-1) + end_logits.unsqueeze(-2)  # (B, T start, T end)
    i = torch.arange(T, device=scores.device)
    allowed = (i[None, :] >= i[:, None]) & (i[None, :] < i[:, None] + max_answer_tokens)
    allowed = allowed & context_mask.unsqueeze(-1) & context_mask.unsqueeze(-2)
    flat = scores.masked_fill(~allowed, float("-inf")).flatten(1).argmax(-1)
    return torch.stack([flat // T, flat % T], dim=-1)


def span_texts(batch: QABatch, spans: Tensor, contexts: list[str]) -> list[str]:
    """The context text of each (start, end) token span (B, 2) of an encoded batch."""
    if spans.shape != (len(contexts), 2):
        raise ValueError(f"spans must be (B, 2) = ({len(contexts)}, 2), got {tuple(spans.shape)}")
    return [
        context[batch.offsets[j][first][0] : batch.offsets[j][last][1]]
        for j, (context, (first, last)) in enumerate(zip(contexts, spans.tolist(), strict=True))
    ]
