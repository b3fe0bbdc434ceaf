"""utils.tokenization against Hugging Face `tokenizers`, tiktoken and hand-worked cases.

References: a `tokenizers` ByteLevel BPE trained on the same text with the same vocabulary
size; tiktoken's GPT-2 encoding built from the same ranks file (GPT-2's real merges); the
Wikipedia BPE example. Runs in about 10 s (two trainings and three encodings of the whole
1.1 MB tiny Shakespeare; our pure-Python encoder takes about 1 s for it thanks to the
per-chunk cache).
"""

import json

import pytest
import tiktoken
import tiktoken.load
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers.convert_slow_tokenizer import bytes_to_unicode

from utils.data import load_tinyshakespeare
from utils.pretrained import gpt2_ranks_path, load_gpt2_tokenizer
from utils.tokenization import GPT2_SPLIT_PATTERN, ByteLevelBPE, CharTokenizer, merge_pair

VOCAB_SIZE = 1024
EOT = "<|endoftext|>"
UNICODE_SAMPLES = [
    "",
    "Hello, world!",
    "  leading and trailing spaces   ",
    "tabs\tand\nnew\r\nlines\n\n\n",
    "naïve café, Ærøskøbing, Straße",
    "日本語のテキストと中文",
    "emoji 🤖🚀 and flags 🇫🇷 and ZWJ 👩‍👩‍👧",
    "combining e\u0301 and \u200b zero width",
    "numbers 3.14159, 1,000,000 and 2024-01-01",
    "it's they're we've I'm you'll he'd",
    "<|endoftext|> is just text here",
]


@pytest.fixture(scope="module")
def text() -> str:
    return load_tinyshakespeare()


@pytest.fixture(scope="module")
def ours(text) -> ByteLevelBPE:
    return ByteLevelBPE.train(text, VOCAB_SIZE, special_tokens=[EOT])


@pytest.fixture(scope="module")
def hf_tokenizer(text) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[EOT],
        show_progress=False,
    )
    tokenizer.train_from_iterator([text], trainer)
    return tokenizer


def hf_merges_as_bytes(tokenizer: Tokenizer) -> list[tuple[bytes, bytes]]:
    """The merges of a ByteLevel `tokenizers` model, mapped from its printable alphabet to bytes."""
    to_byte = {char: byte for byte, char in bytes_to_unicode().items()}
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    return [tuple(bytes(to_byte[c] for c in part) for part in pair) for pair in merges]


@pytest.fixture(scope="module")
def tiktoken_gpt2() -> tiktoken.Encoding:
    ranks = tiktoken.load.load_tiktoken_bpe(str(gpt2_ranks_path()))
    return tiktoken.Encoding(
        "gpt2", pat_str=GPT2_SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens={EOT: 50256}
    )


# --------------------------------------------------------------------------- hand-worked


def test_merge_pair_is_left_to_right_and_non_overlapping():
    assert merge_pair([1, 2, 2, 2, 1, 2], (2, 2), 9) == [1, 9, 2, 1, 2]
    assert merge_pair([1, 2, 1, 2], (1, 2), 7) == [7, 7]
    assert merge_pair([], (1, 2), 7) == []


def test_training_reproduces_the_wikipedia_example():
    # "aaabdaaabac": aa -> Z, then (ab ties with Za at count 2; smallest ids win) ab -> Y,
    # then ZY -> X, giving XdXac.
    tokenizer = ByteLevelBPE.train("aaabdaaabac", 256 + 3)
    a, b = ord("a"), ord("b")
    assert tokenizer.merges == [(a, a), (a, b), (256, 257)]
    assert tokenizer.encode("aaabdaaabac") == [258, ord("d"), 258, a, ord("c")]
    assert tokenizer.token_bytes(258) == b"aaab"


# --------------------------------------------------------------------------- vs tokenizers


def test_same_compression_as_hf_tokenizers(text, ours, hf_tokenizer):
    assert ours.vocab_size == hf_tokenizer.get_vocab_size() == VOCAB_SIZE
    ours_per_byte = len(ours.encode(text)) / len(text.encode())
    hf_per_byte = len(hf_tokenizer.encode(text).ids) / len(text.encode())
    assert abs(ours_per_byte / hf_per_byte - 1) < 0.02


def test_learns_the_same_merges_as_hf_tokenizers(ours, hf_tokenizer):
    hf_merges = hf_merges_as_bytes(hf_tokenizer)
    our_merges = [(ours.vocab[a], ours.vocab[b]) for a, b in ours.merges]
    # Both pick the most frequent pair; only the order among equally frequent pairs differs.
    assert len(our_merges) == len(hf_merges) == VOCAB_SIZE - 256 - 1
    assert our_merges[:50] == hf_merges[:50]
    assert len(set(our_merges) & set(hf_merges)) >= 0.98 * len(hf_merges)


