"""What every encoder task shares: calling an encoder, pooling its states, freezing layers.

The task heads wrap any encoder called as ``encoder(input_ids, attention_mask=...,
token_type_ids=...)`` that returns hidden states (B, T, E), as a tensor (the course's
``utils.transformer.Bert``) or as an object with a ``last_hidden_state`` attribute (Hugging
Face ``BertModel``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _check_ids_and_mask(input_ids: Tensor, attention_mask: Tensor) -> None:
    if input_ids.dtype != torch.long or input_ids.dim() != 2:
        raise TypeError(
            f"input_ids must be a (B, T) long tensor, "
            f"got {input_ids.dtype} of shape {tuple(input_ids.shape)}"
        )
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, "
            f"got {tuple(attention_mask.shape)}"
        )


def encode(
    encoder: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    token_type_ids: Tensor | None = None,
) -> Tensor:
    """Hidden states (B, T, E) of ``encoder`` for token ids, padding mask and optional segment
    ids, all (B, T)."""
    _check_ids_and_mask(input_ids, attention_mask)
    kwargs = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
    out = encoder(input_ids, attention_mask=attention_mask, **kwargs)
    return out if isinstance(out, Tensor) else out.last_hidden_state


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Average of the real (mask ``True``/1) positions: (B, T, E), (B, T) -> (B, E)."""
    if hidden.shape[:2] != attention_mask.shape:
        raise ValueError(
            f"attention_mask must be (B, T) = {tuple(hidden.shape[:2])}, "
            f"got {tuple(attention_mask.shape)}"
        )
    weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def freeze_all_but_last_layers(model: nn.Module, layers: nn.ModuleList, trainable: int) -> int:
    """Freeze all of ``model``, then unfreeze the last ``trainable`` modules of ``layers``
    (e.g. ``bert.encoder.layer``). Returns the number of trainable parameters left."""
    if not 0 <= trainable <= len(layers):
        raise ValueError(f"trainable must be in [0, {len(layers)}], got {trainable}")
    model.requires_grad_(False)
    for layer in list(layers)[len(layers) - trainable :]:
        layer.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def tokenized_batches(tokenizer, texts: list, batch_size: int, max_length: int, **options):
    """Yield ``texts`` in order as padded, truncated batches of at most ``batch_size``, each
    a Hugging Face tokenizer's output with (b, T) ``input_ids`` and ``attention_mask``;
    ``options`` go to the tokenizer (e.g. ``is_split_into_words=True`` for word lists)."""
    for i in range(0, len(texts), batch_size):
        yield tokenizer(
            texts[i : i + batch_size],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
            **options,
        )


@torch.no_grad()
def sentence_embeddings(
    encoder: nn.Module, tokenizer, texts: list[str], batch_size: int = 64, max_length: int = 128
) -> Tensor:
    """Unit-length mean-pooled embeddings (N, E) of ``texts`` (Sentence-BERT recipe)."""
    chunks = []
    for batch in tokenized_batches(tokenizer, texts, batch_size, max_length):
        hidden = encode(encoder, batch["input_ids"], batch["attention_mask"])
        chunks.append(nn.functional.normalize(mean_pool(hidden, batch["attention_mask"]), dim=-1))
    return torch.cat(chunks)


# ---------------------------------------------------------------------------------------------
# Fine-tuning the top layers on a CPU budget: run the frozen bottom layers once, cache their
# output, and train only the top blocks (and the head) on the cached states.
# ---------------------------------------------------------------------------------------------


def _in_length_chunks(fn, attention_mask: Tensor, chunk: int, *tensors: Tensor | None) -> Tensor:
    """``fn(mask, *tensors)`` -> (b, w, E) run on chunks of rows of similar real length, each
    cut to its :func:`real_width` w; results scattered back into zeros (N, T, E)."""
    order = torch.argsort(attention_mask.sum(1), stable=True)
    out = None
    for i in range(0, len(order), chunk):
        rows = order[i : i + chunk]
        width = real_width(attention_mask[rows])
        cut = [None if t is None else t[rows, :width] for t in tensors]
        result = fn(attention_mask[rows, :width], *cut)
        if out is None:
            out = result.new_zeros(*attention_mask.shape, result.shape[-1])
        out[rows, :width] = result
    return out


