"""Autoregressive decoding for the course's decoder-only models, with a KV cache.

A *model* here is any module called as ``model(idx, kv_caches=...) -> logits`` with
``idx`` (B, T) and logits (B, T, V), plus ``model.new_kv_caches()`` (e.g.
:class:`utils.transformer.GPT` and :class:`utils.transformer.Llama`). With a cache the prompt
is run once ("prefill") and each later step feeds a single token, so a step costs O(T) instead
of re-running the whole O(T^2) prefix.

- :func:`generate` / :func:`stream`: greedy decoding or sampling with temperature, top-k and
  top-p (nucleus, Holtzman et al. 2020), stop tokens; ``stream`` yields tokens as they come.
- :func:`beam_search`: beam search with a length penalty, scored like Hugging Face's
  ``generate(num_beams=...)`` so both return the same sequence.
- :func:`next_token_distribution`: the distribution a sampler draws from (for plots).
- :func:`to_decoding_layout`: store the weights the way one-token decoding reads them fastest.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from utils.attention import KVCache

# ---------------------------------------------------------------------------------------------
# Shaping the next-token distribution
# ---------------------------------------------------------------------------------------------


def _check_logits(logits: Tensor) -> None:
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        raise TypeError(
            f"logits must be a floating-point torch.Tensor, got {type(logits).__name__}"
        )
    if logits.dim() not in (1, 2):
        raise ValueError(f"logits must have shape (V,) or (B, V), got {tuple(logits.shape)}")


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Set every logit below the k-th largest to -inf (ties with it are kept). (..., V)."""
    _check_logits(logits)
    if k < 1:
        raise ValueError(f"top_k must be >= 1, got {k}")
    k = min(k, logits.shape[-1])
    kth_largest = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability mass is
    at least ``p``; set the other logits to -inf. (..., V)."""
    _check_logits(logits)
    if not 0.0 < p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens
    drop_sorted = mass_before >= p  # the set is already complete without this token
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def next_token_distribution(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> Tensor:
    """Probabilities (..., V) a sampler draws from: logits / temperature, then top-k, then
    top-p (the order Hugging Face applies them), then softmax."""
    _check_logits(logits)
    if temperature <= 0.0:
        raise ValueError(
            f"temperature must be > 0 (use do_sample=False for greedy), got {temperature}"
        )
    logits = logits.float() / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    return logits.softmax(dim=-1)


# ---------------------------------------------------------------------------------------------
# Weight layout for decoding
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def to_decoding_layout(model: nn.Module) -> nn.Module:
    """Store every ``nn.Linear`` weight column-major, in place; returns ``model``.

    A weight keeps its (out, in) shape and its values, but its memory becomes that of the
    contiguous (in, out) matrix it is the transpose of (strides (1, out)): the layout of
    GPT-2's original ``Conv1D``. ``F.linear`` then multiplies a (1, in) activation by a
    contiguous (in, out) matrix, adding whole rows of the weight into the output as it
    streams through memory, instead of taking ``out`` separate dot products. A cached decoding
    step is such a matrix-vector product per layer, bound by how fast the weights come from
    memory; on the course's 2-core CPU machine this layout makes cached decoding about 30 %
    faster (``benchmarks/generation.py``). Results agree with the default layout to rounding.

    Tied weights (GPT's ``lm_head`` and ``wte``) are changed once and stay tied. Meant for
    inference: convert a copy, or save checkpoints before (safetensors stores only
    contiguous tensors).
    """
    done: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.Linear) and id(module.weight) not in done:
            done.add(id(module.weight))
            module.weight.data = module.weight.data.t().contiguous().t()
    return model


# ---------------------------------------------------------------------------------------------
# Greedy decoding and sampling
# ---------------------------------------------------------------------------------------------


def _check_prompt(model: nn.Module, idx: Tensor, max_new_tokens: int) -> None:
    if not isinstance(idx, Tensor) or idx.dtype != torch.long or idx.dim() != 2:
        raise ValueError(f"idx must be a (B, T) LongTensor, got {getattr(idx, 'shape', idx)!r}")
    if idx.shape[1] == 0:
        raise ValueError("idx must hold at least one prompt token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    block_size = getattr(getattr(model, "config", None), "block_size", None)
    if block_size is not None and idx.shape[1] + max_new_tokens > block_size:
        raise ValueError(
            f"prompt length {idx.shape[1]} + max_new_tokens {max_new_tokens} exceeds the "
            f"model's block_size {block_size}"
        )


def _last_logits(model: nn.Module, idx: Tensor, caches: list[KVCache] | None) -> Tensor:
    """(B, V) float32 logits for the next token; with caches, ``idx`` holds only new tokens."""
    return model(idx, kv_caches=caches)[:, -1].float()


@torch.no_grad()
def generate_steps(
    model: nn.Module,
    idx: Tensor,
    max_new_tokens: int,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Iterable[int] = (),
    pad_token_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> Iterator[Tensor]:
    """Yield the next token of every sequence, (B,) per step, until ``max_new_tokens`` or
    until every sequence has produced a stop token.

    Args:
        model: a decoder with ``forward(idx, kv_caches=...)`` and ``new_kv_caches()``; put
            it in ``eval()`` mode first.
        idx: (B, T) prompt ids (all prompts the same length, no padding).
        do_sample: False for greedy decoding (argmax); True to sample from
            :func:`next_token_distribution` with ``temperature``, ``top_k`` and ``top_p``.
        stop_tokens: ids that end a sequence (kept in the output, like an end-of-text token).
        pad_token_id: what a stopped sequence is filled with from then on (default: its first
            stop token), like Hugging Face.
        use_cache: decode with a KV cache (fast) or re-run the whole prefix each step (the
            slow reference).
        generator: a ``torch.Generator`` for reproducible sampling.
    """
    _check_prompt(model, idx, max_new_tokens)
    stop = torch.tensor(sorted(set(stop_tokens)), dtype=torch.long, device=idx.device)
    if pad_token_id is None and len(stop):
        pad_token_id = int(stop[0])
    caches = model.new_kv_caches() if use_cache else None
    finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    sequence, new_input = idx, idx
    for _ in range(max_new_tokens):
        logits = _last_logits(model, new_input if use_cache else sequence, caches)
        if do_sample:
            probs = next_token_distribution(
                logits, temperature=temperature, top_k=top_k, top_p=top_p
            )
            token = torch.multinomial(probs, 1, generator=generator)[:, 0]
        else:
            token = logits.argmax(dim=-1)
        if pad_token_id is not None:
            token = torch.where(finished, pad_token_id, token)
        yield token
        finished |= torch.isin(token, stop)
        if finished.all():
            return
        new_input = token[:, None]
        if not use_cache:
            sequence = torch.cat([sequence, new_input], dim=1)


def generate(model: nn.Module, idx: Tensor, max_new_tokens: int, **options) -> Tensor:
    """Continue each (B, T) prompt by up to ``max_new_tokens`` tokens; returns (B, T + N),
    the prompts followed by N <= max_new_tokens new tokens. Keyword options (``do_sample``,
    ``temperature``, ``top_k``, ``top_p``, ``stop_tokens``, ``pad_token_id``, ``use_cache``,
    ``generator``) as :func:`generate_steps`."""
    steps = generate_steps(model, idx, max_new_tokens, **options)
    return torch.cat([idx, *(token[:, None] for token in steps)], dim=1)


def stream(model: nn.Module, idx: Tensor, max_new_tokens: int, **kwargs) -> Iterator[int]:
    """Yield the new tokens of a single prompt one at a time, as ints, as soon as each is
    chosen (for printing text while it is generated). ``idx`` is (1, T); keyword options
    as :func:`generate_steps`."""
    if idx.dim() != 2 or idx.shape[0] != 1:
        raise ValueError(f"stream takes one prompt of shape (1, T), got {tuple(idx.shape)}")
    for token in generate_steps(model, idx, max_new_tokens, **kwargs):
        yield int(token[0])


# ---------------------------------------------------------------------------------------------
# Beam search
# ---------------------------------------------------------------------------------------------


def _check_beam_inputs(model: nn.Module, idx: Tensor, max_new_tokens: int, num_beams: int) -> None:
    _check_prompt(model, idx, max_new_tokens)
    if idx.shape[0] != 1:
        raise ValueError(f"beam_search takes one prompt of shape (1, T), got {tuple(idx.shape)}")
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")


def _add_finished(
    finished: list[tuple[float, Tensor]], beams: Tensor, ranked: tuple, num_beams: int, norm: float
) -> list[tuple[float, Tensor]]:
    """Add to ``finished`` the extensions ranked among the first ``num_beams`` that end, scored
    ``sum_logprob / norm``; keep its best ``num_beams``. ``ranked`` = (parents, tokens,
    summed log-probabilities, ends), best first."""
    parents, tokens, scores, ends = ranked
    for rank in range(min(num_beams, len(tokens))):
        if ends[rank]:
            sequence = torch.cat([beams[parents[rank]], tokens[rank : rank + 1]])
            finished.append((float(scores[rank]) / norm, sequence))
    return sorted(finished, key=lambda item: -item[0])[:num_beams]


@torch.no_grad()
def beam_search(
    model: nn.Module,
    idx: Tensor,
    max_new_tokens: int,
    *,
    num_beams: int = 4,
    length_penalty: float = 1.0,
    stop_tokens: Iterable[int] = (),
    early_stopping: bool = True,
) -> Tensor:
    """Beam search: keep the ``num_beams`` most likely partial sequences at every step.

    Scoring follows Hugging Face's ``generate(num_beams=..., do_sample=False)``: at each step
    the best ``2 * num_beams`` (more with several stop tokens) extensions of all beams are
    ranked by total log-probability; an extension that ends (a stop token, or the length
    limit) and ranks among the first ``num_beams`` becomes a finished hypothesis with score
    ``sum_logprob / generated_length ** length_penalty``; the best ``num_beams`` unfinished
    ones continue. ``early_stopping=True`` stops once ``num_beams`` hypotheses are finished;
    ``False`` continues while a running beam could still beat the worst finished one
    (estimated at the current length, as Hugging Face does).

    ``idx`` (1, T) is one prompt; returns (1, T + N), the prompt and the best finished
    hypothesis. The other arguments as :func:`generate`.
    """
    _check_beam_inputs(model, idx, max_new_tokens, num_beams)
    stop = torch.tensor(sorted(set(stop_tokens)), dtype=torch.long, device=idx.device)
    candidates_per_step = max(2, 1 + len(stop)) * num_beams
    caches = model.new_kv_caches()
    beams = idx  # (n, T + step) running sequences; one beam until the first step
    beam_scores = torch.zeros(1, device=idx.device)  # (n,) summed log-probabilities
    finished: list[tuple[float, Tensor]] = []  # (normalized score, sequence), best first
    improvement_possible = True
    new_input = idx
    for length in range(1, max_new_tokens + 1):  # length generated after this step
        log_probs = F.log_softmax(_last_logits(model, new_input, caches), dim=-1)  # (n, V)
        totals = (log_probs + beam_scores[:, None]).reshape(-1)
        top_scores, top_flat = torch.topk(totals, min(candidates_per_step, totals.numel()))
        parents, tokens = top_flat // log_probs.shape[-1], top_flat % log_probs.shape[-1]
        ends = torch.isin(tokens, stop) | (length == max_new_tokens)
        if improvement_possible and not (len(finished) == num_beams and early_stopping):
            ranked = (parents, tokens, top_scores, ends)
            finished = _add_finished(finished, beams, ranked, num_beams, length**length_penalty)
        if length == max_new_tokens or bool(ends.all()):
            break

        # running beams: the best num_beams extensions that did not end
        keep = torch.nonzero(~ends)[:num_beams, 0]
        parents, tokens, beam_scores = parents[keep], tokens[keep], top_scores[keep]
        beams = torch.cat([beams[parents], tokens[:, None]], dim=1)
        for cache in caches:
            cache.reorder(parents)
        new_input = tokens[:, None]

        pool_full = len(finished) == num_beams
        if pool_full:
            best_running = float(beam_scores[0]) / length**length_penalty
            improvement_possible &= best_running > finished[-1][0]
        if (pool_full and early_stopping) or not improvement_possible:
            break
    return finished[0][1][None]