def test_encodes_like_hf_tokenizers_with_the_same_merges(text, hf_tokenizer):
    ours = ByteLevelBPE.from_merge_bytes(hf_merges_as_bytes(hf_tokenizer), special_tokens=[EOT])
    to_byte = {char: byte for byte, char in bytes_to_unicode().items()}
    sample = text[:200_000] + "".join(UNICODE_SAMPLES[:-1])
    expected = [
        bytes(to_byte[c] for c in hf_tokenizer.id_to_token(i))
        for i in hf_tokenizer.encode(sample).ids
    ]
    assert [ours.vocab[i] for i in ours.encode(sample)] == expected


# --------------------------------------------------------------------------- round trip, io


@pytest.mark.parametrize("sample", UNICODE_SAMPLES)
def test_round_trip_is_exact(ours, sample):
    assert ours.decode(ours.encode(sample)) == sample
    assert ours.decode(ours.encode(sample, allowed_special="all")) == sample


def test_round_trip_of_the_whole_corpus(text, ours):
    assert ours.decode(ours.encode(text)) == text


def test_special_tokens(ours):
    eot = ours.special_tokens[EOT]
    assert eot == VOCAB_SIZE - 1
    ids = ours.encode(f"end{EOT}start", allowed_special="all")
    assert ids == ours.encode("end") + [eot] + ours.encode("start")
    assert eot not in ours.encode(f"end{EOT}start")  # "none": treated as text
    assert ours.decode([eot]) == EOT


def test_save_and_load(tmp_path, ours, text):
    path = tmp_path / "bpe.json"
    ours.save(path)
    loaded = ByteLevelBPE.load(path)
    assert loaded.merges == ours.merges and loaded.special_tokens == ours.special_tokens
    assert loaded.encode(text[:20_000]) == ours.encode(text[:20_000])


# --------------------------------------------------------------------------- GPT-2's ranks


def test_gpt2_ranks_encode_tiny_shakespeare_like_tiktoken(text, tiktoken_gpt2):
    gpt2 = load_gpt2_tokenizer()
    ids = gpt2.encode(text)
    assert len(ids) == 338_025  # the count recorded in shared/data/tinyshakespeare/SOURCE.md
    assert ids == tiktoken_gpt2.encode_ordinary(text)
    assert gpt2.decode(ids) == text


@pytest.mark.parametrize("sample", UNICODE_SAMPLES)
def test_gpt2_ranks_encode_unicode_like_tiktoken(tiktoken_gpt2, sample):
    gpt2 = load_gpt2_tokenizer()
    assert gpt2.vocab_size == tiktoken_gpt2.n_vocab == 50257
    assert gpt2.encode(sample) == tiktoken_gpt2.encode_ordinary(sample)
    assert gpt2.encode(sample, allowed_special="all") == tiktoken_gpt2.encode(
        sample, allowed_special="all"
    )
    assert gpt2.decode(gpt2.encode(sample)) == sample


# --------------------------------------------------------------------------- bad input


def test_bad_input_raises_clear_errors(ours, tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        ByteLevelBPE.train("abc", 100)
    with pytest.raises(TypeError, match="text must be a str"):
        ByteLevelBPE.train(b"abc", 300)
    with pytest.raises(TypeError, match="text must be a str"):
        ours.encode(b"abc")
    with pytest.raises(ValueError, match="not in the vocabulary"):
        ours.decode([VOCAB_SIZE])
    with pytest.raises(ValueError, match="unknown special tokens"):
        ours.encode("x", allowed_special={"<|nope|>"})
    with pytest.raises(ValueError, match="permutation"):
        ByteLevelBPE([], byte_ids=[0] * 256)
    with pytest.raises(ValueError, match="does not exist yet"):
        ByteLevelBPE([(0, 256)])
    with pytest.raises(ValueError, match="special token ids"):
        ByteLevelBPE([(0, 1)], special_tokens={EOT: 256})
    (tmp_path / "other.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="byte-level-bpe-v1"):
        ByteLevelBPE.load(tmp_path / "other.json")


def test_char_tokenizer_round_trip_and_unknown_characters():
    tokenizer = CharTokenizer.from_text("hello world")
    assert tokenizer.chars == " dehlorw" and tokenizer.vocab_size == 8
    ids = tokenizer.encode("low red")
    assert ids.tolist() == [4, 5, 7, 0, 6, 2, 1]
    assert tokenizer.decode(ids) == "low red"
    with pytest.raises(ValueError, match="outside the alphabet"):
        tokenizer.encode("hellx")
