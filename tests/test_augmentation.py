"""utils.augmentation against brute-force cosine neighbours and hand-worked replacements."""

import random

import pytest
import torch
import torch.nn.functional as F

from utils.augmentation import augment, nearest_neighbours, neighbour_table, replace_words

WORDS = ["good", "great", "bad", "film", "movie"]
VECTORS = torch.tensor([[1.0, 0.1, 0], [0.9, 0.2, 0], [0.7, -0.6, 0], [0, 1, 1], [0, 0.9, 1.1]])


def test_nearest_neighbours_match_brute_force_cosine():
    torch.manual_seed(0)
    vectors = torch.randn(50, 8)
    queries = torch.tensor([3, 0, 49])
    got = nearest_neighbours(vectors, queries, k=4)
    for query, row in zip(queries.tolist(), got.tolist(), strict=True):
        cosine = F.cosine_similarity(vectors[query][None], vectors, dim=-1)
        cosine[query] = -2.0
        assert row == cosine.argsort(descending=True)[:4].tolist()


def test_neighbour_table_by_hand():
    table = neighbour_table(WORDS, VECTORS, ["movie", "good", "unknown"], k=1)
    assert table == {"good": ["great"], "movie": ["film"]}
    assert neighbour_table(WORDS, VECTORS, ["unknown"], k=1) == {}


def test_replace_words_rate_zero_and_one():
    table = {"good": ["great"], "film": ["movie"]}
    text = "Good film, good cast!"
    assert replace_words(text, table, 0.0, random.Random(0)) == text
    assert replace_words(text, table, 1.0, random.Random(0)) == "Great movie, great cast!"


def test_replace_words_is_seeded_and_draws_from_the_neighbours():
    table = {"good": ["great", "fine", "nice"]}
    text = " ".join(["good"] * 200)
    first = replace_words(text, table, 0.5, random.Random(1))
    assert first == replace_words(text, table, 0.5, random.Random(1))
    counts = {w: first.split().count(w) for w in ["good", "great", "fine", "nice"]}
    assert sum(counts.values()) == 200
    assert 70 < counts["good"] < 130 and all(counts[w] > 15 for w in ["great", "fine", "nice"])


def test_augment_appends_copies_with_their_labels():
    texts, labels = augment(["good film", "bad film"], [1, 0], {"film": ["movie"]}, 2, 1.0, 0)
    assert texts == ["good film", "bad film", "good movie", "bad movie", "good movie", "bad movie"]
    assert labels == [1, 0, 1, 0, 1, 0]


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: nearest_neighbours(VECTORS, torch.tensor([0]), k=5), "k must be in"),
        (lambda: nearest_neighbours(VECTORS[0], torch.tensor([0]), k=1), "vectors must be"),
        (lambda: neighbour_table(WORDS[:2], VECTORS, ["good"], k=1), "words must have"),
        (lambda: replace_words("a", {}, 1.5, random.Random(0)), "rate must be"),
        (lambda: augment(["a"], [0, 1], {}, 1, 0.1, 0), "labels must have"),
    ],
)
def test_bad_input_names_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()
