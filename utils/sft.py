"""Supervised fine-tuning (instruction tuning) on conversations.

A conversation is a list of messages ``{"role": "system" | "user" | "assistant", "content":
str}``. A :class:`ChatTemplate` writes it out as the model saw such text in its own
instruction tuning (:data:`SMOLLM2`: SmolLM2-Instruct's ChatML, the same text as its
tokenizer's ``apply_chat_template``; :data:`PLAIN`: a minimal one for the course's models).

The loss is on the answers only: :func:`sft_example` gives every token of the assistant's
messages (content and end-of-turn marker, so the model learns to stop) its own id as label
and every other token (system, user, the headers) :data:`utils.objectives.IGNORE_INDEX`.
:func:`pad_batch` right-pads (padding is ignored too) so a causal model needs no attention
mask; :class:`LengthBuckets` draws training batches of similar length (little padding) and
:func:`fixed_batches` makes evaluation batches, both ``(x, y)`` pairs for
:class:`utils.training.Trainer` with :func:`response_loss` as its ``loss_fn``.

Shape letters: B batch, T sequence length, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from utils.objectives import IGNORE_INDEX, causal_lm_loss

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatTemplate:
    """How each message is written: ``header`` (``{role}`` filled in), the content, ``end``,
    then ``separator``. ``default_system``: the system message added when a conversation
    starts without one."""

    header: str
    end: str
    separator: str = ""
    default_system: str | None = None


SMOLLM2 = ChatTemplate(
    header="<|im_start|>{role}\n",
    end="<|im_end|>",
    separator="\n",
    default_system="You are a helpful AI assistant named SmolLM, trained by Hugging Face",
)
PLAIN = ChatTemplate(header="{role}: ", end="\n")


def check_messages(messages: Sequence[dict]) -> None:
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise ValueError(f"messages must be a non-empty list of dicts, got {messages!r}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ValueError(
                f"messages[{i}] must be a dict with a role in {ROLES}, got {message!r}"
            )
        if not isinstance(message.get("content"), str):
            raise TypeError(f"messages[{i}]['content'] must be a str, got {message!r}")
        if message["role"] == "system" and i > 0:
            raise ValueError(f"messages[{i}]: a system message may only come first")


def chat_segments(
    messages: Sequence[dict], template: ChatTemplate = SMOLLM2, add_generation_prompt: bool = False
) -> list[tuple[str, bool]]:
    """The formatted conversation as ``(text, trained)`` pieces: ``trained`` is True for an
    assistant message's content and end marker."""
    check_messages(messages)
    if messages[0]["role"] != "system" and template.default_system is not None:
        messages = [{"role": "system", "content": template.default_system}, *messages]
    segments = []
    for message in messages:
        answer = message["role"] == "assistant"
        segments.append((template.header.format(role=message["role"]), False))
        segments.append((message["content"] + template.end, answer))
        segments.append((template.separator, False))
    if add_generation_prompt:
        segments.append((template.header.format(role="assistant"), False))
    return [(text, trained) for text, trained in segments if text]


