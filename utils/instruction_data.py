"""Instruction data, FLAN-style (Wei et al. 2021), made from the course's own data sets.

Each task turns the examples of one data set into ``(prompt, response)`` pairs through a few
natural-language instruction templates; an example's template is fixed by its position in
its split (``templates[i % len(templates)]``), so every template appears in training and in
evaluation, and the same call always gives the same prompts.

============  ========================================  ================================
task          source (``utils.data``)                   held out
============  ========================================  ================================
squad         SQuAD 2.0 answerable questions            whole articles: the last 6 titles
              (CS224n dev half, 16 articles)            in sorted order (1,074 questions)
sentiment     sentiment-labelled sentences (3,000)      every 5th sentence (600)
spam          SMS spam collection (5,574)               every 5th message (1,115)
translation   Tatoeba en-fr (5,000 pairs)               English sentences whose rank in
                                                        sorted order is 4 mod 5: all their
                                                        French translations go together
============  ========================================  ================================

SQuAD contexts are cut to their first :data:`SQUAD_CONTEXT_WORDS` words (short sequences for
CPU training); a question is kept only if one of its reference answers lies inside the cut
context, and only those answers count. The response to learn is the first such answer; the
task metric (SQuAD F1 / exact match, accuracy, BLEU) scores a prediction against all
``references``.

:func:`examples` gives one task's split; :func:`fixed_subset` a reproducible subset (for
quick checks and tests) and :func:`mixture` a shuffled multi-task training set.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from utils import data

TASKS = ("squad", "sentiment", "spam", "translation")
SPLITS = ("train", "eval")
SQUAD_EVAL_ARTICLES = 6  # the last 6 titles in sorted order are held out
SQUAD_CONTEXT_WORDS = 120  # contexts are cut to their first 120 words
LABELS = {"sentiment": ("positive", "negative"), "spam": ("spam", "ham")}
EVAL_EVERY = 5  # sentiment, spam, translation: every 5th item (by rank) is held out

TEMPLATES = {
    "squad": (
        "Read the passage and answer the question with a short phrase copied from it.\n\n"
        "Passage: {context}\n\nQuestion: {question}",
        "{context}\n\nUsing only a few words from the text above, answer: {question}",
        "Question: {question}\n\nAnswer it with the exact words of this passage, as briefly "
        "as possible.\n\n{context}",
    ),
    "sentiment": (
        "Is the sentiment of this review positive or negative? Answer with one word.\n\n{sentence}",
        'Review: "{sentence}"\nWas the writer happy (positive) or unhappy (negative)? '
        "Reply positive or negative.",
        "{sentence}\n\nClassify the sentiment of the sentence above as positive or negative.",
    ),
    "spam": (
        "Is this text message spam or ham (a normal message)? Answer with one word.\n\n{message}",
        'SMS: "{message}"\nReply spam if it is unsolicited advertising or a scam, otherwise ham.',
        "{message}\n\nLabel the message above as spam or ham.",
    ),
    "translation": (
        "Translate into French: {english}",
        "How do you say this in French?\n{english}",
        'English: "{english}"\nGive the French translation only.',
    ),
}


@dataclass(frozen=True)
class Example:
    """One instruction example: the user's ``prompt``, the ``response`` to learn, and every
    acceptable answer (``references``) for the task metric."""

    task: str
    prompt: str
    response: str
    references: tuple[str, ...]
    source_id: str  # where it comes from: SQuAD question id, or the item's index
    template: int


def _check_task_and_split(task: str, split: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def squad_article_split(questions: list[dict]) -> tuple[list[dict], list[dict]]:
    """``(train, eval)`` answerable questions, split by article: titles in sorted order, the
    last :data:`SQUAD_EVAL_ARTICLES` held out (for CS224n's 16 articles: 1,836 / 1,074)."""
    titles = sorted({q["title"] for q in questions})
    if len(titles) <= SQUAD_EVAL_ARTICLES:
        raise ValueError(f"questions must come from > {SQUAD_EVAL_ARTICLES} articles")
    held_out = set(titles[-SQUAD_EVAL_ARTICLES:])
    answerable = [q for q in questions if not q["is_impossible"]]
    return (
        [q for q in answerable if q["title"] not in held_out],
        [q for q in answerable if q["title"] in held_out],
    )


def cut_context(context: str, words: int = SQUAD_CONTEXT_WORDS) -> str:
    """The first ``words`` whitespace-separated words of ``context``, original spacing kept."""
    pieces = context.split()
    if len(pieces) <= words:
        return context
    end = 0
    for piece in pieces[:words]:
        end = context.index(piece, end) + len(piece)
    return context[:end]


def _squad_items(split: str) -> list[dict]:
    train, held_out = squad_article_split(data.load_squad2_dev())
    items = []
    for q in train if split == "train" else held_out:
        context = cut_context(q["context"])
        inside = [
            a["text"] for a in q["answers"] if a["answer_start"] + len(a["text"]) <= len(context)
        ]
        if inside:
            answers = tuple(dict.fromkeys(inside))  # distinct, first answer first
            fields = {"context": context, "question": q["question"]}
            items.append((fields, answers[0], answers, q["id"]))
    return items


def _every_fifth(items: list, split: str, rank: list[int] | None = None) -> list:
    """Items whose rank (default: position) is 4 mod 5 (:data:`EVAL_EVERY`) are held out."""
    rank = rank or list(range(len(items)))
    held_out = split == "eval"
    return [
        it
        for it, r in zip(items, rank, strict=True)
        if (r % EVAL_EVERY == EVAL_EVERY - 1) == held_out
    ]


def _sentiment_items(split: str) -> list:
    pairs = [
        ({"sentence": s}, "positive" if label else "negative", None, str(i))
        for i, (s, label) in enumerate(data.load_sentiment())
    ]
    return [(f, r, (r,), i) for f, r, _, i in _every_fifth(pairs, split)]


def _spam_items(split: str) -> list:
    pairs = [
        ({"message": m}, label, (label,), str(i))
        for i, (label, m) in enumerate(data.load_sms_spam())
    ]
    return _every_fifth(pairs, split)


def _translation_items(split: str) -> list:
    translations: dict[str, list[str]] = {}
    first_index: dict[str, int] = {}
    for i, (en, fr) in enumerate(data.load_tatoeba_en_fr()):
        translations.setdefault(en, []).append(fr)
        first_index.setdefault(en, i)
    english = list(translations)  # in order of first appearance
    order = {en: r for r, en in enumerate(sorted(english))}
    kept = _every_fifth(english, split, [order[en] for en in english])
    return [
        (
            {"english": en},
            translations[en][0],
            tuple(dict.fromkeys(translations[en])),
            str(first_index[en]),
        )
        for en in kept
    ]


ITEMS = {
    "squad": _squad_items,
    "sentiment": _sentiment_items,
    "spam": _spam_items,
    "translation": _translation_items,
}


def examples(task: str, split: str) -> list[Example]:
    """All the examples of ``task`` (see :data:`TASKS`) in ``split`` (train or eval), in the
    source's order, each formatted with template ``i % len(TEMPLATES[task])``."""
    _check_task_and_split(task, split)
    templates = TEMPLATES[task]
    return [
        Example(
            task,
            templates[i % len(templates)].format(**fields),
            response,
            references,
            source_id,
            i % len(templates),
        )
        for i, (fields, response, references, source_id) in enumerate(ITEMS[task](split))
    ]


def fixed_subset(items: list, size: int, seed: int = 0) -> list:
    """``size`` items drawn without replacement with ``random.Random(seed)``, in their
    original order: the same subset on every machine."""
    if not 0 < size <= len(items):
        raise ValueError(f"size must be in [1, {len(items)}], got {size}")
    chosen = sorted(random.Random(seed).sample(range(len(items)), size))
    return [items[i] for i in chosen]


def mixture(counts: dict[str, int], split: str = "train", seed: int = 0) -> list[Example]:
    """A shuffled multi-task set: ``counts[task]`` examples of each task (a
    :func:`fixed_subset` of its split), then shuffled together with ``random.Random(seed)``."""
    chosen = [
        ex for task, n in counts.items() for ex in fixed_subset(examples(task, split), n, seed)
    ]
    random.Random(seed).shuffle(chosen)
    return chosen


def label_accuracy(predictions: list[str], examples_: list[Example]) -> dict[str, float]:
    """Accuracy of free-text answers to a labelling task (sentiment, spam): ``strict``, the
    answer is exactly a reference label (case, edge spaces and punctuation ignored);
    ``lenient``, the first label word of the task found in the answer is the reference."""
    if len(predictions) != len(examples_) or not examples_:
        raise ValueError(
            f"need as many predictions as examples (> 0), got {len(predictions)}, {len(examples_)}"
        )
    strict = lenient = 0
    for prediction, example in zip(predictions, examples_, strict=True):
        words = re.findall(r"[a-z]+", prediction.lower())
        strict += words == [example.response]
        found = [w for w in words if w in LABELS[example.task]]
        lenient += bool(found) and found[0] == example.response
    return {"strict": strict / len(examples_), "lenient": lenient / len(examples_)}


def heldout_paragraphs(count: int = 32) -> list[str]:
    """General text for measuring forgetting: the first ``count`` distinct paragraphs (full
    SQuAD contexts, Wikipedia) of the held-out articles, in file order."""
    _, held_out = squad_article_split(data.load_squad2_dev())
    paragraphs = list(dict.fromkeys(q["context"] for q in held_out))
    if not 0 < count <= len(paragraphs):
        raise ValueError(f"count must be in [1, {len(paragraphs)}], got {count}")
    return paragraphs[:count]
