"""Generation-based evaluation: answer held-out prompts greedily, score the answers.

- :func:`greedy_answers`: batched greedy decoding of many prompts with a course model
  (prompts grouped by length, so no padding: the same tokens as one prompt at a time) or a
  Hugging Face model (left padding with an attention mask, through its ``generate``).
- Scores, each defined once in :mod:`utils.tasks.metrics`: :func:`exact_match` and
  :func:`token_f1` (SQuAD's definitions), :func:`label_accuracy` (generated class names),
  :func:`bleu` (corpus BLEU as sacrebleu); :func:`example_scores` per prompt.
- Comparing two models: :func:`win_rate` (ties count half), :func:`before_after_table`.
- Forgetting: :func:`text_perplexity` of general text before and after tuning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from utils.generation import generate
from utils.sft import encode_text, logits_of
from utils.tasks import metrics


def _is_hugging_face(model: nn.Module) -> bool:
    return hasattr(model, "generation_config")


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    stop_tokens: Sequence[int] = (),
    pad_token_id: int = 0,
    batch_size: int = 16,
) -> list[list[int]]:
    """The new token ids for each prompt (a list of ids), greedy, cut before the first stop
    token. The model is put in eval mode."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token-id lists")
    model.eval()
    hugging_face = _is_hugging_face(model)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    batches, batch = [], [order[0]]
    for i in order[1:]:  # course models: one length per batch
        same = hugging_face or len(prompts[i]) == len(prompts[batch[0]])
        if len(batch) < batch_size and same:
            batch.append(i)
        else:
            batches.append(batch)
            batch = [i]
    batches.append(batch)
    answers: list[list[int]] = [[] for _ in prompts]
    for batch in batches:
        run = _hugging_face_greedy if hugging_face else _course_greedy
        new = run(model, [prompts[i] for i in batch], max_new_tokens, stop_tokens, pad_token_id)
        for i, row in zip(batch, new.to("cpu").tolist(), strict=True):
            answers[i] = _cut(row, stop_tokens)
    return answers


def _course_greedy(model, prompts, max_new_tokens, stop_tokens, pad_token_id) -> Tensor:
    idx = torch.tensor(prompts, device=next(model.parameters()).device)
    out = generate(model, idx, max_new_tokens, stop_tokens=stop_tokens)
    return out[:, idx.shape[1] :]


def _hugging_face_greedy(model, prompts, max_new_tokens, stop_tokens, pad_token_id) -> Tensor:
    """Left padding, so every prompt ends where generation starts."""
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt) :], mask[row, length - len(prompt) :] = (
            torch.tensor(prompt),
            1,
        )
    device = next(model.parameters()).device
    options = dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=max_new_tokens,
        eos_token_id=list(stop_tokens) or None,
        pad_token_id=pad_token_id,
        **options,
    )
    return out[:, length:]


def _cut(tokens: list[int], stop_tokens: Sequence[int]) -> list[int]:
    for position, token in enumerate(tokens):
        if token in stop_tokens:
            return tokens[:position]
    return tokens


def greedy_answers(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    stop_tokens: Sequence[int] = (),
    batch_size: int = 16,
) -> list[str]:
    """Decoded greedy answers to formatted prompts (e.g. ``utils.sft.format_chat(...,
    add_generation_prompt=True)``), stripped of surrounding whitespace."""
    ids = [encode_text(tokenizer, p) for p in prompts]
    pad = getattr(tokenizer, "pad_token_id", None) or 0
    new = greedy_generate(model, ids, max_new_tokens, stop_tokens, pad, batch_size)
    return [tokenizer.decode(tokens).strip() for tokens in new]


# ---------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------


def _golds(references: Sequence) -> list[list[str]]:
    """Each reference as a list of acceptable answers (a string becomes a list of one)."""
    return [[r] if isinstance(r, str) else list(r) for r in references]


def _check_pairs(predictions: Sequence[str], references: Sequence) -> None:
    if isinstance(predictions, str) or len(predictions) != len(references) or not predictions:
        raise ValueError(
            "predictions and references must be non-empty lists of one length, got "
            f"{len(predictions)} and {len(references)}"
        )