def format_chat(
    messages: Sequence[dict], template: ChatTemplate = SMOLLM2, add_generation_prompt: bool = False
) -> str:
    """The conversation as one string (for :data:`SMOLLM2`: the tokenizer's
    ``apply_chat_template(messages, tokenize=False, add_generation_prompt=...)``)."""
    return "".join(text for text, _ in chat_segments(messages, template, add_generation_prompt))


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` with special-token strings (``<|im_end|>``) as their ids and no
    extra tokens added: a Hugging Face tokenizer, the course's ``ByteLevelBPE`` or
    ``CharTokenizer``."""
    if hasattr(tokenizer, "apply_chat_template"):  # Hugging Face
        return tokenizer.encode(text, add_special_tokens=False)
    if hasattr(tokenizer, "special_tokens"):  # utils.tokenization.ByteLevelBPE
        return tokenizer.encode(text, allowed_special="all")
    ids = tokenizer.encode(text)  # utils.tokenization.CharTokenizer: a tensor
    return ids.tolist() if isinstance(ids, Tensor) else list(ids)


def sft_example(
    tokenizer,
    messages: Sequence[dict],
    template: ChatTemplate = SMOLLM2,
    max_length: int | None = None,
) -> dict[str, Tensor]:
    """``{"input_ids": (T,), "labels": (T,)}`` of one conversation: labels are the ids on the
    assistant's tokens and ``IGNORE_INDEX`` elsewhere (aligned with the inputs; the causal
    loss shifts them). Each piece is tokenized on its own, so no token straddles a prompt and
    an answer. ``max_length`` truncates on the right."""
    if not any(m.get("role") == "assistant" for m in messages if isinstance(m, dict)):
        raise ValueError("messages need an assistant message: the loss is on its tokens")
    ids, labels = [], []
    for text, trained in chat_segments(messages, template):
        piece = encode_text(tokenizer, text)
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}


def response_loss(outputs, labels: Tensor) -> Tensor:
    """Mean next-token cross-entropy over the labelled (answer) tokens: ``loss_fn`` for the
    :class:`~utils.training.Trainer`. ``outputs``: logits (B, T, V) or a Hugging Face output
    with ``.logits``."""
    return causal_lm_loss(logits_of(outputs), labels)


def logits_of(outputs) -> Tensor:
    """Logits from a model's output: the tensor itself or a Hugging Face ``.logits``."""
    return outputs if isinstance(outputs, Tensor) else outputs.logits


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------


def pad_batch(examples: Sequence[dict[str, Tensor]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-pad examples to the longest: ``x`` (B, T) ids (``pad_id`` after the end) and
    ``y`` (B, T) labels (``IGNORE_INDEX`` after the end)."""
    if not examples:
        raise ValueError("examples must not be empty")
    length = max(len(e["input_ids"]) for e in examples)
    x = torch.full((len(examples), length), pad_id, dtype=torch.long)
    y = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        x[row, :n], y[row, :n] = example["input_ids"], example["labels"]
    return x, y


def example_length(example: dict) -> int:
    """Tokens in an example; for a preference pair ``{"chosen": ..., "rejected": ...}`` (see
    :mod:`utils.dpo`), the longer side."""
    if "input_ids" in example:
        return len(example["input_ids"])
    return max(example_length(side) for side in example.values())


Collate = Callable[[Sequence[dict], int], tuple[Tensor, Tensor]]


def fixed_batches(
    examples: Sequence[dict], batch_size: int, pad_id: int, collate: Collate = pad_batch
) -> list[tuple[Tensor, Tensor]]:
    """Evaluation batches: examples sorted by length (stable), ``batch_size`` per batch,
    made by ``collate(examples, pad_id)``."""
    order = sorted(range(len(examples)), key=lambda i: example_length(examples[i]))
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return [collate([examples[i] for i in chunk], pad_id) for chunk in chunks]


class LengthBuckets:
    """Training batches of similar length: each epoch shuffles the examples, sorts every
    window of ``bucket_batches * batch_size`` of them by length, cuts the windows into batches
    and shuffles the batches. Every example is used once per epoch; draws from its own
    generator (saved in the Trainer's checkpoints). Call it for the next ``(x, y)``, made by
    ``collate(examples, pad_id)`` (:func:`pad_batch`; :func:`utils.dpo.pad_pairs` for pairs)."""

    def __init__(
        self,
        examples: Sequence[dict],
        batch_size: int,
        pad_id: int,
        bucket_batches: int = 50,
        seed: int = 0,
        collate: Collate = pad_batch,
    ) -> None:
        if not 1 <= batch_size <= len(examples) or bucket_batches < 1:
            raise ValueError(
                f"need 1 <= batch_size <= len(examples) ({len(examples)}) and bucket_batches "
                f">= 1, got batch_size={batch_size}, bucket_batches={bucket_batches}"
            )
        self.examples, self.batch_size, self.pad_id = examples, batch_size, pad_id
        self.bucket_batches, self.collate = bucket_batches, collate
        self.lengths = [example_length(e) for e in examples]
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch: list[list[int]] = []

    def _new_epoch(self) -> list[list[int]]:
        order = torch.randperm(len(self.examples), generator=self.generator).tolist()
        window = self.bucket_batches * self.batch_size
        batches = []
        for start in range(0, len(order), window):
            bucket = sorted(order[start : start + window], key=self.lengths.__getitem__)
            batches += [
                bucket[i : i + self.batch_size] for i in range(0, len(bucket), self.batch_size)
            ]
        shuffle = torch.randperm(len(batches), generator=self.generator).tolist()
        return [batches[i] for i in shuffle]

    def __call__(self) -> tuple[Tensor, Tensor]:
        if not self.epoch:
            self.epoch = self._new_epoch()
        return self.collate([self.examples[i] for i in self.epoch.pop()], self.pad_id)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "epoch": [list(b) for b in self.epoch]}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.epoch = [list(b) for b in state["epoch"]]
