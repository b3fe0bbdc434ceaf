"""Evaluation metrics of the application tasks, each the field's standard definition.

- classification: ``accuracy``, ``f1_score`` (binary or macro), ``confusion_matrix``
  (checked against scikit-learn);
- NER: ``bio_entities`` and ``entity_f1`` (CoNLL entity-level scores, checked against seqeval),
  ``entity_errors`` (what went wrong with each entity, for error analysis);
- extractive QA: ``squad_normalize``, ``squad_exact_match``, ``squad_f1`` (the official SQuAD
  2.0 evaluation script's definitions);
- translation: ``corpus_bleu`` (mteval-13a tokenization, 4-gram, brevity penalty, "exp"
  smoothing: the same numbers as ``sacrebleu.corpus_bleu``);
- summarization: ``rouge_n`` and ``rouge_l`` (F-measure, the ``rouge-score`` package's
  tokenizer, no stemming).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

# ---------------------------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------------------------


def _check_same_length(predictions: Sequence, references: Sequence) -> None:
    if len(predictions) != len(references):
        raise ValueError(
            f"predictions and references must have the same length, "
            f"got {len(predictions)} and {len(references)}"
        )
    if len(predictions) == 0:
        raise ValueError("predictions and references must not be empty")


def accuracy(predictions: Sequence[int], references: Sequence[int]) -> float:
    """Fraction of predictions equal to their reference label."""
    _check_same_length(predictions, references)
    hits = sum(int(p) == int(r) for p, r in zip(predictions, references, strict=True))
    return hits / len(references)


def confusion_matrix(
    predictions: Sequence[int], references: Sequence[int], num_classes: int
) -> list[list[int]]:
    """``matrix[true][predicted]`` counts, a ``num_classes x num_classes`` list of lists."""
    _check_same_length(predictions, references)
    matrix = [[0] * num_classes for _ in range(num_classes)]
    for p, r in zip(predictions, references, strict=True):
        if not (0 <= int(p) < num_classes and 0 <= int(r) < num_classes):
            raise ValueError(f"labels must lie in [0, {num_classes}), got {p} and {r}")
        matrix[int(r)][int(p)] += 1
    return matrix


def _f1_from_counts(tp: int, fp: int, fn: int) -> float:
    """Harmonic mean of precision and recall; 0 when there is nothing to score."""
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def f1_score(
    predictions: Sequence[int],
    references: Sequence[int],
    num_classes: int = 2,
    average: str = "binary",
    positive: int = 1,
) -> float:
    """F1 of class ``positive`` (``average="binary"``) or the unweighted mean over classes
    (``average="macro"``), as ``sklearn.metrics.f1_score``."""
    matrix = confusion_matrix(predictions, references, num_classes)

    def f1_of(c: int) -> float:
        tp = matrix[c][c]
        fp = sum(matrix[r][c] for r in range(num_classes)) - tp
        fn = sum(matrix[c]) - tp
        return _f1_from_counts(tp, fp, fn)

    if average == "binary":
        return f1_of(positive)
    if average == "macro":
        return sum(f1_of(c) for c in range(num_classes)) / num_classes
    raise ValueError(f"average must be 'binary' or 'macro', got {average!r}")


# ---------------------------------------------------------------------------------------------
# Named entity recognition
# ---------------------------------------------------------------------------------------------


def bio_entities(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """Entities ``(type, start, end)`` (end exclusive) of one BIO-tagged sentence.

    CoNLL (conlleval) reading, as seqeval's default mode: an ``I-X`` that does not continue
    an ``X`` entity starts a new one.
    """
    entities, current = set(), None  # current = [type, start]
    for i, tag in enumerate([*tags, "O"]):
        if tag != "O" and not re.fullmatch(r"[BI]-.+", tag):
            raise ValueError(f"tags must be 'O', 'B-TYPE' or 'I-TYPE', got {tag!r}")
        prefix, kind = (tag[0], tag[2:]) if tag != "O" else ("O", None)
        continues = prefix == "I" and current is not None and current[0] == kind
        if current is not None and not continues:
            entities.add((current[0], current[1], i))
            current = None
        if prefix == "B" or (prefix == "I" and not continues):
            current = [kind, i]
    return entities


@dataclass
class PRF:
    """Precision, recall, F1 and the counts behind them."""

    precision: float
    recall: float
    f1: float
    true_positives: int
    predicted: int
    gold: int


def entity_f1(
    predictions: Sequence[Sequence[str]], references: Sequence[Sequence[str]]
) -> dict[str, PRF]:
    """Micro-averaged entity-level scores over sentences (key ``"overall"``) and per type.

    An entity counts as correct only if its type and both boundaries match exactly.
    """
    _check_same_length(predictions, references)
    found, gold, correct = Counter(), Counter(), Counter()
    for sentence, (pred_tags, gold_tags) in enumerate(zip(predictions, references, strict=True)):
        if len(pred_tags) != len(gold_tags):
            raise ValueError(
                f"sentence {sentence}: {len(pred_tags)} predicted tags for "
                f"{len(gold_tags)} gold tags"
            )
        pred_set, gold_set = bio_entities(pred_tags), bio_entities(gold_tags)
        for kind, *_ in pred_set:
            found[kind] += 1
        for kind, *_ in gold_set:
            gold[kind] += 1
        for kind, *_ in pred_set & gold_set:
            correct[kind] += 1

    def prf(tp: int, n_pred: int, n_gold: int) -> PRF:
        precision = tp / n_pred if n_pred else 0.0
        recall = tp / n_gold if n_gold else 0.0
        return PRF(
            precision, recall, _f1_from_counts(tp, n_pred - tp, n_gold - tp), tp, n_pred, n_gold
        )

    scores = {k: prf(correct[k], found[k], gold[k]) for k in sorted(set(found) | set(gold))}
    scores["overall"] = prf(sum(correct.values()), sum(found.values()), sum(gold.values()))
    return scores


ENTITY_OUTCOMES = ("correct", "wrong type", "wrong boundaries", "wrong type and boundaries",
                   "missed", "spurious")  # fmt: skip


def _gold_outcome(entity: tuple[str, int, int], predicted: set[tuple[str, int, int]]) -> str:
    kind, start, end = entity
    overlapping = [(k, a, b) for k, a, b in predicted if a < end and start < b]
    if entity in predicted:
        return "correct"
    if not overlapping:
        return "missed"
    if any((a, b) == (start, end) for _, a, b in overlapping):
        return "wrong type"
    if any(k == kind for k, _, _ in overlapping):
        return "wrong boundaries"
    return "wrong type and boundaries"


def entity_errors(
    predictions: Sequence[Sequence[str]], references: Sequence[Sequence[str]]
) -> Counter:
    """How each entity fared, counted over sentences (keys :data:`ENTITY_OUTCOMES`).

    Every gold entity gets one outcome: ``correct`` (type and span exact, the true positives of
    :func:`entity_f1`), ``wrong type`` (a prediction has its exact span, not its type),
    ``wrong boundaries`` (an overlapping prediction of its type), ``wrong type and boundaries``
    (only overlapping predictions of other types) or ``missed`` (no overlapping prediction).
    Predicted entities that overlap no gold entity are ``spurious``.
    """
    _check_same_length(predictions, references)
    counts = Counter(dict.fromkeys(ENTITY_OUTCOMES, 0))
    for pred_tags, gold_tags in zip(predictions, references, strict=True):
        if len(pred_tags) != len(gold_tags):
            raise ValueError(f"{len(pred_tags)} predicted tags for {len(gold_tags)} gold tags")
        pred_set, gold_set = bio_entities(pred_tags), bio_entities(gold_tags)
        for entity in gold_set:
            counts[_gold_outcome(entity, pred_set)] += 1
        for _, start, end in pred_set:
            counts["spurious"] += not any(a < end and start < b for _, a, b in gold_set)
    return counts


# ---------------------------------------------------------------------------------------------
# Extractive question answering (SQuAD)
# ---------------------------------------------------------------------------------------------


def squad_normalize(text: str) -> str:
    """Lower case, drop punctuation and the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def squad_exact_match(prediction: str, gold_answers: Sequence[str]) -> float:
    """1.0 if the normalized prediction equals any normalized gold answer.

    An empty ``gold_answers`` means "no answer": then only an empty prediction is right.
    """
    golds = list(gold_answers) or [""]
    return float(any(squad_normalize(prediction) == squad_normalize(g) for g in golds))