def example_scores(metric: str, predictions: Sequence[str], references: Sequence) -> list[float]:
    """One score per prompt: ``"exact_match"`` or ``"f1"`` (SQuAD, best over the gold
    answers), or ``"bleu"`` (sentence BLEU, sacrebleu's exp smoothing, 0-100)."""
    _check_pairs(predictions, references)
    golds = _golds(references)
    if metric == "exact_match":
        return [metrics.squad_exact_match(p, g) for p, g in zip(predictions, golds, strict=True)]
    if metric == "f1":
        return [metrics.squad_f1(p, g) for p, g in zip(predictions, golds, strict=True)]
    if metric == "bleu":
        pairs = zip(predictions, golds, strict=True)
        return [metrics.corpus_bleu([p], [[r] for r in g]).score for p, g in pairs]
    raise ValueError(f"metric must be 'exact_match', 'f1' or 'bleu', got {metric!r}")


def exact_match(predictions: Sequence[str], references: Sequence) -> float:
    """Mean SQuAD exact match (normalized: case, punctuation, articles, spaces)."""
    scores = example_scores("exact_match", predictions, references)
    return sum(scores) / len(scores)


def token_f1(predictions: Sequence[str], references: Sequence) -> float:
    """Mean SQuAD token F1 (best over each prompt's gold answers)."""
    scores = example_scores("f1", predictions, references)
    return sum(scores) / len(scores)


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (0-100) with one reference per prediction, as ``sacrebleu.corpus_bleu``."""
    _check_pairs(predictions, references)
    return metrics.corpus_bleu(list(predictions), [list(references)]).score


def label_accuracy(
    predictions: Sequence[str], references: Sequence[str], labels: Sequence[str]
) -> float:
    """Accuracy of generated class names: a prediction counts as the label it equals after
    SQuAD normalization (anything else is wrong), then :func:`utils.tasks.metrics.accuracy`."""
    _check_pairs(predictions, references)
    index = {metrics.squad_normalize(label): i for i, label in enumerate(labels)}
    if unknown := [r for r in references if metrics.squad_normalize(r) not in index]:
        raise ValueError(f"references {unknown[:3]} are not among labels {list(labels)}")
    predicted = [index.get(metrics.squad_normalize(p), -1) for p in predictions]
    return metrics.accuracy(predicted, [index[metrics.squad_normalize(r)] for r in references])


# ---------------------------------------------------------------------------------------------
# Comparing two models
# ---------------------------------------------------------------------------------------------


def win_rate(scores_a: Sequence[float], scores_b: Sequence[float]) -> float:
    """Fraction of prompts where model A scores higher than model B, ties counted half."""
    if len(scores_a) != len(scores_b) or not scores_a:
        raise ValueError(
            f"scores_a and scores_b must be non-empty and of one length, got {len(scores_a)} "
            f"and {len(scores_b)}"
        )
    wins = sum(float(a > b) + 0.5 * float(a == b) for a, b in zip(scores_a, scores_b, strict=True))
    return wins / len(scores_a)


def before_after_table(before: dict[str, float], after: dict[str, float]) -> str:
    """A plain-text table: metric, before, after, change (4 significant digits)."""
    if before.keys() != after.keys():
        raise ValueError(
            f"before and after must have the same metrics, got {list(before)}, {list(after)}"
        )
    width = max(len("metric"), *(len(name) for name in before))
    lines = [f"{'metric':<{width}}  {'before':>9}  {'after':>9}  {'change':>9}"]
    for name in before:
        change = after[name] - before[name]
        lines.append(f"{name:<{width}}  {before[name]:>9.4g}  {after[name]:>9.4g}  {change:>+9.4g}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Forgetting
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def text_perplexity(model: nn.Module, tokenizer, texts: Sequence[str], max_tokens: int) -> float:
    """exp(mean next-token cross-entropy) over the first ``max_tokens`` tokens of each text
    (plain text, no chat template), one text at a time: what a tuned model still knows of
    general text. ``model(ids)`` (1, T) gives logits (1, T, V) or a Hugging Face output. The
    model is put in eval mode and then back in its mode."""
    was_training, total, count = model.training, 0.0, 0
    model.eval()
    device = next(model.parameters()).device
    for text in texts:
        ids = torch.tensor([encode_text(tokenizer, text)[:max_tokens]], device=device)
        if ids.shape[1] < 2:
            raise ValueError(f"each text needs at least 2 tokens, got {text!r}")
        logits = logits_of(model(ids))[0, :-1].float()
        total += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    model.train(was_training)
    return math.exp(total / count)
