"""utils.tasks.metrics against scikit-learn, seqeval, sacrebleu, rouge-score and hand-worked
SQuAD cases. Scores are compared with abs=1e-9 (pure Python floats, same formulas)."""

import random

import pytest
import sacrebleu
from rouge_score import rouge_scorer
from seqeval.metrics import classification_report as seqeval_report
from seqeval.metrics import f1_score as seqeval_f1
from sklearn import metrics as skm

from utils.data import load_multi30k, load_wnut17
from utils.tasks import metrics as M


def random_labels(n, k, seed):
    rng = random.Random(seed)
    return [rng.randrange(k) for _ in range(n)], [rng.randrange(k) for _ in range(n)]


@pytest.mark.parametrize("seed", range(5))
def test_classification_metrics_match_sklearn(seed):
    pred, ref = random_labels(200, 3, seed)
    assert M.accuracy(pred, ref) == pytest.approx(skm.accuracy_score(ref, pred), abs=1e-12)
    assert M.f1_score(pred, ref, 3, "macro") == pytest.approx(
        skm.f1_score(ref, pred, average="macro"), abs=1e-12
    )
    assert M.confusion_matrix(pred, ref, 3) == skm.confusion_matrix(ref, pred).tolist()
    bpred, bref = [p % 2 for p in pred], [r % 2 for r in ref]
    assert M.f1_score(bpred, bref) == pytest.approx(skm.f1_score(bref, bpred), abs=1e-12)


def test_f1_no_positive_prediction_is_zero_and_bad_input_raises():
    assert M.f1_score([0, 0], [1, 0]) == 0.0
    with pytest.raises(ValueError, match="same length"):
        M.accuracy([1], [1, 0])
    with pytest.raises(ValueError, match="average"):
        M.f1_score([1], [1], average="micro")
    with pytest.raises(ValueError, match="labels must lie"):
        M.confusion_matrix([2], [0], 2)


def test_bio_entities_hand_worked():
    tags = ["B-person", "I-person", "O", "I-location", "I-location", "B-group", "I-person"]
    assert M.bio_entities(tags) == {
        ("person", 0, 2),
        ("location", 3, 5),
        ("group", 5, 6),
        ("person", 6, 7),
    }
    with pytest.raises(ValueError, match="tags"):
        M.bio_entities(["X-person"])


def corrupt(tags, rng):
    """Random realistic errors: drop, retype, shift boundaries, spurious I- tags."""
    types = ["person", "location", "group", "product"]
    out = []
    for t in tags:
        r = rng.random()
        if r < 0.1:
            out.append("O")
        elif r < 0.2:
            out.append(f"{rng.choice('BI')}-{rng.choice(types)}")
        else:
            out.append(t)
    return out


def test_entity_f1_matches_seqeval_on_wnut17():
    rng = random.Random(0)
    gold = [tags for _, tags in load_wnut17("dev")]
    pred = [corrupt(tags, rng) for tags in gold]
    ours = M.entity_f1(pred, gold)
    assert ours["overall"].f1 == pytest.approx(seqeval_f1(gold, pred), abs=1e-9)
    report = seqeval_report(gold, pred, output_dict=True, zero_division=0)
    for kind, score in ours.items():
        if kind != "overall":
            assert score.f1 == pytest.approx(report[kind]["f1-score"], abs=1e-9), kind
            assert score.gold == report[kind]["support"], kind


def test_entity_errors_hand_worked():
    gold = [["B-person", "I-person", "O", "B-location", "O", "B-group", "O", "B-product", "O"],
            ["B-corporation", "O", "O"]]  # fmt: skip
    pred = [["B-person", "I-person", "O", "B-group", "O", "B-group", "I-group", "O", "B-person"],
            ["O", "O", "B-product"]]  # fmt: skip
    # person exact; location retyped on its span; group overlapped by a longer group;
    # product missed; corporation missed; one spurious person and one spurious product
    assert M.entity_errors(pred, gold) == {
        "correct": 1, "wrong type": 1, "wrong boundaries": 1, "wrong type and boundaries": 0,
        "missed": 2, "spurious": 2,
    }  # fmt: skip
    assert (
        M.entity_errors([["B-group", "I-group"]], [["B-person", "O"]])["wrong type and boundaries"]
        == 1
    )
    with pytest.raises(ValueError, match="2 predicted tags for 1 gold"):
        M.entity_errors([["O", "O"]], [["O"]])


def test_entity_errors_agree_with_entity_f1_on_wnut17():
    rng = random.Random(1)
    gold = [tags for _, tags in load_wnut17("dev")]
    pred = [corrupt(tags, rng) for tags in gold]
    errors, scores = M.entity_errors(pred, gold), M.entity_f1(pred, gold)["overall"]
    assert errors["correct"] == scores.true_positives
    assert sum(errors[k] for k in M.ENTITY_OUTCOMES if k != "spurious") == scores.gold
    assert 0 < errors["spurious"] <= scores.predicted - scores.true_positives


