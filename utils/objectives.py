"""Pre-training objectives and perplexity.

- :func:`causal_lm_loss`: next-token prediction (GPT (Radford et al. 2019)).
- :func:`mask_tokens`: BERT's masked language modelling, 15 % of tokens chosen, of which
  80 % become ``[MASK]``, 10 % a random token and 10 % stay unchanged (Devlin et al. 2019).
- :func:`span_corruption`: T5's objective, contiguous spans (mean length 3, 15 % of tokens)
  replaced by sentinel tokens in the input and spelled out in the target
  (Raffel et al. 2020); :func:`undo_span_corruption` inverts it.
- :func:`prefix_lm_mask`: bidirectional attention over a prefix, causal after it.
- :func:`perplexity`: exp of the mean next-token negative log-likelihood over a long text,
  evaluated with a sliding window.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100  # labels the losses skip: the default ignore_index of F.cross_entropy


def _check_long(name: str, x: Tensor, dim: int | None = None) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.long:
        raise ValueError(f"{name} must be a LongTensor of token ids, got dtype {x.dtype}")
    if dim is not None and x.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimension(s), got shape {tuple(x.shape)}")


# ---------------------------------------------------------------------------------------------
# Causal language modelling
# ---------------------------------------------------------------------------------------------


def causal_lm_loss(logits: Tensor, labels: Tensor, *, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Mean cross-entropy of predicting token t+1 from positions <= t.

    Args:
        logits: (B, T, V) model outputs for the input sequence.
        labels: (B, T) token ids aligned with the *inputs* (usually the inputs themselves);
            the shift happens here: ``logits[:, t]`` is scored against ``labels[:, t + 1]``.
            Positions equal to ``ignore_index`` (padding, a prompt) are left out of the mean.

    Returns:
        A scalar tensor (the same convention as Hugging Face's ``labels=`` loss).
    """
    _check_long("labels", labels, dim=2)
    if logits.dim() != 3 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"logits must be (B, T, V) with (B, T) = labels.shape {tuple(labels.shape)}, "
            f"got {tuple(logits.shape)}"
        )
    predictions = logits[:, :-1].reshape(-1, logits.shape[-1])
    targets = labels[:, 1:].reshape(-1)
    return F.cross_entropy(predictions.float(), targets, ignore_index=ignore_index)


# ---------------------------------------------------------------------------------------------
# Masked language modelling (BERT)
# ---------------------------------------------------------------------------------------------


