"""The course's data sets: a registry with checksums, a verified file lookup, one parser each.

Modelled on d2l's ``download`` helper: every file is pinned by its sha256, and a file is only
ever returned after its hash has been checked. ``get_file(dataset, filename)`` looks in turn at

1. the local cache, ``$COURSE_CACHE_DIR/<dataset>/<filename>`` (default cache folder
   ``~/.cache/transformers-llm-course``). A cached file whose sha256 does not match is
   reported with a warning and deleted, never used.
2. the offline mirror, ``$COURSE_DATA_DIR/<dataset>/<filename>``, used in place (read only,
   not copied). A relative ``COURSE_DATA_DIR`` is taken relative to the repository root, so
   CI's ``COURSE_DATA_DIR=../shared/data`` works from any working directory (notebooks run
   in ``chapters/``). A mismatching mirror file is skipped with a warning.
3. the original public address (raw.githubusercontent.com, at a fixed commit): the download
   is transformed where the mirror documents a change (CRLF -> LF), verified, written to a
   temporary file in the cache folder and atomically renamed into place.

If all three fail, ``DataUnavailableError`` says where it looked and what to do. Each file is
hashed at most once per process. Origins, licences and counts: ``shared/data/*/SOURCE.md``.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import os
import tempfile
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "transformers-llm-course"
DOWNLOAD_TIMEOUT_S = 60


class DataUnavailableError(FileNotFoundError):
    """No verified copy of a data file was found in the cache or mirror, nor downloaded."""


@dataclass(frozen=True)
class GitHubCommit:
    """A public GitHub repository frozen at one commit."""

    repo: str
    commit: str

    def raw_url(self, path: str) -> str:
        quoted = urllib.parse.quote(path)  # spaces in folder names become %20
        return f"https://raw.githubusercontent.com/{self.repo}/{self.commit}/{quoted}"


@dataclass(frozen=True)
class DataFile:
    """One file of a data set: where it comes from and the sha256 our copy must have."""

    origin: GitHubCommit
    path: str  # inside the origin repository
    sha256: str
    crlf_to_lf: bool = False  # our copy converted the original's CRLF line endings to LF

    @property
    def url(self) -> str:
        return self.origin.raw_url(self.path)


CHAR_RNN = GitHubCommit("karpathy/char-rnn", "6f9487a6fe5b420b7ca9afb0d7c078e37c1d1b4e")
ML_NET_PLAYGROUND = GitHubCommit(
    "ggreen/ml.net.playground", "d2c5ba53cd5a4394f58ffd3df65bb53c50674e37"
)
SMS_HOST = GitHubCommit(
    "krishnaik06/Huggingfacetransformer", "8e97d009508252d1a31ac1fdbd2722f310d99d92"
)
TATOEBA_HOST = GitHubCommit(
    "NJUxlj/seq2seq-attention-translation", "b20755b1c81f2d82526ab967dbc8ec6465f22f14"
)
MULTI30K = GitHubCommit("multi30k/dataset", "a3d2e0d26b56f3846f66a952536ffed4e401d05a")
WNUT17 = GitHubCommit("leondz/emerging_entities_17", "e52a2d2a71ac1a051ca2d532eef28653c5c02603")
CS224N_SQUAD = GitHubCommit("chrischute/squad", "85623adeb9e6639f145081fea9cae2d8f3a26379")

SENTIMENT_FOLDER = "sentiment labelled sentences"
MULTI30K_SHA256 = {
    "train.en.gz": "d79cfa999dd4c51d2cb42499b6796d5a882c3a8a961923c25a898c90f8bbd56f",
    "train.de.gz": "726e39b2fa9eb9ffb6dc763fb35a179f80fae06ffc5d28b6ace5faa883de28a6",
    "train.fr.gz": "622e75069e9f4c577425c4f277116ce66e63a2401c0a2312d90073cb12379a3c",
    "val.en.gz": "14f7d25ddd868909a9213e361768460edcacdd6ab9d1e77b92560dc10c10dc28",
    "val.de.gz": "f0cba2f995189cf5770f29a8a9a537a3ad3f51657ad873405082ff6863a5e75a",
    "val.fr.gz": "ca3106f1a72390591d25f6c45cb4cd39dec4cd3f123e099748a3ce5256c160e9",
    "test_2016_flickr.en.gz": "611d361c6334bc7246101d48097c13cf5c4413c5befc793cc629934359d532d9",
    "test_2016_flickr.de.gz": "9204244e408ccb38d2a55cfcd344df15005fc42a07a6e55ca6c52b6ababb8cc8",
    "test_2016_flickr.fr.gz": "6d326e188d259fb1d04ac19eae3af956559b3a0b93d7635e56c90987c40c8b90",
}

# dataset -> file name (as stored in the cache and mirror) -> origin and checksum
DATASETS: dict[str, dict[str, DataFile]] = {
    "tinyshakespeare": {
        "input.txt": DataFile(
            CHAR_RNN,
            "data/tinyshakespeare/input.txt",
            "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        ),
    },
    "sentiment-labelled-sentences": {
        "amazon_cells_labelled.txt": DataFile(
            ML_NET_PLAYGROUND,
            f"{SENTIMENT_FOLDER}/amazon_cells_labelled.txt",
            "47003fc0a0d4840b00e96e715b6189bad09e7443a3da41c4cbe12ffc79f86ae3",
        ),
        "imdb_labelled.txt": DataFile(
            ML_NET_PLAYGROUND,
            f"{SENTIMENT_FOLDER}/imdb_labelled.txt",
            "aef2e49e3da25714d61175e3a6e68eeef74a20a2f914318dc3be9947ea86512d",
        ),
        # The pristine UCI copy is that repository's "copy"; its yelp_labelled.txt was edited.
        "yelp_labelled.txt": DataFile(
            ML_NET_PLAYGROUND,
            f"{SENTIMENT_FOLDER}/yelp_labelled copy.txt",
            "c76468b7b5c6e56a0804d728345c5f84aa2142ddb214420f61cc9cfd4c00d2ea",
        ),
        "readme.txt": DataFile(
            ML_NET_PLAYGROUND,
            f"{SENTIMENT_FOLDER}/readme.txt",
            "736c26aa54e3614459e50314ece0698051f0923d108ed53938dcb1aa0483bfd4",
        ),
    },
    "sms-spam-collection": {
        "SMSSpamCollection": DataFile(
            SMS_HOST,
            "SMSSpamCollection",
            "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d",
            crlf_to_lf=True,
        ),
    },
    "tatoeba-eng-fra-5k": {
        "eng-fra.txt": DataFile(
            TATOEBA_HOST,
            "data/eng-fra.txt",
            "d952b56a181da5270b7bb4ded3f3bbe61e67a9b1de0e0fbc1d46438c71fb55a7",
        ),
    },
    "multi30k": {
        name: DataFile(MULTI30K, f"data/task1/raw/{name}", sha256)
        for name, sha256 in MULTI30K_SHA256.items()
    },
    "wnut17": {
        "wnut17train.conll": DataFile(
            WNUT17,
            "wnut17train.conll",
            "731820e13f71af324c6b55a1575ec2ce59fbaa2a0806f8f0400b98d56cd6a7a5",
        ),
        "emerging.dev.conll": DataFile(
            WNUT17,
            "emerging.dev.conll",
            "e053b752b8155113ca66e7db08af5f2f5f43ab993694e4774f1ec5bad42312d8",
        ),
        "emerging.test.annotated": DataFile(
            WNUT17,
            "emerging.test.annotated",
            "2aa79b764e56ec9264a1b30fdd9b70195bd00ff400b62edd8f399d5f13c178f0",
        ),
    },
    "squad2-dev-half": {
        "dev-v2.0.json": DataFile(
            CS224N_SQUAD,
            "data/dev-v2.0.json",
            "e67e5969b6dc6c1642154740806b79263b77fc048c7c11ee60d534eb48ef81e8",
        ),
    },
}


# ---------------------------------------------------------------------------------------------
# Finding a verified copy of a file
# ---------------------------------------------------------------------------------------------

_verified: dict[tuple[str, str], Path] = {}  # (dataset, filename) -> path whose sha256 matched


def sha256sum(path: Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so large files need little memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def cache_dir() -> Path:
    """The cache folder: ``$COURSE_CACHE_DIR`` or ``~/.cache/transformers-llm-course``."""
    value = os.environ.get("COURSE_CACHE_DIR")
    return Path(value).expanduser() if value else DEFAULT_CACHE_DIR


def mirror_dir() -> Path | None:
    """The offline mirror ``$COURSE_DATA_DIR`` (relative to the repository root), or None."""
    value = os.environ.get("COURSE_DATA_DIR")
    return (REPO_ROOT / Path(value).expanduser()).resolve() if value else None


def data_file(dataset: str, filename: str) -> DataFile:
    """The registry entry of ``dataset/filename``; ``KeyError`` listing the known names."""
    if dataset not in DATASETS:
        raise KeyError(f"unknown dataset {dataset!r}; known data sets: {', '.join(DATASETS)}")
    files = DATASETS[dataset]
    if filename not in files:
        raise KeyError(f"unknown file {filename!r} in {dataset}; known files: {', '.join(files)}")
    return files[filename]


def get_file(dataset: str, filename: str) -> Path:
    """Path of a copy of ``dataset/filename`` whose sha256 matches (lookup order: module doc)."""
    entry = data_file(dataset, filename)
    known = _verified.get((dataset, filename))
    if known is not None and known.is_file():
        return known

    cached = cache_dir() / dataset / filename
    mirror = mirror_dir()
    mirrored = None if mirror is None else mirror / dataset / filename
    if _copy_is_valid(cached, entry.sha256, cached=True):
        path = cached
    elif mirrored is not None and _copy_is_valid(mirrored, entry.sha256, cached=False):
        path = mirrored
    else:
        try:
            download_verified(entry.url, entry.sha256, cached, entry.crlf_to_lf)
        except (OSError, http.client.HTTPException, ValueError) as error:
            raise DataUnavailableError(
                _unavailable_message(dataset, filename, cached, entry.url, error)
            ) from error
        path = cached
    _verified[(dataset, filename)] = path
    return path


def _copy_is_valid(path: Path, sha256: str, *, cached: bool) -> bool:
    """True if the file at ``path`` matches ``sha256``. A mismatching cached copy is reported
    and deleted; a mismatching mirror copy (``cached=False``) is reported and skipped."""
    if not path.is_file():
        return False
    actual = sha256sum(path)
    if actual == sha256:
        return True
    if cached:
        message = (
            f"cached file {path} is corrupt (sha256 {actual}, expected {sha256}); "
            "deleting it and looking for a fresh copy"
        )
        path.unlink()
    else:
        message = (
            f"skipping mirror file {path}: sha256 {actual} does not match the expected {sha256}"
        )
    warnings.warn(message, stacklevel=3)
    return False


def _fetch(url: str) -> bytes:
    """The bytes at ``url`` (the only function here that touches the network)."""
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
        return response.read()


def download_verified(url: str, sha256: str, destination: Path, crlf_to_lf: bool = False) -> Path:
    """Download ``url`` (with ``crlf_to_lf``, turning CRLF line ends into LF first), check its
    sha256 (``ValueError`` if it differs) and write it to ``destination``.

    The data is written to a temporary file next to ``destination`` and renamed, so a reader
    never sees a half-written file. The files are small, so they are held in memory. Used for
    the data sets here and for the pretrained files of :mod:`utils.pretrained`.
    """
    data = _fetch(url)
    if crlf_to_lf:
        data = data.replace(b"\r\n", b"\n")
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise ValueError(f"downloaded data has sha256 {actual}, expected {sha256}")
    destination.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(temporary, destination)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return destination


def cached_download(url: str, sha256: str, destination: Path, crlf_to_lf: bool = False) -> Path:
    """``destination`` if it holds the verified file (a corrupt copy is deleted), else
    :func:`download_verified`."""
    if _copy_is_valid(destination, sha256, cached=True):
        return destination
    return download_verified(url, sha256, destination, crlf_to_lf)


def _unavailable_message(
    dataset: str, filename: str, cached: Path, url: str, error: BaseException
) -> str:
    value = os.environ.get("COURSE_DATA_DIR")
    mirror = f"{value} (looked for {mirror_dir() / dataset / filename})" if value else "not set"
    return (
        f"data file {dataset}/{filename} is not available.\n"
        f"  cache:           {cached}\n"
        f"  COURSE_DATA_DIR: {mirror}\n"
        f"  download:        {url}\n"
        f"                   failed: {error}\n"
        f"Set COURSE_DATA_DIR to a folder holding {dataset}/{filename} "
        "(in this repository's CI: ../shared/data) or connect to the internet."
    )


def _read_text(dataset: str, filename: str) -> str:
    """The file decoded as UTF-8, byte for byte (no newline translation)."""
    return get_file(dataset, filename).read_bytes().decode("utf-8")


def _lines(text: str) -> list[str]:
    """Lines split on "\\n" only: ``str.splitlines`` also splits on U+0085 and friends."""
    return text.removesuffix("\n").split("\n")


def _check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


# ---------------------------------------------------------------------------------------------
# Parsers, one per data set
# ---------------------------------------------------------------------------------------------


def load_tinyshakespeare() -> str:
    """The whole tiny Shakespeare text (1,115,394 ASCII characters, 65 distinct)."""
    return _read_text("tinyshakespeare", "input.txt")


SENTIMENT_FILES = {
    "amazon": "amazon_cells_labelled.txt",
    "imdb": "imdb_labelled.txt",
    "yelp": "yelp_labelled.txt",
}


def load_sentiment(source: str = "all") -> list[tuple[str, int]]:
    """``(sentence, label)`` pairs, label 1 positive / 0 negative; 1,000 per source, 500/500.

    ``source`` is amazon, imdb, yelp or all (the three in that order, 3,000 pairs).
    """
    _check_choice("source", source, [*SENTIMENT_FILES, "all"])
    sources = list(SENTIMENT_FILES) if source == "all" else [source]
    pairs = []
    for name in sources:
        for line in _lines(_read_text("sentiment-labelled-sentences", SENTIMENT_FILES[name])):
            sentence, label = line.rsplit("\t", 1)  # imdb has unbalanced quotes: no csv module
            pairs.append((sentence.rstrip(" "), int(label)))  # imdb: two spaces before the tab
    return pairs


def load_sms_spam() -> list[tuple[str, str]]:
    """``(label, message)`` pairs, label "ham" or "spam": 5,574 messages, 747 spam."""
    lines = _lines(_read_text("sms-spam-collection", "SMSSpamCollection"))
    return [tuple(line.split("\t", 1)) for line in lines]


def _tatoeba_columns() -> list[list[str]]:
    return [line.split("\t") for line in _lines(_read_text("tatoeba-eng-fra-5k", "eng-fra.txt"))]


def _normalize_spaces(text: str) -> str:
    """Replace narrow and ordinary no-break spaces (French ``Va !``) by a space, as d2l does."""
    return text.replace("\u202f", " ").replace("\xa0", " ")


def load_tatoeba_en_fr() -> list[tuple[str, str]]:
    """5,000 short ``(english, french)`` pairs, no-break spaces replaced by spaces.

    Licence CC BY 2.0 FR: credit each pair with ``load_tatoeba_attributions()`` (same order).
    """
    return [(_normalize_spaces(en), _normalize_spaces(fr)) for en, fr, _ in _tatoeba_columns()]


def load_tatoeba_attributions() -> list[str]:
    """The Tatoeba attribution of each pair of ``load_tatoeba_en_fr()``, in the same order."""
    return [attribution for _, _, attribution in _tatoeba_columns()]


MULTI30K_SPLITS = {"train": "train", "val": "val", "test": "test_2016_flickr"}
MULTI30K_LANGUAGES = ("en", "de", "fr")


def _multi30k_sentences(split: str, language: str) -> list[str]:
    path = get_file("multi30k", f"{MULTI30K_SPLITS[split]}.{language}.gz")
    text = gzip.decompress(path.read_bytes()).decode("utf-8")
    return [line.strip() for line in _lines(text)]  # a few lines carry stray edge spaces


def load_multi30k(split: str, src: str = "en", tgt: str = "de") -> list[tuple[str, str]]:
    """``(source, target)`` sentence pairs of Multi30k task 1 (raw text, original case).

    ``split``: train (29,000 pairs), val (1,014) or test (test_2016_flickr, 1,000);
    ``src`` and ``tgt``: en, de or fr. Edge whitespace is stripped from each sentence.
    """
    _check_choice("split", split, MULTI30K_SPLITS)
    _check_choice("src", src, MULTI30K_LANGUAGES)
    _check_choice("tgt", tgt, MULTI30K_LANGUAGES)
    sources, targets = _multi30k_sentences(split, src), _multi30k_sentences(split, tgt)
    return list(zip(sources, targets, strict=True))


WNUT17_FILES = {
    "train": "wnut17train.conll",
    "dev": "emerging.dev.conll",
    "test": "emerging.test.annotated",
}
WNUT17_LABELS = (
    "O",
    "B-corporation",
    "I-corporation",
    "B-creative-work",
    "I-creative-work",
    "B-group",
    "I-group",
    "B-location",
    "I-location",
    "B-person",
    "I-person",
    "B-product",
    "I-product",
)


def load_wnut17(split: str) -> list[tuple[list[str], list[str]]]:
    """``(tokens, BIO tags)`` per sentence; train / dev / test = 3,394 / 1,009 / 1,287.

    Sentences end at blank lines. In the train file most separators are a lone tab, so a
    whitespace-only line counts as blank (``split("\\n\\n")`` would give only 1,000).
    """
    _check_choice("split", split, WNUT17_FILES)
    lines = _lines(_read_text("wnut17", WNUT17_FILES[split]))
    sentences, tokens, tags = [], [], []
    for line in [*lines, ""]:  # the extra blank line closes the last sentence
        if line.strip():
            token, tag = line.split("\t")
            tokens.append(token)
            tags.append(tag)
        elif tokens:
            sentences.append((tokens, tags))
            tokens, tags = [], []
    return sentences


def load_squad2_dev() -> list[dict]:
    """The 6,078 questions (2,910 answerable) of CS224n's SQuAD 2.0 dev split, flattened.

    Each question is a dict with keys id, title, context, question, answers (a list of
    ``{"text", "answer_start"}``, empty when unanswerable) and is_impossible. The ids are
    CS224n's, not the official SQuAD ids.
    """
    with open(get_file("squad2-dev-half", "dev-v2.0.json"), encoding="utf-8") as f:
        articles = json.load(f)["data"]
    return [
        {
            "id": qa["id"],
            "title": article["title"],
            "context": paragraph["context"],
            "question": qa["question"],
            "answers": [
                {"text": a["text"], "answer_start": a["answer_start"]} for a in qa["answers"]
            ],
            "is_impossible": qa["is_impossible"],
        }
        for article in articles
        for paragraph in article["paragraphs"]
        for qa in paragraph["qas"]
    ]
