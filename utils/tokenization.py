"""Tokenizers written from scratch: byte-level BPE (GPT-2 style) and, at the end, the
character tokenizer of the course's tiny-Shakespeare GPT (:class:`CharTokenizer`).

Byte-pair encoding (Sennrich et al. 2016) as GPT-2 uses it (Radford et al. 2019):

1. **Pre-tokenize**: a regular expression splits the text into chunks (words with their
   leading space, numbers, punctuation runs, whitespace); merges never cross a chunk boundary.
2. **Bytes**: each chunk is UTF-8 encoded, so the 256 byte values are the base vocabulary and
   *any* text can be encoded (no unknown token) and decoded back exactly.
3. **Merges**: training repeatedly replaces the most frequent adjacent pair of tokens by a new
   token; encoding replays those merges, earliest-learned first.

Token ids: the 256 single bytes come first (``byte_ids[b]`` is the id of byte ``b``; the
identity for tokenizers trained here, a permutation for GPT-2's file), then merge ``i`` creates
id ``256 + i``, then the special tokens. ``ByteLevelBPE.from_tiktoken_file`` reads GPT-2's real
ranks (a ``.tiktoken`` file) and recovers its merges, so the same code encodes exactly like
GPT-2.
"""

from __future__ import annotations

import base64
import heapq
import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import regex
import torch
from torch import Tensor

# GPT-2's pre-tokenization pattern (as in tiktoken's r50k_base): contractions, letters with
# an optional leading space, numbers, other symbols, and whitespace (a run of spaces before a
# word leaves its last space to that word). \p{L} / \p{N} need the `regex` package.
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

FORMAT_VERSION = "byte-level-bpe-v1"
NUM_BYTES = 256


