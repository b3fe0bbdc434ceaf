"""Tests of utils/data.py: the parsers against the counts in shared/data/*/SOURCE.md, and the
cache -> mirror -> download lookup. No test touches the network: ``_fetch`` is replaced."""

import hashlib
import os
import urllib.error
from collections import Counter
from pathlib import Path

import pytest

from utils import data

REPO_ROOT = Path(__file__).parents[1]
FALLBACK_MIRROR = REPO_ROOT.parent / "shared" / "data"


def _sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def offline_fetch(url):
    raise urllib.error.URLError("network disabled in tests")


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """Fresh cache in tmp_path, no mirror, no network, nothing remembered from other tests."""
    monkeypatch.setenv("COURSE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("COURSE_DATA_DIR", raising=False)
    monkeypatch.setattr(data, "_fetch", offline_fetch)
    monkeypatch.setattr(data, "_verified", {})


@pytest.fixture(scope="session")
def mirror_path():
    """The offline mirror: $COURSE_DATA_DIR (relative to the repo root) or ../shared/data."""
    value = os.environ.get("COURSE_DATA_DIR")
    path = (REPO_ROOT / value).resolve() if value else FALLBACK_MIRROR
    if not path.is_dir():
        pytest.skip(f"no data mirror at {path}: set COURSE_DATA_DIR to the shared/data folder")
    return path


@pytest.fixture
def mirror(mirror_path, monkeypatch):
    monkeypatch.setenv("COURSE_DATA_DIR", str(mirror_path))
    return mirror_path


def cache_files(tmp_path):
    return sorted(p.relative_to(tmp_path / "cache") for p in (tmp_path / "cache").rglob("*"))


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

ALL_FILES = [(dataset, name) for dataset, files in data.DATASETS.items() for name in files]


def test_registry_lists_every_dataset_and_file():
    counts = {dataset: len(files) for dataset, files in data.DATASETS.items()}
    assert counts == {
        "tinyshakespeare": 1,
        "sentiment-labelled-sentences": 4,
        "sms-spam-collection": 1,
        "tatoeba-eng-fra-5k": 1,
        "multi30k": 9,
        "wnut17": 3,
        "squad2-dev-half": 1,
    }
    for entry in (data.data_file(*key) for key in ALL_FILES):
        assert len(entry.sha256) == 64 and int(entry.sha256, 16) >= 0
        assert entry.url.startswith("https://raw.githubusercontent.com/")
        assert f"/{entry.origin.commit}/" in entry.url and " " not in entry.url


def test_urls_are_quoted_and_point_at_the_original_path():
    yelp = data.data_file("sentiment-labelled-sentences", "yelp_labelled.txt")
    assert yelp.url == (
        "https://raw.githubusercontent.com/ggreen/ml.net.playground/"
        "d2c5ba53cd5a4394f58ffd3df65bb53c50674e37/"
        "sentiment%20labelled%20sentences/yelp_labelled%20copy.txt"
    )
    assert data.data_file("multi30k", "test_2016_flickr.fr.gz").url.endswith(
        "/data/task1/raw/test_2016_flickr.fr.gz"
    )


@pytest.mark.parametrize(
    "dataset, filename, listed",
    [("imdb", "imdb_labelled.txt", "multi30k"), ("multi30k", "train.cs.gz", "train.en.gz")],
)
def test_unknown_names_raise_key_error_listing_the_known_ones(dataset, filename, listed):
    with pytest.raises(KeyError, match="known") as error:
        data.get_file(dataset, filename)
    assert listed in str(error.value)


@pytest.mark.parametrize("dataset, filename", ALL_FILES)
def test_every_mirror_file_matches_its_checksum_and_is_used_in_place(
    mirror, tmp_path, dataset, filename
):
    assert data.get_file(dataset, filename) == mirror / dataset / filename
    assert cache_files(tmp_path) == []  # nothing copied


# ---------------------------------------------------------------------------------------------
# Lookup: cache -> mirror -> download -> DataUnavailableError
# ---------------------------------------------------------------------------------------------

README = ("sentiment-labelled-sentences", "readme.txt")


def test_relative_mirror_dir_is_taken_from_the_repo_root(mirror, monkeypatch, tmp_path):
    monkeypatch.setenv("COURSE_DATA_DIR", os.path.relpath(mirror, REPO_ROOT))
    monkeypatch.chdir(tmp_path)
    assert data.get_file(*README) == mirror.joinpath(*README)


def test_each_file_is_hashed_once_per_process(mirror, monkeypatch):
    hashed = []
    monkeypatch.setattr(data, "sha256sum", lambda path: hashed.append(path) or _sha256(path))
    first, second = data.get_file(*README), data.get_file(*README)
    assert first == second and len(hashed) == 1


def test_valid_cached_file_is_used_before_the_mirror(mirror, tmp_path):
    cached = tmp_path / "cache" / README[0] / README[1]
    cached.parent.mkdir(parents=True)
    cached.write_bytes(mirror.joinpath(*README).read_bytes())
    assert data.get_file(*README) == cached


def test_corrupt_cached_file_is_deleted_and_the_mirror_used(mirror, tmp_path):
    cached = tmp_path / "cache" / README[0] / README[1]
    cached.parent.mkdir(parents=True)
    cached.write_text("truncated")
    with pytest.warns(UserWarning, match="corrupt"):
        path = data.get_file(*README)
    assert path == mirror.joinpath(*README)
    assert not cached.exists()


def test_corrupt_cached_file_is_replaced_by_a_download(mirror_path, monkeypatch, tmp_path):
    good = mirror_path.joinpath(*README).read_bytes()
    monkeypatch.setattr(data, "_fetch", lambda url: good)
    cached = tmp_path / "cache" / README[0] / README[1]
    cached.parent.mkdir(parents=True)
    cached.write_text("truncated")
    with pytest.warns(UserWarning, match="corrupt"):
        path = data.get_file(*README)
    assert path == cached and cached.read_bytes() == good


def test_corrupt_mirror_file_is_skipped_with_both_hashes(mirror_path, monkeypatch, tmp_path):
    bad_mirror = tmp_path / "mirror"
    bad_file = bad_mirror.joinpath(*README)
    bad_file.parent.mkdir(parents=True)
    bad_file.write_text("edited")
    monkeypatch.setenv("COURSE_DATA_DIR", str(bad_mirror))
    good = mirror_path.joinpath(*README).read_bytes()
    monkeypatch.setattr(data, "_fetch", lambda url: good)
    expected = data.data_file(*README).sha256
    with pytest.warns(UserWarning, match="skipping mirror file") as record:
        path = data.get_file(*README)
    message = str(record[0].message)
    assert str(bad_file) in message and expected in message and _sha256(bad_file) in message
    assert path == tmp_path / "cache" / README[0] / README[1]


def test_download_applies_crlf_to_lf_verifies_and_renames(mirror_path, monkeypatch, tmp_path):
    lf = mirror_path.joinpath("sms-spam-collection", "SMSSpamCollection").read_bytes()
    urls = []
    monkeypatch.setattr(data, "_fetch", lambda url: urls.append(url) or lf.replace(b"\n", b"\r\n"))
    path = data.get_file("sms-spam-collection", "SMSSpamCollection")
    assert urls == [data.data_file("sms-spam-collection", "SMSSpamCollection").url]
    assert path == tmp_path / "cache" / "sms-spam-collection" / "SMSSpamCollection"
    assert path.read_bytes() == lf
    folder = Path("sms-spam-collection")
    assert cache_files(tmp_path) == [folder, folder / "SMSSpamCollection"]  # no temp file left
    assert len(data.load_sms_spam()) == 5574  # now served from the cache


def test_download_with_wrong_checksum_is_rejected_and_not_kept(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "_fetch", lambda url: b"<html>rate limited</html>")
    with pytest.raises(data.DataUnavailableError, match="sha256"):
        data.get_file(*README)
    assert not (tmp_path / "cache" / README[0] / README[1]).exists()
    assert [p for p in cache_files(tmp_path) if p.name != README[0]] == []


def test_offline_without_a_copy_explains_what_to_do(tmp_path):
    with pytest.raises(data.DataUnavailableError) as error:
        data.get_file("wnut17", "emerging.dev.conll")
    message = str(error.value)
    assert isinstance(error.value, FileNotFoundError)
    for expected in (
        "wnut17",
        "emerging.dev.conll",
        "COURSE_DATA_DIR: not set",
        str(tmp_path / "cache" / "wnut17" / "emerging.dev.conll"),
        data.data_file("wnut17", "emerging.dev.conll").url,
        "network disabled in tests",
        "../shared/data",
    ):
        assert expected in message


def test_offline_with_an_empty_mirror_names_the_mirror_path(monkeypatch, tmp_path):
    monkeypatch.setenv("COURSE_DATA_DIR", str(tmp_path / "empty"))
    with pytest.raises(data.DataUnavailableError, match="COURSE_DATA_DIR") as error:
        data.load_tinyshakespeare()
    assert str(tmp_path / "empty" / "tinyshakespeare" / "input.txt") in str(error.value)


# ---------------------------------------------------------------------------------------------
# Parsers, against the counts in SOURCE.md
# ---------------------------------------------------------------------------------------------


def test_tinyshakespeare(mirror):
    text = data.load_tinyshakespeare()
    assert len(text) == 1_115_394 and len(set(text)) == 65 and text.count("\n") == 40_000
    assert text.startswith("First Citizen:\nBefore we proceed any further, hear me speak.")


@pytest.mark.parametrize("source", ["amazon", "imdb", "yelp"])
def test_sentiment_sources_are_balanced(mirror, source):
    pairs = data.load_sentiment(source)
    assert len(pairs) == 1000
    assert Counter(label for _, label in pairs) == {0: 500, 1: 500}
    assert all(sentence and sentence == sentence.rstrip() for sentence, _ in pairs)


def test_sentiment_all_and_imdb_pitfalls(mirror):
    assert len(data.load_sentiment()) == 3000
    assert data.load_sentiment("yelp")[0] == ("Wow... Loved this place.", 1)
    imdb = data.load_sentiment("imdb")
    assert sum("\x85" in sentence for sentence, _ in imdb) == 2  # NEL kept inside sentences
    assert sum('"' in sentence for sentence, _ in imdb) > 0  # unbalanced quotes kept
    with pytest.raises(ValueError, match="source"):
        data.load_sentiment("twitter")


def test_sms_spam(mirror):
    messages = data.load_sms_spam()
    assert len(messages) == 5574
    assert Counter(label for label, _ in messages) == {"ham": 4827, "spam": 747}
    assert messages[0] == (
        "ham",
        "Go until jurong point, crazy.. Available only in bugis n great world la e buffet... "
        "Cine there got amore wat...",
    )


def test_tatoeba_en_fr(mirror):
    pairs = data.load_tatoeba_en_fr()
    assert len(pairs) == 5000
    assert pairs[0] == ("Go.", "Va !")
    assert pairs[-1] == ("I'm so tired!", "Je suis si fatigué !")
    assert not any("\u202f" in fr or "\xa0" in fr for _, fr in pairs)
    assert len({en for en, _ in pairs}) == 2597 and max(len(en) for en, _ in pairs) == 13
    attributions = data.load_tatoeba_attributions()
    assert len(attributions) == 5000
    assert attributions[0] == (
        "CC-BY 2.0 (France) Attribution: tatoeba.org #2877272 (CM) & #1158250 (Wittydev)"
    )


@pytest.mark.parametrize("split, size", [("train", 29_000), ("val", 1014), ("test", 1000)])
def test_multi30k_split_sizes(mirror, split, size):
    pairs = data.load_multi30k(split)
    assert len(pairs) == size
    assert all(en and de and en == en.strip() and de == de.strip() for en, de in pairs)


def test_multi30k_languages(mirror):
    en, de, fr = (
        "Two young, White males are outside near many bushes.",
        "Zwei junge weiße Männer sind im Freien in der Nähe vieler Büsche.",
        "Deux jeunes hommes blancs sont dehors près de buissons.",
    )
    assert data.load_multi30k("train")[0] == (en, de)
    assert data.load_multi30k("train", src="fr", tgt="en")[0] == (fr, en)
    with pytest.raises(ValueError, match="split"):
        data.load_multi30k("test_2017_flickr")
    with pytest.raises(ValueError, match="tgt"):
        data.load_multi30k("val", tgt="cs")


@pytest.mark.parametrize(
    "split, sentences, tokens, entities",
    [("train", 3394, 62_730, 1975), ("dev", 1009, 15_733, 836), ("test", 1287, 23_394, 1079)],
)
def test_wnut17_counts(mirror, split, sentences, tokens, entities):
    data_split = data.load_wnut17(split)
    tags = [tag for _, sentence_tags in data_split for tag in sentence_tags]
    assert len(data_split) == sentences and len(tags) == tokens
    assert sum(tag.startswith("B-") for tag in tags) == entities
    assert set(tags) == set(data.WNUT17_LABELS)
    assert all(len(words) == len(labels) > 0 for words, labels in data_split)


def test_wnut17_train_sample_and_labels(mirror):
    train = data.load_wnut17("train")
    assert train[0][0][:5] == ["@paulwalk", "It", "'s", "the", "view"]
    assert train[0][1][:5] == ["O"] * 5
    entity_types = Counter(tag[2:] for _, tags in train for tag in tags if tag.startswith("B-"))
    assert entity_types == {
        "person": 660,
        "location": 548,
        "group": 264,
        "corporation": 221,
        "product": 142,
        "creative-work": 140,
    }
    assert len(data.WNUT17_LABELS) == 13 and data.WNUT17_LABELS[0] == "O"


def test_squad2_dev(mirror):
    questions = data.load_squad2_dev()
    assert len(questions) == 6078
    assert len({q["title"] for q in questions}) == 16
    assert len({q["context"] for q in questions}) == 646
    answerable = [q for q in questions if not q["is_impossible"]]
    assert len(answerable) == 2910
    assert all(q["answers"] == [] for q in questions if q["is_impossible"])
    for q in answerable:
        for answer in q["answers"]:
            start = answer["answer_start"]
            assert q["context"][start : start + len(answer["text"])] == answer["text"]
    first = questions[0]
    assert set(first) == {"id", "title", "context", "question", "answers", "is_impossible"}
    assert first["question"] == "In what country is Normandy located?"
    assert first["answers"][0] == {"text": "France", "answer_start": 159}