def mask_tokens(
    input_ids: Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    mask_prob: float = 0.15,
    special_tokens_mask: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """BERT's corruption: choose ``mask_prob`` of the tokens; replace 80 % of the chosen by
    ``mask_token_id``, 10 % by a uniformly random token, and leave 10 % unchanged.

    Args:
        input_ids: (B, T) token ids (any shape works).
        special_tokens_mask: bool, same shape, True where a token must never be chosen
            ([CLS], [SEP], padding).

    Returns:
        ``(inputs, labels)``: the corrupted ids, and labels holding the original id at chosen
        positions and ``-100`` elsewhere (so the loss is computed on chosen tokens only).
    """
    _check_long("input_ids", input_ids)
    if not 0.0 < mask_prob < 1.0:
        raise ValueError(f"mask_prob must be in (0, 1), got {mask_prob}")
    if special_tokens_mask is not None and (
        special_tokens_mask.dtype != torch.bool or special_tokens_mask.shape != input_ids.shape
    ):
        raise ValueError(
            f"special_tokens_mask must be a bool tensor of shape {tuple(input_ids.shape)}, got "
            f"{special_tokens_mask.dtype} {tuple(special_tokens_mask.shape)}"
        )

    def coin(probability: float) -> Tensor:
        return (
            torch.rand(input_ids.shape, generator=generator, device=input_ids.device) < probability
        )

    chosen = coin(mask_prob)
    if special_tokens_mask is not None:
        chosen &= ~special_tokens_mask
    labels = torch.where(chosen, input_ids, IGNORE_INDEX)
    to_mask = chosen & coin(0.8)
    to_randomize = chosen & ~to_mask & coin(0.5)  # half of the remaining 20 %
    random_ids = torch.randint(
        vocab_size, input_ids.shape, generator=generator, device=input_ids.device
    )
    inputs = torch.where(to_mask, mask_token_id, input_ids)
    inputs = torch.where(to_randomize, random_ids, inputs)
    return inputs, labels


# ---------------------------------------------------------------------------------------------
# Span corruption (T5)
# ---------------------------------------------------------------------------------------------


def _random_segmentation(num_items: int, num_segments: int, generator) -> Tensor:
    """Lengths (num_segments,) of a uniformly random split of ``num_items`` into non-empty parts."""
    cut_points = torch.randperm(num_items - 1, generator=generator)[: num_segments - 1]
    starts = torch.zeros(num_items, dtype=torch.long)
    starts[cut_points + 1] = 1
    segment_ids = starts.cumsum(0)
    return torch.bincount(segment_ids, minlength=num_segments)


def random_spans_noise_mask(
    length: int,
    *,
    noise_density: float = 0.15,
    mean_span_length: float = 3.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """T5's noise mask: (length,) bool, True on ``round(length * noise_density)`` tokens.

    The noise forms ``round(num_noise / mean_span_length)`` spans; noise and non-noise span
    lengths are random splits, interleaved starting with a non-noise span (as in T5).
    """
    if length < 2:
        raise ValueError(f"length must be >= 2 to corrupt a span, got {length}")
    if not 0.0 < noise_density < 1.0 or mean_span_length < 1.0:
        raise ValueError(
            f"need 0 < noise_density < 1 and mean_span_length >= 1, "
            f"got {noise_density} and {mean_span_length}"
        )
    num_noise = min(max(round(length * noise_density), 1), length - 1)
    num_spans = max(round(num_noise / mean_span_length), 1)
    noise_lengths = _random_segmentation(num_noise, num_spans, generator)
    kept_lengths = _random_segmentation(length - num_noise, num_spans, generator)
    is_noise = torch.tensor([False, True]).repeat(num_spans)
    lengths = torch.stack([kept_lengths, noise_lengths], dim=1).reshape(-1)
    return is_noise.repeat_interleave(lengths)


def apply_span_corruption(
    ids: Tensor, noise_mask: Tensor, sentinel_ids: Sequence[int]
) -> tuple[Tensor, Tensor]:
    """Turn a sequence and its noise mask into T5's ``(inputs, targets)``.

    Each noise span k is replaced in the inputs by ``sentinel_ids[k]``; the targets list, for
    each span, its sentinel followed by the tokens it hides, and end with one more sentinel if
    the sequence ends with kept tokens (T5 replaces every *kept* span of the targets by a
    sentinel). The paper's example: ``Thank you <X> me to your party <Y> week .`` and
    ``<X> for inviting <Y> last <Z>``.

    Args:
        ids: (L,) token ids. noise_mask: (L,) bool. sentinel_ids: enough ids for every span
            (plus one when the sequence ends with kept tokens).
    """
    _check_long("ids", ids, dim=1)
    if noise_mask.dtype != torch.bool or noise_mask.shape != ids.shape:
        raise ValueError(
            f"noise_mask must be a bool tensor of shape {tuple(ids.shape)}, "
            f"got {noise_mask.dtype} {tuple(noise_mask.shape)}"
        )
    span_starts = noise_mask & ~F.pad(noise_mask[:-1], (1, 0), value=False)
    ends_with_kept = not bool(noise_mask[-1])
    needed = int(span_starts.sum()) + ends_with_kept
    if needed > len(sentinel_ids):
        raise ValueError(f"this noise mask needs {needed} sentinel ids, got {len(sentinel_ids)}")
    sentinels = iter(int(s) for s in sentinel_ids)
    inputs, targets = [], []
    rows = zip(ids.tolist(), noise_mask.tolist(), span_starts.tolist(), strict=True)
    for token, noisy, start in rows:
        if start:
            sentinel = next(sentinels)
            inputs.append(sentinel)
            targets.append(sentinel)
        (targets if noisy else inputs).append(token)
    if ends_with_kept:
        targets.append(next(sentinels))
    return (
        torch.tensor(inputs, dtype=torch.long, device=ids.device),
        torch.tensor(targets, dtype=torch.long, device=ids.device),
    )


def span_corruption(
    ids: Tensor,
    sentinel_ids: Sequence[int],
    *,
    noise_density: float = 0.15,
    mean_span_length: float = 3.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """T5 span corruption of one (L,) sequence: a random noise mask, then
    :func:`apply_span_corruption`. Returns ``(inputs, targets)``, both 1-D."""
    _check_long("ids", ids, dim=1)
    mask = random_spans_noise_mask(
        len(ids),
        noise_density=noise_density,
        mean_span_length=mean_span_length,
        generator=generator,
    )
    return apply_span_corruption(ids, mask.to(ids.device), sentinel_ids)


def undo_span_corruption(inputs: Tensor, targets: Tensor, sentinel_ids: Sequence[int]) -> Tensor:
    """Rebuild the original (L,) sequence from span-corruption ``inputs`` and ``targets``."""
    _check_long("inputs", inputs, dim=1)
    _check_long("targets", targets, dim=1)
    sentinel_set = set(sentinel_ids)
    spans: dict[int, list[int]] = {}
    current = None
    for token in targets.tolist():
        if token in sentinel_set:
            current = spans.setdefault(token, [])
        elif current is None:
            raise ValueError("targets must start with a sentinel id")
        else:
            current.append(token)
    out = []
    for token in inputs.tolist():
        if token in sentinel_set:
            if token not in spans:
                raise ValueError(f"sentinel {token} appears in inputs but not in targets")
            out.extend(spans[token])
        else:
            out.append(token)
    return torch.tensor(out, dtype=torch.long, device=inputs.device)


# ---------------------------------------------------------------------------------------------
# Prefix language modelling
# ---------------------------------------------------------------------------------------------


def prefix_lm_mask(prefix_length: int | Tensor, length: int, device=None) -> Tensor:
    """Boolean attention mask, True = may attend: every position sees the whole prefix, and
    positions after it see the past only (causal).

    Args:
        prefix_length: an int, or a (B,) LongTensor with one prefix length per sequence.
        length: T, the sequence length.

    Returns:
        (T, T) for an int, (B, 1, T, T) for a tensor (broadcasts over heads).
    """
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    key_positions = torch.arange(length, device=device)
    if isinstance(prefix_length, int):
        if not 0 <= prefix_length <= length:
            raise ValueError(f"prefix_length must be in [0, {length}], got {prefix_length}")
        return causal | (key_positions < prefix_length)
    _check_long("prefix_length", prefix_length, dim=1)
    if ((prefix_length < 0) | (prefix_length > length)).any():
        raise ValueError(
            f"prefix_length values must be in [0, {length}], got {prefix_length.tolist()}"
        )
    in_prefix = key_positions.to(prefix_length.device) < prefix_length[:, None]  # (B, S)
    return (causal.to(prefix_length.device) | in_prefix[:, None, :])[:, None]


# ---------------------------------------------------------------------------------------------
# Perplexity
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def mean_negative_log_likelihood(
    model: Callable[[Tensor], Tensor],
    ids: Tensor,
    *,
    block_size: int,
    stride: int | None = None,
) -> float:
    """Mean next-token negative log-likelihood (nats) of a long sequence, sliding window.

    Windows of ``block_size`` tokens start every ``stride`` tokens (default: ``block_size``,
    no overlap); each token is scored once, in the first window that has it as a new token,
    with the rest of that window as context. A smaller stride gives each prediction more
    context (lower, fairer values) at more compute. The first token of the text and, without
    overlap, the first token of every window have no context and are not scored.

    Args:
        model: maps (1, T) ids to (1, T, V) logits (put it in ``eval()`` mode first).
        ids: (N,) token ids.
    """
    _check_long("ids", ids, dim=1)
    stride = block_size if stride is None else stride
    if not 0 < stride <= block_size:
        raise ValueError(f"stride must be in (0, block_size={block_size}], got {stride}")
    total, count, scored_until = 0.0, 0, 1  # position 0 has no context
    for begin in range(0, len(ids) - 1, stride):
        end = min(begin + block_size, len(ids))
        window = ids[begin:end][None]
        logits = model(window)  # (1, W, V)
        first_new = max(scored_until, begin + 1)  # first target position not yet scored
        if first_new >= end:
            continue
        predictions = logits[0, first_new - begin - 1 : end - begin - 1]
        targets = ids[first_new:end]
        total += F.cross_entropy(predictions.float(), targets, reduction="sum").item()
        count += len(targets)
        scored_until = end
        if end == len(ids):
            break
    if count == 0:
        raise ValueError(f"ids must hold at least 2 tokens, got {len(ids)}")
    return total / count


def perplexity(
    model: Callable[[Tensor], Tensor], ids: Tensor, *, block_size: int, stride: int | None = None
) -> float:
    """exp(mean next-token NLL): the effective number of equally likely choices per token.

    A uniform model over V tokens has perplexity exactly V. Arguments as
    :func:`mean_negative_log_likelihood`.
    """
    return math.exp(mean_negative_log_likelihood(model, ids, block_size=block_size, stride=stride))
