"""utils.instruction_data: splits disjoint (SQuAD by article), templates, counts, the metric."""

from collections import Counter

import pytest

from utils import data
from utils import instruction_data as idata


@pytest.fixture(scope="module")
def squad():
    return data.load_squad2_dev()


def test_squad_split_is_by_article(squad):
    train, held_out = idata.squad_article_split(squad)
    titles = sorted({q["title"] for q in squad})
    assert len(titles) == 16
    assert {q["title"] for q in held_out} == set(titles[-idata.SQUAD_EVAL_ARTICLES :])
    assert not {q["title"] for q in train} & {q["title"] for q in held_out}
    answerable = [q for q in squad if not q["is_impossible"]]
    assert len(train) + len(held_out) == len(answerable) == 2910
    assert len(held_out) >= 1000  # the ">= 1,000 answerable held-out questions"


def test_squad_examples_answers_lie_in_the_cut_context(squad):
    by_id = {q["id"]: q for q in squad}
    for split in idata.SPLITS:
        for ex in idata.examples("squad", split):
            q = by_id[ex.source_id]
            context = idata.cut_context(q["context"])
            assert len(context.split()) <= idata.SQUAD_CONTEXT_WORDS
            assert context in ex.prompt and q["question"] in ex.prompt
            assert ex.response == ex.references[0]
            assert all(a in context for a in ex.references)
            assert set(ex.references) <= {a["text"] for a in q["answers"]}
    train_ids = {ex.source_id for ex in idata.examples("squad", "train")}
    assert not train_ids & {ex.source_id for ex in idata.examples("squad", "eval")}


def test_cut_context_keeps_spacing_and_short_texts():
    assert idata.cut_context("a  b\nc d", words=3) == "a  b\nc"
    assert idata.cut_context("one two", words=3) == "one two"
    assert idata.cut_context("x " * 200).split() == ["x"] * idata.SQUAD_CONTEXT_WORDS


def test_classification_splits_partition_the_data():
    sentiment, spam = data.load_sentiment(), data.load_sms_spam()
    for task, source in (("sentiment", sentiment), ("spam", spam)):
        train, held_out = idata.examples(task, "train"), idata.examples(task, "eval")
        ids = [int(e.source_id) for e in train + held_out]
        assert sorted(ids) == list(range(len(source)))  # every item once
        assert {int(e.source_id) % 5 for e in held_out} == {4}
        assert len(held_out) >= 200
    labels = Counter(e.response for e in idata.examples("sentiment", "eval"))
    expected = Counter(label for i, (_, label) in enumerate(sentiment) if i % 5 == 4)
    assert labels == {"positive": expected[1], "negative": expected[0]}
    assert Counter(e.response for e in idata.examples("spam", "train")) + Counter(
        e.response for e in idata.examples("spam", "eval")
    ) == Counter(label for label, _ in spam)


def test_translation_splits_by_english_sentence():
    pairs = data.load_tatoeba_en_fr()
    train, held_out = idata.examples("translation", "train"), idata.examples("translation", "eval")
    english = {ex.source_id: pairs[int(ex.source_id)][0] for ex in train + held_out}
    assert len(set(english.values())) == len(english) == len({en for en, _ in pairs})
    held = {pairs[int(ex.source_id)][0] for ex in held_out}
    assert not held & {pairs[int(ex.source_id)][0] for ex in train}
    for ex in held_out[:50]:
        en = pairs[int(ex.source_id)][0]
        assert set(ex.references) == {fr for e, fr in pairs if e == en}
        assert en in ex.prompt


@pytest.mark.parametrize("task", idata.TASKS)
def test_templates_rotate_and_appear_in_both_splits(task):
    assert len(idata.TEMPLATES[task]) >= 3
    for split in idata.SPLITS:
        items = idata.examples(task, split)
        assert [ex.template for ex in items[:6]] == [0, 1, 2, 0, 1, 2]
        assert {ex.template for ex in items} == set(range(len(idata.TEMPLATES[task])))
        assert all(ex.task == task and ex.response in ex.references for ex in items)


def test_prompt_is_the_template_filled_in():
    ex = idata.examples("sentiment", "eval")[1]
    sentence = data.load_sentiment()[int(ex.source_id)][0]
    assert ex.prompt == idata.TEMPLATES["sentiment"][1].format(sentence=sentence)


def test_label_accuracy_hand_worked():
    first = next(e for e in idata.examples("sentiment", "eval") if e.response == "positive")
    answers = ["Positive.", "The sentiment is positive", "negative, not positive", "fine"]
    result = idata.label_accuracy(answers, [first] * 4)
    assert result == {"strict": 0.25, "lenient": 0.5}
    with pytest.raises(ValueError, match="predictions"):
        idata.label_accuracy(["positive"], [first, first])


def test_fixed_subset_and_mixture_are_reproducible():
    items = list(range(100))
    subset = idata.fixed_subset(items, 10, seed=3)
    assert subset == idata.fixed_subset(items, 10, seed=3) == sorted(subset)
    assert subset != idata.fixed_subset(items, 10, seed=4)
    with pytest.raises(ValueError, match="size"):
        idata.fixed_subset(items, 101)
    mixed = idata.mixture({"sentiment": 7, "spam": 5}, seed=1)
    assert Counter(ex.task for ex in mixed) == {"sentiment": 7, "spam": 5}
    assert mixed == idata.mixture({"sentiment": 7, "spam": 5}, seed=1)


def test_bad_task_or_split_names_the_argument():
    with pytest.raises(ValueError, match="task"):
        idata.examples("summaries", "train")
    with pytest.raises(ValueError, match="split"):
        idata.examples("spam", "test")


def test_heldout_paragraphs_come_from_held_out_articles(squad):
    _, held_out = idata.squad_article_split(squad)
    paragraphs = idata.heldout_paragraphs(16)
    assert len(set(paragraphs)) == 16
    assert set(paragraphs) <= {q["context"] for q in held_out}