@torch.no_grad()
def frozen_prefix_states(
    bert: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    top_layers: int,
    token_type_ids: Tensor | None = None,
    chunk: int = 64,
) -> Tensor:
    """States (N, T, E) entering the last ``top_layers`` blocks of a course ``Bert`` (its
    embeddings and the frozen blocks below), computed without gradients.

    Rows are processed in chunks of similar length, each cut to its :func:`real_width`, so
    little time goes to padding; the positions cut away (padding only) hold zeros."""
    n_blocks = len(bert.blocks)
    if not 0 <= top_layers <= n_blocks:
        raise ValueError(f"top_layers must be in [0, {n_blocks}], got {top_layers}")
    _check_ids_and_mask(input_ids, attention_mask)
    all_blocks, training = bert.blocks, bert.training
    bert.blocks = all_blocks[: n_blocks - top_layers]  # reuse Bert.forward on the prefix
    bert.eval()
    try:
        return _in_length_chunks(
            lambda mask, ids, segments: encode(bert, ids, mask, segments),
            attention_mask,
            chunk,
            input_ids,
            token_type_ids,
        )
    finally:
        bert.blocks = all_blocks
        bert.train(training)


def real_width(attention_mask: Tensor) -> int:
    """1 + the last position (column) of a (B, T) padding mask holding a real token: the width
    a right-padded batch can be cut to without losing a real token."""
    columns = attention_mask.bool().any(0).nonzero()
    return int(columns.max()) + 1 if len(columns) else 1


def length_buckets(
    lengths: list[int], batch_size: int, generator: torch.Generator | None = None
) -> list[Tensor]:
    """Index batches (one epoch) of examples of similar length: sort by length, cut into
    batches of ``batch_size``, shuffle the batch order. Each index appears exactly once; with
    right padding cut by :func:`real_width`, a batch wastes little compute on padding."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = torch.argsort(torch.tensor(lengths), stable=True)
    batches = list(order.split(batch_size))
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def fit_bucketed(
    modules: nn.Module,
    batch_loss,
    lengths: list[int],
    epochs: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
) -> list[float]:
    """Train ``modules`` (e.g. ``TopLayers`` and a head) with AdamW for ``epochs`` passes of
    :func:`length_buckets` batches; ``batch_loss(index)`` gives the mean loss of the examples
    ``index`` (a (b,) long tensor). Returns the loss of every step. The modules end in eval
    mode."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout
    optimizer = torch.optim.AdamW([p for p in modules.parameters() if p.requires_grad], lr=lr)
    modules.train()
    losses = []
    for _ in range(epochs):
        for index in length_buckets(lengths, batch_size, generator):
            loss = batch_loss(index)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    modules.eval()
    return losses


class TopLayers(nn.Module):
    """The last ``top_layers`` blocks of a course ``Bert`` (shared, not copied), run on
    ``frozen_prefix_states``: (B, T, E) states and (B, T) mask -> (B, T, E) hidden states."""

    def __init__(self, bert: nn.Module, top_layers: int):
        super().__init__()
        if not 1 <= top_layers <= len(bert.blocks):
            raise ValueError(f"top_layers must be in [1, {len(bert.blocks)}], got {top_layers}")
        self.blocks = bert.blocks[len(bert.blocks) - top_layers :]

    def forward(self, states: Tensor, attention_mask: Tensor) -> Tensor:
        attention_mask = attention_mask.bool()
        for block in self.blocks:
            states = block(states, attention_mask=attention_mask)
        return states


@torch.no_grad()
def top_layer_states(top: TopLayers, states: Tensor, attention_mask: Tensor, chunk: int = 64):
    """Final states (N, T, E) of ``top`` run on cached ``states`` (N, T, E), in length-sorted
    chunks cut to their real width (padding positions hold zeros). Puts ``top`` in eval mode,
    as the ``predict_*`` functions do with their models."""
    top.eval()
    return _in_length_chunks(lambda mask, x: top(x, mask), attention_mask, chunk, states)