def _token_f1(prediction: str, gold: str) -> float:
    pred_tokens, gold_tokens = squad_normalize(prediction).split(), squad_normalize(gold).split()
    if not pred_tokens or not gold_tokens:  # no-answer: right only if both are empty
        return float(pred_tokens == gold_tokens)
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    return _f1_from_counts(common, len(pred_tokens) - common, len(gold_tokens) - common)


def squad_f1(prediction: str, gold_answers: Sequence[str]) -> float:
    """Best bag-of-tokens F1 between the normalized prediction and any gold answer."""
    return max(_token_f1(prediction, g) for g in (list(gold_answers) or [""]))


# ---------------------------------------------------------------------------------------------
# Translation (BLEU)
# ---------------------------------------------------------------------------------------------

_13A_RULES = [
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),  # punctuation and symbols
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),  # period/comma unless after a digit
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),  # period/comma unless before a digit
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),  # dash after a digit
]


def tokenize_13a(line: str) -> list[str]:
    """The mteval-v13a tokenizer used by WMT and sacrebleu's default."""
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    for entity, char in (("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">")):
        line = line.replace(entity, char)
    line = f" {line} "
    for pattern, replacement in _13A_RULES:
        line = pattern.sub(replacement, line)
    return line.split()


def _ngrams(tokens: list[str], max_order: int) -> Counter:
    orders = range(1, max_order + 1)
    return Counter(tuple(tokens[i : i + n]) for n in orders for i in range(len(tokens) - n + 1))


@dataclass
class BLEU:
    """Corpus BLEU (0-100) and its sufficient statistics."""

    score: float
    precisions: list[float]  # modified n-gram precisions, percent
    brevity_penalty: float
    hypothesis_length: int
    reference_length: int


def corpus_bleu(
    hypotheses: Sequence[str],
    references: Sequence[Sequence[str]],
    max_order: int = 4,
    tokenize: str = "13a",
) -> BLEU:
    """Corpus-level BLEU with "exp" smoothing, as ``sacrebleu.corpus_bleu(hyps, refs)``.

    ``references`` is a list of reference *streams*, each as long as ``hypotheses``
    (sacrebleu's layout): ``references[k][i]`` is the k-th reference of sentence i.
    ``tokenize`` is ``"13a"`` or ``"none"`` (split on whitespace).
    """
    if tokenize not in ("13a", "none"):
        raise ValueError(f"tokenize must be '13a' or 'none', got {tokenize!r}")
    if isinstance(hypotheses, str) or not references or isinstance(references[0], str):
        raise TypeError("hypotheses must be a list of strings, references a list of lists")
    for stream in references:
        _check_same_length(hypotheses, stream)
    split = tokenize_13a if tokenize == "13a" else str.split
    correct, total = [0] * max_order, [0] * max_order
    hyp_len = ref_len = 0
    for i, hypothesis in enumerate(hypotheses):
        hyp_tokens = split(hypothesis)
        ref_tokens = [split(stream[i]) for stream in references]
        max_ref_counts = Counter()
        for tokens in ref_tokens:
            max_ref_counts |= _ngrams(tokens, max_order)  # element-wise max over references
        hyp_len += len(hyp_tokens)
        # closest reference length, ties broken towards the shorter one
        ref_len += min((abs(len(t) - len(hyp_tokens)), len(t)) for t in ref_tokens)[1]
        for gram, count in _ngrams(hyp_tokens, max_order).items():
            total[len(gram) - 1] += count
            correct[len(gram) - 1] += min(count, max_ref_counts[gram])
    if hyp_len < ref_len:
        brevity_penalty = math.exp(1 - ref_len / hyp_len) if hyp_len else 0.0
    else:
        brevity_penalty = 1.0
    precisions, smooth = [0.0] * max_order, 1.0
    if not any(correct):
        return BLEU(0.0, precisions, brevity_penalty, hyp_len, ref_len)
    for n in range(max_order):
        if total[n] == 0:
            break
        if correct[n] == 0:
            smooth *= 2
            precisions[n] = 100.0 / (smooth * total[n])
        else:
            precisions[n] = 100.0 * correct[n] / total[n]
    log_mean = sum(math.log(p) if p > 0 else -9999999999 for p in precisions) / max_order
    return BLEU(brevity_penalty * math.exp(log_mean), precisions, brevity_penalty, hyp_len, ref_len)


# ---------------------------------------------------------------------------------------------
# Summarization (ROUGE)
# ---------------------------------------------------------------------------------------------


def rouge_tokenize(text: str) -> list[str]:
    """rouge-score's tokenizer without stemming: lower case, runs of [a-z0-9] only."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


@dataclass
class Rouge:
    """ROUGE precision, recall and F-measure."""

    precision: float
    recall: float
    fmeasure: float


def _rouge_from_overlap(overlap: int, n_prediction: int, n_reference: int) -> Rouge:
    precision = overlap / n_prediction if n_prediction else 0.0
    recall = overlap / n_reference if n_reference else 0.0
    f = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return Rouge(precision, recall, f)


def rouge_n(prediction: str, reference: str, n: int = 1) -> Rouge:
    """ROUGE-N: clipped n-gram overlap between one prediction and one reference."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")

    def grams(text: str) -> Counter:
        tokens = rouge_tokenize(text)
        return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))

    pred, ref = grams(prediction), grams(reference)
    return _rouge_from_overlap(sum((pred & ref).values()), sum(pred.values()), sum(ref.values()))


def _lcs_length(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> Rouge:
    """ROUGE-L: longest common subsequence of tokens (sentence-level, no summary splitting)."""
    pred, ref = rouge_tokenize(prediction), rouge_tokenize(reference)
    return _rouge_from_overlap(_lcs_length(pred, ref), len(pred), len(ref))