def merge_pair(ids: Sequence[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace each non-overlapping occurrence of ``pair`` in ``ids`` (left to right) by ``new_id``.

    >>> merge_pair([1, 2, 2, 2, 1, 2], (2, 2), 9)
    [1, 9, 2, 1, 2]
    """
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def _count_pairs(
    words: list[list[int]], counts: list[int]
) -> tuple[Counter[tuple[int, int]], defaultdict[tuple[int, int], set[int]]]:
    """Weighted count of every adjacent pair of ids in ``words`` (each word counted ``counts``
    times), and for each pair the indices of the words that contain it."""
    pair_counts: Counter[tuple[int, int]] = Counter()
    where: defaultdict[tuple[int, int], set[int]] = defaultdict(set)
    for index, (word, count) in enumerate(zip(words, counts, strict=True)):
        for pair in zip(word, word[1:], strict=False):
            pair_counts[pair] += count
            where[pair].add(index)
    return pair_counts, where


def _push_counts(
    heap: list, pairs: set[tuple[int, int]], pair_counts: Counter, where: dict
) -> None:
    """Push the new counts of ``pairs`` onto the heap; forget the pairs that no longer occur."""
    for pair in pairs:
        count = pair_counts[pair]
        if count > 0:
            heapq.heappush(heap, (-count, pair))
        else:
            del pair_counts[pair]
            where.pop(pair, None)


class ByteLevelBPE:
    """Byte-level BPE tokenizer: ``encode(text) -> list[int]``, ``decode(ids) -> str``.

    Args:
        merges: the learned merges in order; merge ``i`` joins the pair of ids ``(a, b)``
            into the new id ``256 + i`` (``a`` and ``b`` must already exist).
        byte_ids: ``byte_ids[b]`` is the id of the single byte ``b``, a permutation of
            ``range(256)`` (default: the identity).
        special_tokens: ``{string: id}`` for tokens such as ``"<|endoftext|>"`` that are never
            split; ids must come after the merges and be distinct.
        pattern: the pre-tokenization regular expression (``regex`` syntax).
    """

    def __init__(
        self,
        merges: Sequence[tuple[int, int]],
        *,
        byte_ids: Sequence[int] | None = None,
        special_tokens: dict[str, int] | None = None,
        pattern: str = GPT2_SPLIT_PATTERN,
    ) -> None:
        byte_ids = list(range(NUM_BYTES)) if byte_ids is None else [int(i) for i in byte_ids]
        if sorted(byte_ids) != list(range(NUM_BYTES)):
            raise ValueError("byte_ids must be a permutation of range(256)")
        vocab: list[bytes] = [b""] * NUM_BYTES
        for byte, token_id in enumerate(byte_ids):
            vocab[token_id] = bytes([byte])
        merge_ranks: dict[tuple[int, int], int] = {}
        for i, pair in enumerate(merges):
            a, b = (int(x) for x in pair)
            new_id = NUM_BYTES + i
            if not (0 <= a < new_id and 0 <= b < new_id):
                raise ValueError(
                    f"merge {i} = {pair} uses an id that does not exist yet (< {new_id})"
                )
            if (a, b) in merge_ranks:
                raise ValueError(f"merge {i} = {pair} is a duplicate")
            merge_ranks[(a, b)] = new_id
            vocab.append(vocab[a] + vocab[b])

        special_tokens = dict(special_tokens or {})
        ids = sorted(special_tokens.values())
        if len(set(ids)) != len(ids) or (ids and ids[0] < len(vocab)):
            raise ValueError(
                f"special token ids must be distinct and >= {len(vocab)} (after the merges), "
                f"got {special_tokens}"
            )
        self.byte_ids = byte_ids
        self.merges = [tuple(int(x) for x in pair) for pair in merges]
        self.merge_ranks = merge_ranks
        self.vocab = vocab
        self.special_tokens = special_tokens
        self.inverse_special_tokens = {i: s for s, i in special_tokens.items()}
        self.pattern = pattern
        self._split = regex.compile(pattern)
        self._cache: dict[str, list[int]] = {}

    # ------------------------------------------------------------------ training
    @classmethod
    def train(
        cls,
        text: str,
        vocab_size: int,
        *,
        special_tokens: Sequence[str] = (),
        pattern: str = GPT2_SPLIT_PATTERN,
    ) -> ByteLevelBPE:
        """Learn ``vocab_size - 256 - len(special_tokens)`` merges from ``text``.

        Each step merges the most frequent adjacent pair (counted inside pre-tokenized chunks,
        weighted by how often each chunk occurs); ties go to the smallest pair of ids. Pair
        counts are updated incrementally, so a step only touches the chunks that contain the
        merged pair. Stops early if no pair occurs any more.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        num_merges = vocab_size - NUM_BYTES - len(special_tokens)
        if num_merges < 0:
            raise ValueError(
                f"vocab_size must be >= 256 + len(special_tokens) = "
                f"{NUM_BYTES + len(special_tokens)}, got {vocab_size}"
            )
        chunk_counts = Counter(regex.findall(pattern, text))
        words = [list(chunk.encode("utf-8")) for chunk in chunk_counts]
        counts = list(chunk_counts.values())

        pair_counts, where = _count_pairs(words, counts)
        heap = [(-count, pair) for pair, count in pair_counts.items()]
        heapq.heapify(heap)

        merges: list[tuple[int, int]] = []
        while len(merges) < num_merges and heap:
            negative_count, pair = heapq.heappop(heap)
            if pair_counts.get(pair, 0) != -negative_count:
                continue  # stale heap entry: the count changed after it was pushed
            new_id = NUM_BYTES + len(merges)
            merges.append(pair)
            changed: set[tuple[int, int]] = set()
            for index in where.pop(pair):
                word, count = words[index], counts[index]
                merged = merge_pair(word, pair, new_id)
                if len(merged) == len(word):
                    continue
                for old in zip(word, word[1:], strict=False):
                    pair_counts[old] -= count
                    changed.add(old)
                for new in zip(merged, merged[1:], strict=False):
                    pair_counts[new] += count
                    where[new].add(index)
                    changed.add(new)
                words[index] = merged
            _push_counts(heap, changed, pair_counts, where)
        first_special = NUM_BYTES + len(merges)
        specials = {token: first_special + i for i, token in enumerate(special_tokens)}
        return cls(merges, special_tokens=specials, pattern=pattern)

    # ------------------------------------------------------------------ encoding
    @property
    def vocab_size(self) -> int:
        """Number of ids: 256 bytes + merges + special tokens."""
        return len(self.vocab) + len(self.special_tokens)

    def __len__(self) -> int:
        return self.vocab_size

    def _encode_chunk(self, chunk: str) -> list[int]:
        """BPE on one pre-tokenized chunk: apply the earliest-learned applicable merge first."""
        ids = [self.byte_ids[b] for b in chunk.encode("utf-8")]
        while len(ids) >= 2:
            pair = min(
                zip(ids, ids[1:], strict=False),
                key=lambda p: self.merge_ranks.get(p, float("inf")),
            )
            new_id = self.merge_ranks.get(pair)
            if new_id is None:
                break
            ids = merge_pair(ids, pair, new_id)
        return ids

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode ``text`` treating special-token strings as ordinary text."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids: list[int] = []
        cache = self._cache
        for chunk in self._split.findall(text):
            chunk_ids = cache.get(chunk)
            if chunk_ids is None:
                chunk_ids = cache[chunk] = self._encode_chunk(chunk)
            ids.extend(chunk_ids)
        return ids

    def encode(self, text: str, *, allowed_special: str | Iterable[str] = "none") -> list[int]:
        """Encode ``text`` to ids.

        Args:
            text: any string.
            allowed_special: ``"all"``, ``"none"`` or a set of special-token strings that are
                turned into their single id where they occur; others are encoded as text.
        """
        if allowed_special == "all":
            allowed = set(self.special_tokens)
        elif allowed_special == "none":
            allowed = set()
        elif isinstance(allowed_special, str):
            raise ValueError(
                f"allowed_special must be 'all', 'none' or a set, got {allowed_special!r}"
            )
        else:
            allowed = set(allowed_special)
            unknown = allowed - set(self.special_tokens)
            if unknown:
                raise ValueError(f"allowed_special names unknown special tokens: {sorted(unknown)}")
        if not allowed:
            return self.encode_ordinary(text)
        # longest first, so a special token that contains another one wins
        alternatives = "|".join(regex.escape(s) for s in sorted(allowed, key=len, reverse=True))
        ids: list[int] = []
        for i, part in enumerate(regex.split(f"({alternatives})", text)):
            if i % 2:  # odd parts are the captured special tokens
                ids.append(self.special_tokens[part])
            elif part:
                ids.extend(self.encode_ordinary(part))
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes the ids stand for (special tokens as their UTF-8 string)."""
        parts = []
        for token_id in ids:
            token_id = int(token_id)
            if 0 <= token_id < len(self.vocab):
                parts.append(self.vocab[token_id])
            elif token_id in self.inverse_special_tokens:
                parts.append(self.inverse_special_tokens[token_id].encode("utf-8"))
            else:
                raise ValueError(
                    f"token id {token_id} is not in the vocabulary (size {self.vocab_size})"
                )
        return b"".join(parts)

    def decode(self, ids: Iterable[int]) -> str:
        """Decode ids to text; bytes that are not valid UTF-8 on their own become U+FFFD.

        ``decode(encode(text)) == text`` for every string.
        """
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token."""
        return self.decode_bytes([token_id])

    # ------------------------------------------------------------------ saving and loading
    def save(self, path: str | Path) -> None:
        """Write the tokenizer to a JSON file."""
        state = {
            "format": FORMAT_VERSION,
            "pattern": self.pattern,
            "byte_ids": self.byte_ids,
            "merges": [list(pair) for pair in self.merges],
            "special_tokens": self.special_tokens,
        }
        Path(path).write_text(json.dumps(state))

    @classmethod
    def load(cls, path: str | Path) -> ByteLevelBPE:
        """Read a tokenizer written by :meth:`save`."""
        state = json.loads(Path(path).read_text())
        if state.get("format") != FORMAT_VERSION:
            raise ValueError(
                f"{path} is not a {FORMAT_VERSION} file (format {state.get('format')!r})"
            )
        return cls(
            [tuple(pair) for pair in state["merges"]],
            byte_ids=state["byte_ids"],
            special_tokens=state["special_tokens"],
            pattern=state["pattern"],
        )

    @classmethod
    def from_merge_bytes(
        cls,
        merges: Sequence[tuple[bytes, bytes]],
        *,
        special_tokens: Sequence[str] = (),
        pattern: str = GPT2_SPLIT_PATTERN,
    ) -> ByteLevelBPE:
        """Build a tokenizer from merges written as byte strings, e.g. another library's.

        Merge ``i`` joins the tokens with bytes ``left`` and ``right`` (both must exist).
        Special tokens get the ids right after the merges.
        """
        ids = {bytes([b]): b for b in range(NUM_BYTES)}
        pairs = []
        for i, (left, right) in enumerate(merges):
            if left not in ids or right not in ids:
                raise ValueError(
                    f"merge {i} = {(left, right)} uses a token that does not exist yet"
                )
            pairs.append((ids[left], ids[right]))
            ids[left + right] = NUM_BYTES + i
        first_special = NUM_BYTES + len(pairs)
        specials = {token: first_special + i for i, token in enumerate(special_tokens)}
        return cls(pairs, special_tokens=specials, pattern=pattern)

    @classmethod
    def from_tiktoken_file(
        cls,
        path: str | Path,
        *,
        special_tokens: dict[str, int] | None = None,
        pattern: str = GPT2_SPLIT_PATTERN,
    ) -> ByteLevelBPE:
        """Load ranks in tiktoken's format (one ``base64(token) rank`` per line).

        Ranks ``0..255`` must be the single bytes; each later token is split by running BPE
        with the lower ranks only, which must give exactly two parts: that pair is its merge.
        """
        ranks = read_tiktoken_ranks(path)
        return cls(
            recover_merges(ranks),
            byte_ids=[ranks[bytes([b])] for b in range(NUM_BYTES)],
            special_tokens=special_tokens,
            pattern=pattern,
        )


def read_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    """``{token bytes: rank}`` from a ``.tiktoken`` file; ranks must be ``0..N-1``."""
    ranks = {}
    for line_number, line in enumerate(Path(path).read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
        except ValueError as error:
            raise ValueError(
                f"{path}:{line_number} is not 'base64-token rank': {line!r}"
            ) from error
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks must be 0..{len(ranks) - 1} with no gaps or repeats")
    return ranks


def _split_with_lower_ranks(ranks: dict[bytes, int], token: bytes) -> list[bytes]:
    """Run rank-based BPE on ``token`` using only tokens ranked below ``token`` itself."""
    max_rank = ranks[token]
    parts = [bytes([b]) for b in token]
    while True:
        best_index, best_rank = None, max_rank
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best_index, best_rank = i, rank
        if best_index is None:
            return parts
        parts[best_index : best_index + 2] = [parts[best_index] + parts[best_index + 1]]


def recover_merges(ranks: dict[bytes, int]) -> list[tuple[int, int]]:
    """The merges (as rank pairs, in rank order) that rebuild the tokens of ``ranks``."""
    by_rank = sorted(ranks, key=ranks.__getitem__)
    if any(len(token) != 1 for token in by_rank[:NUM_BYTES]):
        raise ValueError("ranks 0..255 must be the 256 single bytes")
    merges = []
    for token in by_rank[NUM_BYTES:]:
        parts = _split_with_lower_ranks(ranks, token)
        if len(parts) != 2:
            raise ValueError(
                f"token {token!r} (rank {ranks[token]}) is not one merge of lower ranks"
            )
        merges.append((ranks[parts[0]], ranks[parts[1]]))
    return merges


class CharTokenizer:
    """One token per character of a fixed alphabet (e.g. the 65 of tiny Shakespeare)."""

    def __init__(self, chars: str) -> None:
        if len(set(chars)) != len(chars):
            raise ValueError("chars must not repeat a character")
        self.chars = chars
        self.index = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> Tensor:
        """str -> (N,) int64 ids; ``ValueError`` for a character outside the alphabet."""
        unknown = set(text) - self.index.keys()
        if unknown:
            raise ValueError(f"text has characters outside the alphabet: {sorted(unknown)}")
        return torch.tensor([self.index[c] for c in text], dtype=torch.long)

    def decode(self, ids: Iterable[int] | Tensor) -> str:
        ids = ids.tolist() if isinstance(ids, Tensor) else ids
        return "".join(self.chars[i] for i in ids)
