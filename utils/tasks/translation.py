"""Machine translation with the course's encoder-decoder Transformer and byte-level BPE.

Source and target share one BPE vocabulary with three special tokens (padding, begin and end
of sentence). The decoder, bound to one encoded source sentence, is a plain decoder for
``utils.generation`` (greedy decoding and beam search with a KV cache).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from utils.tokenization import ByteLevelBPE

PAD, BOS, EOS = "<pad>", "<s>", "</s>"


def train_shared_bpe(pairs: list[tuple[str, str]], vocab_size: int) -> ByteLevelBPE:
    """A byte-level BPE learned on both sides of ``pairs``, with PAD, BOS and EOS."""
    text = "\n".join(s for pair in pairs for s in pair)
    return ByteLevelBPE.train(text, vocab_size, special_tokens=[PAD, BOS, EOS])


@dataclass
class PairBatch:
    src: Tensor  # (B, S) source ids, EOS-terminated, PAD-padded
    tgt_in: Tensor  # (B, T) BOS + target
    tgt_out: Tensor  # (B, T) target + EOS (PAD where tgt_in is padding)


def encode_pairs(
    tokenizer: ByteLevelBPE, pairs: list[tuple[str, str]], max_len: int = 32
) -> PairBatch:
    """Token ids of sentence pairs, truncated to ``max_len`` tokens each, padded with PAD."""
    pad, bos, eos = (tokenizer.special_tokens[t] for t in (PAD, BOS, EOS))
    srcs = [tokenizer.encode(s)[: max_len - 1] + [eos] for s, _ in pairs]
    tgts = [tokenizer.encode(t)[: max_len - 1] for _, t in pairs]

    def padded(rows: list[list[int]]) -> Tensor:
        width = max(len(r) for r in rows)
        return torch.tensor([r + [pad] * (width - len(r)) for r in rows])

    return PairBatch(
        padded(srcs), padded([[bos, *t] for t in tgts]), padded([[*t, eos] for t in tgts])
    )


class PackedSeq2Seq(nn.Module):
    """The encoder-decoder as a one-input model for ``utils.training.Trainer``: the input
    (B, S + T) is the source ids followed by the decoder input ids; output logits (B, T, V)."""

    def __init__(self, model: nn.Module, src_len: int, pad_id: int):
        super().__init__()
        self.model, self.src_len, self.pad_id = model, src_len, pad_id

    def forward(self, packed: Tensor) -> Tensor:
        src, tgt = packed[:, : self.src_len], packed[:, self.src_len :]
        return self.model(
            src, tgt, src_attention_mask=src != self.pad_id, tgt_attention_mask=tgt != self.pad_id
        )


def pack(batch: PairBatch) -> Tensor:
    """(B, S + T) input of :class:`PackedSeq2Seq`."""
    return torch.cat([batch.src, batch.tgt_in], dim=1)


def seq2seq_loss(pad_id: int):
    """Cross-entropy of logits (B, T, V) against targets (B, T), ignoring PAD targets."""

    def loss(logits: Tensor, targets: Tensor) -> Tensor:
        return nn.functional.cross_entropy(
            logits.flatten(0, 1), targets.flatten(), ignore_index=pad_id
        )

    return loss


class BoundDecoder(nn.Module):
    """The decoder of ``model`` with the memory of one source fixed: ``forward(idx,
    kv_caches=None) -> logits (B, T, V)``, so ``utils.generation`` can decode it. The memory
    (1, S, E) is expanded to the batch (e.g. the beams)."""

    def __init__(self, model: nn.Module, memory: Tensor, src_attention_mask: Tensor):
        super().__init__()
        self.model, self.memory, self.src_attention_mask = model, memory, src_attention_mask
        self.config = model.config

    def new_kv_caches(self):
        return self.model.new_kv_caches()

    def forward(self, idx: Tensor, kv_caches=None) -> Tensor:
        B = idx.shape[0]
        return self.model.decode(
            idx,
            self.memory.expand(B, -1, -1),
            src_attention_mask=self.src_attention_mask.expand(B, -1),
            kv_caches=kv_caches,
        )


@torch.no_grad()
def translate(
    model: nn.Module,
    tokenizer: ByteLevelBPE,
    sentence: str,
    max_new_tokens: int = 40,
    num_beams: int = 1,
) -> str:
    """Greedy (``num_beams=1``) or beam-search translation of one sentence."""
    from utils.generation import beam_search, generate

    model.eval()
    pad, bos, eos = (tokenizer.special_tokens[t] for t in (PAD, BOS, EOS))
    src = torch.tensor([tokenizer.encode(sentence) + [eos]])
    real = src != pad  # (1, S) padding mask
    decoder = BoundDecoder(model, model.encode(src, src_attention_mask=real), real)
    prompt = torch.tensor([[bos]])
    if num_beams == 1:
        out = generate(decoder, prompt, max_new_tokens, stop_tokens=[eos])
    else:
        out = beam_search(decoder, prompt, max_new_tokens, num_beams=num_beams, stop_tokens=[eos])
    ids = [i for i in out[0, 1:].tolist() if i != eos]
    return tokenizer.decode(ids)