# Hand-worked with the official SQuAD 2.0 evaluation script's rules.
@pytest.mark.parametrize(
    ("prediction", "golds", "em", "f1"),
    [
        ("The Eiffel Tower!", ["eiffel tower"], 1.0, 1.0),
        ("in 1889", ["1889"], 0.0, 2 / 3),  # P=1/2, R=1 -> 2/3
        ("Denver Broncos", ["Broncos", "Denver Broncos"], 1.0, 1.0),
        ("an apple a day", ["apple pie"], 0.0, 0.5),  # tokens {apple, day} vs {apple, pie}
        ("", [], 1.0, 1.0),  # no-answer predicted for an unanswerable question
        ("Paris", [], 0.0, 0.0),
        ("", ["Paris"], 0.0, 0.0),
        ("the the", ["a"], 1.0, 1.0),  # both normalize to the empty string
    ],
)
def test_squad_em_f1_hand_worked(prediction, golds, em, f1):
    assert M.squad_exact_match(prediction, golds) == em
    assert M.squad_f1(prediction, golds) == pytest.approx(f1, abs=1e-12)


def test_squad_normalize():
    assert M.squad_normalize("  The  cat's, A  hat. ") == "cats hat"


def hypotheses_from(refs, seed):
    """Plausible system outputs: references with words dropped, swapped or replaced."""
    rng = random.Random(seed)
    hyps = []
    for ref in refs:
        words = ref.split()
        words = [w for w in words if rng.random() > 0.15] or words[:1]
        if len(words) > 3 and rng.random() < 0.5:
            i = rng.randrange(len(words) - 1)
            words[i], words[i + 1] = words[i + 1], words[i]
        words = [w if rng.random() > 0.1 else "thing" for w in words]
        hyps.append(" ".join(words))
    return hyps


@pytest.mark.parametrize("tokenize", ["13a", "none"])
def test_corpus_bleu_matches_sacrebleu(tokenize):
    pairs = load_multi30k("val", "en", "de")[:300]
    refs = [de for _, de in pairs]
    hyps = hypotheses_from(refs, 0)
    refs2 = hypotheses_from(refs, 1)  # a second reference stream
    for streams in ([refs], [refs, refs2]):
        ours = M.corpus_bleu(hyps, streams, tokenize=tokenize)
        ref = sacrebleu.corpus_bleu(hyps, streams, tokenize=tokenize)
        assert ours.score == pytest.approx(ref.score, abs=1e-9)
        assert ours.brevity_penalty == pytest.approx(ref.bp, abs=1e-12)
        assert (ours.hypothesis_length, ours.reference_length) == (ref.sys_len, ref.ref_len)


def test_corpus_bleu_edge_cases_match_sacrebleu():
    cases = [
        (["a cat"], [["a cat sat on the mat"]]),  # short: smoothing + brevity penalty
        (["dog"], [["a cat"]]),  # no match at all -> 0
        (["the cat sat on the mat."], [["the cat sat on the mat."]]),  # perfect -> 100
        (['He said: "it\'s 3.5-4 km, &amp; more".'], [["He said it's 3.5 - 4 km & more."]]),
    ]
    for hyps, refs in cases:
        assert M.corpus_bleu(hyps, refs).score == pytest.approx(
            sacrebleu.corpus_bleu(hyps, refs).score, abs=1e-9
        )
    assert (
        M.tokenize_13a("3.5-4 km, ok.")
        == sacrebleu.BLEU(tokenize="13a")._preprocess_segment("3.5-4 km, ok.").split()
    )
    with pytest.raises(TypeError):
        M.corpus_bleu(["a"], ["a"])
    with pytest.raises(ValueError, match="tokenize"):
        M.corpus_bleu(["a"], [["a"]], tokenize="intl")


def test_rouge_matches_rouge_score():
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    pairs = load_multi30k("val", "en", "fr")[:100]
    preds = hypotheses_from([en for en, _ in pairs], 2)
    for pred, (ref, _) in zip(preds, pairs, strict=True):
        expected = scorer.score(ref, pred)  # rouge-score takes (target, prediction)
        for ours, key in (
            (M.rouge_n(pred, ref, 1), "rouge1"),
            (M.rouge_n(pred, ref, 2), "rouge2"),
            (M.rouge_l(pred, ref), "rougeL"),
        ):
            assert ours.precision == pytest.approx(expected[key].precision, abs=1e-12)
            assert ours.recall == pytest.approx(expected[key].recall, abs=1e-12)
            assert ours.fmeasure == pytest.approx(expected[key].fmeasure, abs=1e-12)
    with pytest.raises(ValueError, match="n must be"):
        M.rouge_n("a", "a", 0)
